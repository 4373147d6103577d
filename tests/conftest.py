import os
from pathlib import Path

import pytest
import torch

from llama_lens.config import LlamaConfig


def tiny_config(**changes) -> LlamaConfig:
    """The unit-test model: 2 layers, d_model 64, 4 heads, 2 KV heads, vocab 128."""
    base = dict(
        d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_head=16, d_mlp=128, d_vocab=128,
        rope_theta=10000.0, norm_eps=1e-5, max_position_embeddings=256, bos_token_id=1, eos_token_ids=(2,),
    )
    return LlamaConfig(**(base | changes))


@pytest.fixture
def tiny_cfg() -> LlamaConfig:
    return tiny_config()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


REPO_ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    # The embedded default model is converted once per checkout and reused by later runs (and by notebooks
    # the suite executes, which inherit the environment); LLAMA_LENS_HOME set by the caller wins.
    os.environ.setdefault("LLAMA_LENS_HOME", str(REPO_ROOT / ".cache" / "llama_lens"))


@pytest.fixture(scope="session")
def demo_path() -> Path:
    """The embedded default checkpoint (SmolLM2-135M-Instruct, HF layout), built on first use."""
    from llama_lens.demo import demo_model_path

    return demo_model_path()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
