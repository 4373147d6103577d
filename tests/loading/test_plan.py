"""plan(): memory and disk estimates, checked by hand and against real runs; load's refusal to overcommit."""

import inspect
import json

import pytest
import torch
from support.models import tiny_config, tiny_model

import llama_lens as ll
import llama_lens.loading.plan as plan_module
import llama_lens.model.memory as memory_module
from llama_lens.loading.plan import GIB, NotEnoughMemoryError, plan
from llama_lens.loading.stream import StreamedLlama
from llama_lens.testing import random_state_dict, write_hf_checkpoint

# The tiny config (d_model 64, 2 layers, 4 heads of 16, 2 KV heads, d_mlp 128, vocab 128, untied), by hand:
#   one layer: ln1 64 + q 64*64 + k 32*64 + v 32*64 + o 64*64 + ln2 64 + gate, up, down 3 * 128*64 = 36_992
#   outside the layers: embed 128*64 + unembed 128*64 + ln_final 64 = 16_448
LAYER, OUTSIDE = 36_992, 16_448


def test_weights_by_hand(tiny_cfg):
    full = plan(tiny_cfg, tokens=0, dtype=torch.float32, cache=None)
    assert full.weights_resident_bytes == (OUTSIDE + 2 * LAYER) * 4
    assert full.layer_in_flight_bytes == LAYER * 4  # one layer as stored (float32: no checkpoint dtype given)
    streamed = plan(tiny_cfg, tokens=0, stream=True, dtype=torch.bfloat16, cache=None, unembed="memory")
    held = OUTSIDE - 128 * 64  # the final norm and the unembedding; the embedding is read by rows
    assert streamed.weights_resident_bytes == held * 2
    # The layer computing and the layer being read (bf16), plus the tensor being copied as stored (bf16
    # too): the largest, gate/up/down, 128*64.
    assert streamed.layer_in_flight_bytes == LAYER * (2 + 2) + 128 * 64 * 2
    assert streamed.activations_bytes == 0 and streamed.cache_bytes == 0 and streamed.pattern_bytes == 0
    assert streamed.peak_bytes == held * 2 + LAYER * 4 + 128 * 64 * 2


def test_activations_cache_and_patterns_by_hand(tiny_cfg):
    estimate = plan(tiny_cfg, tokens=10, batch=2, dtype=torch.float32, cache="resid", patterns=True)
    rows = 2 * 10
    # Working values per position: 6 d_model + 2 (q + k + v) + z + 4 d_mlp = 384 + 256 + 64 + 512 = 1216;
    # logits 128 values plus their float32 softmax; one layer's scores, float32 softmax, pattern (2*4*10*10).
    working = rows * 1216 * 4 + rows * 128 * (4 + 4) + 2 * 4 * 100 * (4 + 4 + 4)
    assert estimate.activations_bytes == working == 127_360
    assert estimate.cache_bytes == (2 + 1) * rows * 64 * 4 == 15_360  # resid_pre of each layer + final resid_post
    assert estimate.pattern_bytes == 2 * 2 * 4 * 100 * 4 == 6_400  # hook_pattern of each layer
    parts = (
        estimate.weights_resident_bytes
        + estimate.layer_in_flight_bytes
        + estimate.activations_bytes
        + estimate.cache_bytes
        + estimate.pattern_bytes
    )
    assert estimate.peak_bytes == parts


def test_cache_estimates_equal_real_caches():
    cfg = tiny_config(n_layers=3)
    model = tiny_model(cfg)
    tokens = torch.randint(0, 128, (2, 10))

    _, cache = model.run_with_cache(tokens)
    is_pattern = lambda name: name.endswith(("hook_attn_scores", "hook_pattern"))  # noqa: E731
    estimate = plan(cfg, tokens=10, batch=2, cache="all")
    assert estimate.cache_bytes == sum(t.nbytes for name, t in cache.items() if not is_pattern(name))
    assert estimate.pattern_bytes == sum(t.nbytes for name, t in cache.items() if is_pattern(name))

    resid_names = lambda name: name.endswith("hook_resid_pre") or name == "blocks.2.hook_resid_post"  # noqa: E731
    _, cache = model.run_with_cache(tokens, names_filter=resid_names)
    assert plan(cfg, tokens=10, batch=2, cache="resid").cache_bytes == sum(t.nbytes for t in cache.values())


