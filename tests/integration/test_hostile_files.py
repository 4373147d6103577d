"""Hostile and damaged files: truncated while read, sized to exhaust memory, stale caches, FIFOs, odd JSON.

Each case ends in an exception naming the file (or a warning), never a signal death, a hang, unbounded
memory or a silently wrong answer. A case that could kill the process runs in a subprocess, so that a
death is a failed test, not a crashed test run.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from support.loader_watch import count_torch_loads
from support.models import tiny_config

from llama_lens.errors import CheckpointError, ConfigError
from llama_lens.files import default_file_mode
from llama_lens.io.checkpoint import Checkpoint
from llama_lens.io.pth import load_pth, read_pth_tensor
from llama_lens.loading import demo
from llama_lens.testing import random_state_dict, write_hf_checkpoint, write_meta_checkpoint

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_LENS_HOME", str(tmp_path / "home"))


def run_victim(script: str, tmp_path: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs `script` in a fresh interpreter (llama_lens from this checkout, the cache under tmp_path)."""
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
        "LLAMA_LENS_HOME": str(tmp_path / "home"),
    }
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=tmp_path,
    )


# ------------------------------------------------------------------------------- 1: truncated while read
TRUNCATE_WHILE_READING = """
    import os, sys, torch
    from support.models import tiny_config
    from llama_lens.io.checkpoint import Checkpoint
    from llama_lens.errors import CheckpointError
    from llama_lens.loading.stream import CheckpointLayerReader
    from llama_lens.io.index import FileStamps
    from llama_lens.testing import random_state_dict, write_meta_checkpoint

    cfg = tiny_config(n_layers=2, d_model=256, n_heads=4, n_kv_heads=2, d_head=64, d_mlp=1024)
    folder = write_meta_checkpoint("ckpt", cfg, random_state_dict(cfg), mp={mp})
    ckpt = Checkpoint(folder, index_cache=False)
    {setup}
    real_check, armed = FileStamps.check, [True]

    def blind_check(self, file_name):
        # The file passes the check, then loses its data before it is read: a race no check can close. The
        # stamps follow the file, so that no later check sees it either: only the read itself can.
        path = real_check(self, file_name)
        if armed[0]:
            armed[0] = False
            os.truncate(path, 4096)
        stat = os.stat(path)
        self.stamps[file_name] = [stat.st_size, stat.st_mtime_ns]
        return path

    FileStamps.check = blind_check
    try:
        {read}
    except CheckpointError as err:
        print("CheckpointError:", err)
        sys.exit(0)
    print("read without an error")
    sys.exit(1)
"""


@pytest.mark.parametrize(
    "how",
    [
        # a full load (state_dict opens the shards once, then reads tensor after tensor)
        (
            "files = ckpt.open_files(lazy=False)",
            "ckpt.read_into({'blocks.1.mlp.up_proj.weight': torch.empty(1024, 256)}, files=files)",
        ),
        # a streamed forward: the layer reader keeps the shards open for its lifetime
        ("reader = CheckpointLayerReader(ckpt, torch.float32, torch.device('cpu'))", "reader(1)"),
    ],
    ids=["full_load", "streamed_layer"],
)
@pytest.mark.parametrize("mp", [1, 2])
def test_a_pth_truncated_while_it_is_read_raises_instead_of_killing_the_process(tmp_path, how, mp):
    setup, read = how
    result = run_victim(TRUNCATE_WHILE_READING.format(mp=mp, setup=setup, read=read), tmp_path)
    assert result.returncode == 0, f"exit {result.returncode} (-7 is SIGBUS)\n{result.stdout}\n{result.stderr}"
    assert "CheckpointError:" in result.stdout and "consolidated.0" in result.stdout
    assert "truncated" in result.stdout


