from pathlib import Path

import pytest
import torch

from llama_lens.config import LlamaConfig


def tiny_config(**changes) -> LlamaConfig:
    """The unit-test model: 2 layers, d_model 64, 4 heads, 2 KV heads, vocab 128."""
    base = dict(
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_head=16,
        d_mlp=128,
        d_vocab=128,
        rope_theta=10000.0,
        norm_eps=1e-5,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_ids=(2,),
    )
    return LlamaConfig(**(base | changes))


@pytest.fixture
def tiny_cfg() -> LlamaConfig:
    return tiny_config()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def demo_path() -> Path:
    """The embedded default checkpoint (SmolLM2-135M-Instruct, HF layout), built on first use in the same
    cache as the README's first command ($LLAMA_LENS_HOME, else the user cache directory), so a newcomer's
    test run reuses the conversion that command made."""
    from llama_lens.demo import demo_model_path

    return demo_model_path()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