def test_read_time_and_layers(tiny_cfg):
    estimate = plan(tiny_cfg, tokens=4, layers=range(0, 1), dtype=torch.float32, read_bandwidth=1e6)
    assert estimate.n_layers == 1
    assert estimate.read_bytes == (OUTSIDE + LAYER) * 4
    assert estimate.est_read_seconds == pytest.approx((OUTSIDE + LAYER) * 4 / 1e6)


def test_checkpoint_folder_gives_the_same_plan_with_its_stored_dtype(tiny_cfg, tmp_path):
    path = write_hf_checkpoint(tmp_path / "hf", tiny_cfg, random_state_dict(tiny_cfg), dtype=torch.bfloat16)
    from_folder = plan(ll.Checkpoint(path, index_cache=False), tokens=8, stream=True, dtype=torch.float32)
    assert from_folder.layer_in_flight_bytes == LAYER * (4 + 4) + 128 * 64 * 2  # two float32 layers + a bf16 tensor
    # The embedding's rows of the 8 tokens only, the final norm and unembedding, the layers; as stored (bf16).
    assert from_folder.read_bytes == (8 * 64 + OUTSIDE - 128 * 64 + 2 * LAYER) * 2


def test_fits_and_report(tiny_cfg, monkeypatch):
    monkeypatch.setattr(plan_module, "available_memory", lambda device: 10_000)
    estimate = plan(tiny_cfg, tokens=8)
    assert not estimate.fits and estimate.available_bytes == 10_000
    text = repr(estimate)
    assert "does NOT fit" in text and "weights resident" in text
    frame = estimate.to_frame()
    assert frame.loc["peak", "bytes"] == estimate.peak_bytes
    assert list(frame.index) == [
        "weights resident",
        "layers in flight",
        "unembed in flight",
        "activations",
        "cache",
        "patterns",
        "peak",
        "process",
        "peak RSS",
        "available",
        "read from disk",
    ]
    monkeypatch.setattr(plan_module, "available_memory", lambda device: 10**12)
    assert plan(tiny_cfg, tokens=8).fits


def test_bad_arguments(tiny_cfg):
    with pytest.raises(ValueError, match=r"unknown kind of activation cache 'everything': cache= takes one of"):
        plan(tiny_cfg, cache="everything")
    with pytest.raises(ValueError, match="tokens"):
        plan(tiny_cfg, tokens=-1)
    with pytest.raises(ValueError, match="outside the model"):
        plan(tiny_cfg, layers=[5])


@pytest.mark.skipif(not memory_module.MEMINFO.is_file(), reason="reads Linux's /proc/meminfo")
def test_available_memory_reads_the_machine():
    fields = dict(line.split(":", 1) for line in memory_module.MEMINFO.read_text().splitlines())
    total = int(fields["MemTotal"].split()[0]) * 1024
    available = memory_module.available_memory("cpu")
    assert isinstance(available, int) and 0 < available <= total
    cgroup = memory_module._cgroup_available()
    if "MemAvailable" in fields and (cgroup is None or cgroup > total):
        # No cgroup limit below the machine's memory: MemAvailable itself, give or take what other processes
        # did in between the two reads.
        assert abs(available - int(fields["MemAvailable"].split()[0]) * 1024) < total // 10


@pytest.fixture
def fake_memory_files(tmp_path, monkeypatch):
    """Points available_memory at fake /proc/meminfo and cgroup files; returns a function writing them."""
    paths = {"meminfo": tmp_path / "meminfo", "v2": tmp_path / "cgroup", "v1": tmp_path / "cgroup" / "memory"}
    paths["v1"].mkdir(parents=True)
    monkeypatch.setattr(memory_module, "MEMINFO", paths["meminfo"])
    monkeypatch.setattr(memory_module, "CGROUP_V2", paths["v2"])
    monkeypatch.setattr(memory_module, "CGROUP_V1", paths["v1"])
    monkeypatch.setattr(memory_module, "PROC_SELF_CGROUP", tmp_path / "self_cgroup")  # absent: the roots only

    def write(meminfo_kib=None, v2=None, v1=None):
        if meminfo_kib is not None:
            paths["meminfo"].write_text(f"MemTotal:       99999999 kB\nMemAvailable:   {meminfo_kib} kB\n")
        for version, files in (("v2", v2), ("v1", v1)):
            for name, text in (files or {}).items():
                (paths[version] / name).write_text(text)

    return write