def test_pth_tensors_stored_as_views_read_back_as_stored(tmp_path):
    # Read from their zip records with plain reads: a view into a larger storage, a transposed one, a scalar.
    base = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    stored = {"view": base[2:4], "transposed": base.t(), "scalar": torch.tensor(3.5), "half": base.half()}
    torch.save(stored, tmp_path / "x.pth")
    table = load_pth(tmp_path / "x.pth")
    fd = os.open(tmp_path / "x.pth", os.O_RDONLY)
    try:
        for name, expected in stored.items():
            for dtype in (expected.dtype, torch.float64):
                target = torch.full(expected.shape, float("nan"), dtype=dtype)
                read_pth_tensor(fd, table[name], target, tmp_path / "x.pth", name)
                assert torch.equal(target, expected.to(dtype)), name
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- 2: a config of 10**9 layers
MEMORY_CAPPED = """
    import resource, sys
    import torch  # its libraries mapped before the cap
    from pathlib import Path

    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    in_use = int(status["VmSize"].split()[0]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (in_use + 2 * 2**30, resource.RLIM_INFINITY))  # 2 GiB more at most

    from llama_lens.io.checkpoint import Checkpoint
    from llama_lens.cli import main
    from llama_lens.errors import ConfigError

    try:
        Checkpoint({folder!r}, index_cache=False)
    except ConfigError as err:
        print("ConfigError:", err)
    sys.exit(main(["inspect", {folder!r}]))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="caps memory by Linux's /proc/self/status")
@pytest.mark.parametrize("layout", ["hf", "meta"])
def test_a_config_of_a_billion_layers_is_refused_before_any_per_layer_table(tmp_path, layout):
    cfg = tiny_config()
    if layout == "hf":
        folder = write_hf_checkpoint(tmp_path / "ckpt", cfg, random_state_dict(cfg))
        config_file, key = folder / "config.json", "num_hidden_layers"
    else:
        folder = write_meta_checkpoint(tmp_path / "ckpt", cfg, random_state_dict(cfg))
        config_file, key = folder / "params.json", "n_layers"
    config = json.loads(config_file.read_text())
    config[key] = 10**9
    config_file.write_text(json.dumps(config))

    result = run_victim(MEMORY_CAPPED.format(folder=str(folder)), tmp_path, timeout=60)
    message = f"{config_file}: {key} is 1000000000, but the weights in"
    assert f"ConfigError: {message}" in result.stdout, result.stdout + result.stderr
    assert "hold 2 layer(s)" in result.stdout
    assert result.returncode == 1 and f"llama-lens: error: {message}" in result.stderr, result.stderr


# ---------------------------------------------------------------------------- 8: files that hang a read
OPEN_CHECKPOINT = """
    from llama_lens.io.checkpoint import Checkpoint
    from llama_lens.errors import LlamaLensError

    try:
        Checkpoint({folder!r}, index_cache=False)
    except (LlamaLensError, OSError) as err:
        print(type(err).__name__ + ":", err)
"""


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
@pytest.mark.parametrize("fifo", ["model.safetensors", "model.safetensors.index.json", "config.json"])
def test_a_fifo_in_place_of_a_checkpoint_file_is_refused_not_waited_on(tmp_path, fifo):
    cfg = tiny_config()
    folder = write_hf_checkpoint(tmp_path / "ckpt", cfg, random_state_dict(cfg))
    (folder / fifo).unlink(missing_ok=True)
    os.mkfifo(folder / fifo)
    result = run_victim(OPEN_CHECKPOINT.format(folder=str(folder)), tmp_path, timeout=60)
    expected = f"CheckpointError: {folder / fifo} is a FIFO (named pipe), not a regular file"
    assert expected in result.stdout, result.stdout + result.stderr


def test_a_safetensors_header_length_of_the_whole_file_is_refused_before_reading(tmp_path):
    cfg = tiny_config()
    folder = write_hf_checkpoint(tmp_path / "ckpt", cfg, random_state_dict(cfg))
    shard = folder / "model.safetensors"
    size = 120 * 2**20  # sparse: no disk space used
    with open(shard, "wb") as handle:
        handle.write((size - 8).to_bytes(8, "little"))
        handle.truncate(size)
    with pytest.raises(CheckpointError, match=rf"{shard}: header length {size - 8} is over the 100000000 bytes"):
        Checkpoint(folder, index_cache=False)


# ------------------------------------------------------------------------------ 10: odd JSON in the files
def deeply_nested(depth: int = 100_000) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("where", ["config.json", "model.safetensors.index.json", "safetensors header"])
def test_deeply_nested_json_is_a_damaged_file_not_a_recursion_error(tmp_path, where):
    cfg = tiny_config()
    folder = write_hf_checkpoint(tmp_path / "ckpt", cfg, random_state_dict(cfg), shards=2)
    if where == "safetensors header":
        path = folder / "model-00001-of-00002.safetensors"
        raw = ('{"a": ' + deeply_nested() + "}").encode()
        path.write_bytes(len(raw).to_bytes(8, "little") + raw)
        error = CheckpointError
    else:
        path = folder / where
        path.write_text('{"weight_map": ' + deeply_nested() + "}")
        error = ConfigError if where == "config.json" else CheckpointError
    with pytest.raises(error, match=rf"{path}: .*nested too deeply"):
        Checkpoint(folder, index_cache=False)


@pytest.mark.parametrize("value", [1, None, ["model-00001-of-00002.safetensors"], "../elsewhere.safetensors"])
def test_a_weight_map_entry_that_is_not_a_file_name_is_named(tmp_path, value):
    cfg = tiny_config()
    folder = write_hf_checkpoint(tmp_path / "ckpt", cfg, random_state_dict(cfg), shards=2)
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["model.norm.weight"] = value
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{index_file}: weight_map\['model.norm.weight'\] is "):
        Checkpoint(folder, index_cache=False)


# ---------------------------------------------------------------------------------------- 6: stale caches
def keep_mtime(path: Path):
    """Restores `path`'s modification time after a rewrite (as `cp -p`, a restored backup or a clock set back)."""
    stat = path.stat()
    return lambda: os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_shard_header_rewritten_with_size_and_mtime_kept_rebuilds_the_cached_index(tmp_path):
    cfg = tiny_config()
    state = random_state_dict(cfg)
    folder = write_hf_checkpoint(tmp_path / "ckpt", cfg, state)
    shard = folder / "model.safetensors"
    Checkpoint(folder).state_dict()  # the index is cached
    restore = keep_mtime(shard)
    # The header now names q's bytes o_proj and o's bytes q_proj: same length, same size, same time.
    raw = shard.read_bytes()
    q, o = b"layers.0.self_attn.q_proj", b"layers.0.self_attn.o_proj"
    swap = b"layers.0.self_attn.#_proj"
    shard.write_bytes(raw.replace(q, swap).replace(o, q).replace(swap, o))
    restore()

    loaded = Checkpoint(folder).state_dict()
    assert torch.equal(loaded["blocks.0.attn.q_proj.weight"], state["blocks.0.attn.o_proj.weight"])
    assert torch.equal(loaded["blocks.0.attn.o_proj.weight"], state["blocks.0.attn.q_proj.weight"])


