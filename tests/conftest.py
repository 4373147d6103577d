from pathlib import Path

import pytest
import torch
from helpers import tiny_config

from llama_lens.config import LlamaConfig


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