def test_available_memory_is_meminfo_without_a_cgroup_limit(fake_memory_files):
    fake_memory_files(meminfo_kib=4_000_000)
    assert memory_module.available_memory("cpu") == 4_000_000 * 1024
    fake_memory_files(v2={"memory.max": "max\n", "memory.current": "123456789\n"})  # v2, no limit
    assert memory_module.available_memory("cpu") == 4_000_000 * 1024


def test_available_memory_respects_a_cgroup_v2_limit(fake_memory_files):
    fake_memory_files(
        meminfo_kib=64 * 2**20,  # the host has 64 GiB free
        v2={
            "memory.max": f"{8 * GIB}\n",
            "memory.current": f"{3 * GIB}\n",
            "memory.stat": f"anon 1\ninactive_file {GIB}\n",
        },
    )
    # The container has 8 GiB, uses 3 GiB of which 1 GiB is inactive page cache the kernel takes back first.
    assert memory_module.available_memory("cpu") == 6 * GIB
    fake_memory_files(meminfo_kib=2 * 2**20)  # the host is tighter than the container
    assert memory_module.available_memory("cpu") == 2 * GIB
    fake_memory_files(meminfo_kib=64 * 2**20, v2={"memory.current": f"{9 * GIB}\n", "memory.stat": ""})
    assert memory_module.available_memory("cpu") == 0  # over its limit: nothing left


def test_available_memory_respects_a_cgroup_v1_limit(fake_memory_files):
    fake_memory_files(
        meminfo_kib=64 * 2**20,
        v1={
            "memory.limit_in_bytes": f"{4 * GIB}\n",
            "memory.usage_in_bytes": f"{2 * GIB}\n",
            "memory.stat": f"inactive_file 5\ntotal_inactive_file {GIB // 2}\n",
        },
    )
    assert memory_module.available_memory("cpu") == 2 * GIB + GIB // 2
    fake_memory_files(v1={"memory.limit_in_bytes": "9223372036854771712\n"})  # v1 writes this for no limit
    assert memory_module.available_memory("cpu") == 64 * GIB


def test_available_memory_finds_a_nested_cgroup_and_its_parents(tmp_path, fake_memory_files):
    # A process in a systemd scope under a slice with a limit: v2 lists its cgroup as "0::/path".
    (tmp_path / "self_cgroup").write_text("0::/user.slice/user-1000.slice/session-3.scope\n")
    scope = tmp_path / "cgroup" / "user.slice" / "user-1000.slice" / "session-3.scope"
    scope.mkdir(parents=True)
    slice_ = scope.parent
    fake_memory_files(meminfo_kib=64 * 2**20)
    (scope / "memory.max").write_text("max\n")
    (scope / "memory.current").write_text(f"{GIB}\n")
    (slice_ / "memory.max").write_text(f"{10 * GIB}\n")
    (slice_ / "memory.current").write_text(f"{4 * GIB}\n")  # the slice's other processes count too
    (slice_ / "memory.stat").write_text(f"inactive_file {GIB}\n")
    assert memory_module.available_memory("cpu") == 7 * GIB
    (scope / "memory.max").write_text(f"{3 * GIB}\n")  # a tighter limit on the scope itself
    assert memory_module.available_memory("cpu") == 2 * GIB

    # v1: the memory hierarchy's line names its path under /sys/fs/cgroup/memory.
    (tmp_path / "self_cgroup").write_text("12:cpu,cpuacct:/jobs/42\n7:memory:/jobs/42\n")
    job = tmp_path / "cgroup" / "memory" / "jobs" / "42"
    job.mkdir(parents=True)
    (job / "memory.limit_in_bytes").write_text(f"{GIB}\n")
    (job / "memory.usage_in_bytes").write_text(f"{GIB // 4}\n")
    assert memory_module.available_memory("cpu") == GIB - GIB // 4

    # A path that is not there (a container shown its host's path): the roots are read, as before.
    (tmp_path / "self_cgroup").write_text("0::/docker/0123abcd\n")
    fake_memory_files(v2={"memory.max": f"{5 * GIB}\n", "memory.current": f"{GIB}\n"})
    assert memory_module.available_memory("cpu") == 4 * GIB