def test_an_edited_but_well_formed_index_cache_is_rebuilt(tmp_path):
    cfg = tiny_config()
    state = random_state_dict(cfg)
    folder = write_hf_checkpoint(tmp_path / "ckpt", cfg, state)
    Checkpoint(folder)
    (cache,) = (tmp_path / "home" / "cache" / "index").glob("*.json")
    record = json.loads(cache.read_text())
    tensors = record["tensors"]
    q, o = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"
    tensors[q][0]["offsets"], tensors[o][0]["offsets"] = tensors[o][0]["offsets"], tensors[q][0]["offsets"]
    cache.write_text(json.dumps(record))

    loaded = Checkpoint(folder).state_dict()
    assert torch.equal(loaded["blocks.0.attn.q_proj.weight"], state["blocks.0.attn.q_proj.weight"])
    assert torch.equal(loaded["blocks.0.attn.o_proj.weight"], state["blocks.0.attn.o_proj.weight"])
    assert json.loads(cache.read_text())["tensors"][q][0]["offsets"] != record["tensors"][q][0]["offsets"]


def test_a_pth_shard_rewritten_with_size_and_mtime_kept_rebuilds_the_cached_index(tmp_path, monkeypatch):
    cfg = tiny_config()
    folder = write_meta_checkpoint(tmp_path / "meta", cfg, random_state_dict(cfg))
    shard = folder / "consolidated.00.pth"
    Checkpoint(folder)
    restore = keep_mtime(shard)
    stored = torch.load(shard, weights_only=True)
    wq, wo = "layers.0.attention.wq.weight", "layers.0.attention.wo.weight"
    stored[wq], stored[wo] = stored[wo], stored[wq]
    size = shard.stat().st_size
    torch.save(stored, shard)
    assert shard.stat().st_size == size
    restore()

    opened = count_torch_loads(monkeypatch)
    Checkpoint(folder)
    assert opened == {"consolidated.00.pth": 1}  # the table read again: the zip's records changed


# ------------------------------------------------------------------------------ 5b, 10: the built demo model
@pytest.fixture
def fake_demo_build(tmp_path, monkeypatch):
    """The demo build with a tiny conversion (a safetensors shard and config.json); returns the builds made."""
    monkeypatch.delenv("LLAMA_LENS_DEMO_WHEEL", raising=False)
    monkeypatch.delenv("LLAMA_LENS_DEMO_GGUF", raising=False)
    builds = []

    def write(gguf_path, out_dir, *, license_text=None, progress=True):
        builds.append(out_dir)
        save_file({"w": torch.arange(1000, dtype=torch.float32)}, out_dir / "model.safetensors")
        (out_dir / "config.json").write_text('{"fresh": true}')

    monkeypatch.setattr(demo, "_fetch_gguf", lambda workdir, say: (tmp_path / "fake.gguf", "license"))
    monkeypatch.setattr(demo, "write_checkpoint", write)
    return builds


@pytest.mark.parametrize("damage", ["overwritten", "bit_flipped_with_mtime_kept", "removed"])
def test_a_damaged_demo_model_is_rebuilt_with_a_warning(fake_demo_build, monkeypatch, damage):
    path = demo.demo_model_path(progress=False)
    assert demo.demo_model_path(progress=False) == path and len(fake_demo_build) == 1  # checked, then trusted
    shard = path / "model.safetensors"
    good = shard.read_bytes()
    if damage == "overwritten":
        shard.write_bytes(b"\0" * len(good))
    elif damage == "bit_flipped_with_mtime_kept":
        restore = keep_mtime(shard)
        with open(shard, "r+b") as handle:
            handle.seek(len(good) - 1)
            handle.write(bytes([good[-1] ^ 1]))
        restore()
    else:
        shard.unlink()
    monkeypatch.setattr(demo, "_VERIFIED_HERE", {}, raising=False)  # as a new process would start

    with pytest.warns(UserWarning, match=rf"{shard} does not match the sha256 recorded when the default model"):
        assert demo.demo_model_path(progress=False) == path
    assert len(fake_demo_build) == 2 and shard.read_bytes() == good
    demo.demo_model_path(progress=False)
    assert len(fake_demo_build) == 2


def test_a_demo_model_built_before_hashes_were_recorded_is_checked_from_then_on(fake_demo_build, monkeypatch):
    path = demo.demo_model_path(progress=False)
    (path / ".complete").write_text(f"gguf_sha256={demo.GGUF_SHA256}\nformat={demo.FORMAT_VERSION}\n")  # as built
    (path / demo.VERIFIED_FILE).unlink()
    (path / "model.safetensors").chmod(0o600)  # as older builds wrote it
    demo._VERIFIED_HERE.clear()
    demo.demo_model_path(progress=False)  # adopted as it is, readable by others
    assert len(fake_demo_build) == 1
    assert stat.S_IMODE((path / "model.safetensors").stat().st_mode) == default_file_mode()
    hashed = []
    sha256_of = demo.file_sha256
    monkeypatch.setattr(demo, "file_sha256", lambda file: hashed.append(file.name) or sha256_of(file))
    demo.demo_model_path(progress=False)  # the chmod's new ctime was recorded: trusted without hashing
    assert len(fake_demo_build) == 1 and hashed == []
    (path / "model.safetensors").write_bytes(b"\0" * 4096)
    with pytest.warns(UserWarning, match="does not match the sha256"):
        demo.demo_model_path(progress=False)
    assert len(fake_demo_build) == 2


def test_demo_files_are_readable_by_whoever_shares_the_cache(fake_demo_build):
    path = demo.demo_model_path(progress=False)
    for file in [path / "model.safetensors", path / "config.json"]:
        assert stat.S_IMODE(file.stat().st_mode) == default_file_mode(), file  # 0o644 under umask 022


def test_written_checkpoints_get_the_umask_mode_not_0600(tmp_path):
    cfg = tiny_config()
    folder = write_hf_checkpoint(tmp_path / "ckpt", cfg, random_state_dict(cfg), shards=2)
    for shard in folder.glob("*.safetensors"):
        assert stat.S_IMODE(shard.stat().st_mode) == default_file_mode(), shard


# ----------------------------------------------------------------------------------- 5b: NaN in the weights
@pytest.mark.parametrize("layout", ["hf", "meta_mp2"])
def test_nan_and_inf_weights_are_warned_about_as_they_are_read(tmp_path, layout):
    cfg = tiny_config()
    state = random_state_dict(cfg)
    state["blocks.1.mlp.down_proj.weight"][3, :2] = float("nan")
    state["blocks.1.mlp.down_proj.weight"][5, 7] = float("-inf")
    if layout == "hf":
        folder = write_hf_checkpoint(tmp_path / "ckpt", cfg, state)
        where = rf"'model.layers.1.mlp.down_proj.weight' in {folder / 'model.safetensors'}"
    else:
        folder = write_meta_checkpoint(tmp_path / "ckpt", cfg, state, mp=2)
        where = rf"'layers.1.feed_forward.w2.weight' in {folder} \(consolidated.00.pth, consolidated.01.pth\)"
    ckpt = Checkpoint(folder)
    with pytest.warns(RuntimeWarning, match=rf"tensor {where} holds 2 NaN and 1 inf value\(s\) of 8192") as caught:
        loaded = ckpt.state_dict(dtype=torch.bfloat16)
    assert len(caught) == 1  # the other tensors are finite
    assert loaded["blocks.1.mlp.down_proj.weight"].isnan().sum() == 2

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ckpt.state_dict(ckpt.params_for([0]))  # finite: silent