def test_a_cgroup_limit_refuses_a_load(tmp_path, fake_memory_files):
    cfg = tiny_config(n_layers=6)
    path = write_hf_checkpoint(tmp_path / "hf", cfg, random_state_dict(cfg))
    fake_memory_files(meminfo_kib=64 * 2**20, v2={"memory.max": "100000\n", "memory.current": "50000\n"})
    with pytest.raises(NotEnoughMemoryError, match="cgroup"):
        ll.load(path, index_cache=False, progress=False)


def test_dtype_none_plans_with_the_stored_dtype(tmp_path, monkeypatch):
    cfg = tiny_config(n_layers=6)
    path = write_hf_checkpoint(tmp_path / "hf", cfg, random_state_dict(cfg), dtype=torch.bfloat16)
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    del config["torch_dtype"]  # so the dtype must come from the tensors, not from a hint in the config
    config_file.write_text(json.dumps(config))
    ckpt = ll.Checkpoint(path, index_cache=False)
    assert ckpt.stored_dtype == torch.bfloat16
    assert plan(ckpt, dtype=None).dtype == torch.bfloat16
    assert plan(ckpt, dtype=None).peak_bytes == plan(ckpt, dtype=torch.bfloat16).peak_bytes

    monkeypatch.setattr(plan_module, "available_memory", lambda device: 1000)
    with pytest.raises(NotEnoughMemoryError, match="in bfloat16 needs about") as info:
        ll.load(path, dtype=None, index_cache=False, progress=False)
    assert "dtype=torch.bfloat16 (about" not in str(info.value)  # already as small as it gets
    with pytest.raises(NotEnoughMemoryError, match="in bfloat16 streamed needs about"):
        ll.load(path, dtype=None, stream=True, index_cache=False, progress=False)
    monkeypatch.setattr(plan_module, "available_memory", lambda device: 10**12)
    assert ll.load(path, dtype=None, index_cache=False, progress=False).embed.weight.dtype == torch.bfloat16


def test_load_refuses_what_cannot_fit(tmp_path, monkeypatch):
    cfg = tiny_config(n_layers=6)
    path = write_hf_checkpoint(tmp_path / "hf", cfg, random_state_dict(cfg))
    ckpt = ll.Checkpoint(path, index_cache=False)
    full = plan(ckpt, tokens=0, cache=None).peak_bytes
    streamed = plan(ckpt, tokens=0, cache=None, stream=True).peak_bytes
    assert streamed < full
    monkeypatch.setattr(plan_module, "available_memory", lambda device: (streamed + full) // 2)

    with pytest.raises(NotEnoughMemoryError) as info:
        ll.load(path, index_cache=False, progress=False)
    assert isinstance(info.value, MemoryError) and isinstance(info.value, ValueError)
    message = str(info.value)
    for hint in ("stream=True", "layers=range(0, k)", "dtype=torch.bfloat16", "check_memory=False", "available"):
        assert hint in message

    # Streaming fits in the same memory; check_memory=False loads anyway.
    assert isinstance(ll.load(path, stream=True, index_cache=False, progress=False), StreamedLlama)
    assert not ll.load(path, index_cache=False, progress=False, check_memory=False).blocks["1"].ln1.weight.is_meta

    monkeypatch.setattr(plan_module, "available_memory", lambda device: streamed // 2)
    with pytest.raises(NotEnoughMemoryError, match="streamed needs about"):
        ll.load(path, stream=True, index_cache=False, progress=False)


def test_load_and_plan_take_the_path_then_the_same_keywords(tiny_cfg):
    load_params, plan_params = inspect.signature(ll.load).parameters, inspect.signature(ll.plan).parameters
    for params in (load_params, plan_params):
        first, *rest = params.values()
        assert first.name == "path" and all(param.kind is param.KEYWORD_ONLY for param in rest)
    for name in ("dtype", "device", "layers", "stream", "unembed"):
        assert load_params[name].default == plan_params[name].default, name
    with pytest.raises(TypeError, match="positional"):
        ll.plan(tiny_cfg, torch.bfloat16)  # as ll.load(path, torch.bfloat16): dtype is a keyword in both