@pytest.mark.parametrize("layout", ["hf", "meta_mp2"])
def test_nan_in_embedding_rows_read_on_demand_is_warned_about(tmp_path, layout):
    import llama_lens as ll

    cfg = tiny_config()
    state = random_state_dict(cfg)
    state["embed.weight"][7, 1] = float("nan")
    if layout == "hf":
        folder = write_hf_checkpoint(tmp_path / "ckpt", cfg, state)
    else:
        folder = write_meta_checkpoint(tmp_path / "ckpt", cfg, state, mp=2)
    model = ll.load(folder, stream=True, unembed="stream")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.tensor([[1, 2, 3]]))  # rows without NaN: silent
    with pytest.warns(RuntimeWarning, match=r"rows 7\.\.8 of tensor .* holds 1 NaN"):
        model(torch.tensor([[1, 7]]))


# ------------------------------------------------------------------------------------- 10: smaller ones
def test_a_literal_tilde_in_llama_lens_home_means_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.setenv("LLAMA_LENS_HOME", "~/lens")  # quoted in a shell profile: not expanded there
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config()
    ckpt = Checkpoint(write_hf_checkpoint(tmp_path / "ckpt", cfg, random_state_dict(cfg)))
    assert ckpt.index_cache_path.parent == tmp_path / "user" / "lens" / "cache" / "index"
    assert ckpt.index_cache_path.is_file() and not (tmp_path / "~").exists()
    assert demo.cache_dir() == tmp_path / "user" / "lens"


def test_every_torch_load_in_the_package_is_weights_only():
    # A .pth is a pickle: loaded with weights_only=False it could run any code. Checked on the source, so a new
    # call cannot slip in without it.
    import ast

    calls = []
    for source in (REPO / "llama_lens").rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in {"torch.load", "load"}:
                keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
                if ast.unparse(node.func) == "torch.load" or "weights_only" in keywords:
                    calls.append((source.name, keywords.get("weights_only")))
    assert calls and all(value == "True" for _, value in calls), calls


def test_a_meta_folder_takes_only_a_llama2_tokenizer_model_from_the_folder_above(tmp_path):
    from support.corpus import WORDS
    from support.meta_reference import train_llama2_style
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    from llama_lens.loading.load import load

    cfg = tiny_config()
    folder = write_meta_checkpoint(tmp_path / "models" / "mine", cfg, random_state_dict(cfg))
    unrelated = Tokenizer(WordLevel({f"w{i}": i for i in range(1000)}, unk_token="w0"))
    unrelated.save(str(tmp_path / "models" / "tokenizer.json"))  # another model's, beside the folder
    assert Checkpoint(folder).tokenizer_path is None and load(folder).tokenizer is None

    # Llama 2's layout: one tokenizer.model beside the model folders, found there...
    sentences = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 8
    (tmp_path / "models" / "tokenizer.model").write_bytes(train_llama2_style(sentences, vocab_size=300))
    assert Checkpoint(folder).tokenizer_path == tmp_path / "models" / "tokenizer.model"
    # ...but one with more tokens than the model has rows is another model's: warned about when loaded, not used.
    with pytest.warns(UserWarning, match=r"tokenizer.model \(one folder up from the checkpoint\) has 300 tokens"):
        assert load(folder).tokenizer is None


def test_swapped_model_parallel_shards_are_refused(tmp_path):
    cfg = tiny_config()
    state = random_state_dict(cfg)
    folder = write_meta_checkpoint(tmp_path / "ckpt", cfg, state, mp=2)
    Checkpoint(folder)  # indexed and cached as written
    first, second = folder / "consolidated.00.pth", folder / "consolidated.01.pth"
    first.rename(folder / "swap.pth")
    second.rename(first)
    (folder / "swap.pth").rename(second)
    # Without the check both load: the embedding's d_model columns and the output's vocabulary rows come out
    # permuted (heads and MLP units are permuted consistently, which changes nothing).
    with pytest.raises(CheckpointError, match=rf"{first} was saved as consolidated.01.pth: the model-parallel"):
        Checkpoint(folder)

    # A shard saved to an open file (no name inside) or copied under its own name is taken as it is.
    ranks = [torch.load(path, weights_only=True) for path in (second, first)]
    for rank, stored in enumerate(ranks):
        with open(folder / f"consolidated.{rank:02d}.pth", "wb") as handle:
            torch.save(stored, handle)
    loaded = Checkpoint(folder, index_cache=False).state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in state.items())
