"""The walkthroughs in notebooks/ run top to bottom on the embedded default model and draw their key figure.

Each notebook is stored without outputs and executed here with nbclient, in a kernel running this
interpreter (the "python3" kernel spec resolves to `sys.executable`), so it sees the same llama_lens and the
same `LLAMA_LENS_HOME` as the rest of the suite. The cell tagged "key-figure" must leave an image/png output.
"""

import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = [
    "01_open_a_checkpoint.ipynb",
    "02_logit_lens.ipynb",
    "03_attention.ipynb",
    "04_hooks_and_interventions.ipynb",
    "05_generation.ipynb",
    "06_tuned_lens.ipynb",
    "07_sparse_dictionaries.ipynb",
    "08_attribution_graphs.ipynb",
]
KEY_FIGURE_TAG = "key-figure"
CELL_TIMEOUT_S = 600  # a hung cell fails the test instead of stalling the suite (08 trains 30 transcoders in one cell)


def test_kernel_runs_this_interpreter():
    # Otherwise the notebooks could import a different (or no) llama_lens from another environment.
    command = KernelManager(kernel_name="python3").format_kernel_cmd()
    assert command[0] == sys.executable


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_without_outputs(name):
    notebook = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells, f"{name} has no code"
    for cell in code_cells:
        assert cell.outputs == [] and cell.execution_count is None, f"{name}: clear outputs before saving"
    tagged = [cell for cell in code_cells if KEY_FIGURE_TAG in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: tag exactly one code cell {KEY_FIGURE_TAG!r}, found {len(tagged)}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_and_draws_its_key_figure(name, demo_path, tmp_path, monkeypatch):
    # As in CI: a non-interactive backend in the environment must not stop figures from showing inline.
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # One torch thread in the kernel: on a 2-core machine shared with other processes, torch's default pool of
    # two threads spins against them (measured here: 5.6 min for the five notebooks against 1.5 min with one).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},  # files a notebook writes land in tmp_path
    )
    client.execute()  # raises CellExecutionError, naming the cell, on the first error

    errors = [out for cell in notebook.cells for out in cell.get("outputs", []) if out.output_type == "error"]
    assert not errors
    (key_cell,) = [cell for cell in notebook.cells if KEY_FIGURE_TAG in cell.metadata.get("tags", [])]
    images = [out for out in key_cell.outputs if "image/png" in out.get("data", {})]
    assert images, f"{name}: the {KEY_FIGURE_TAG!r} cell drew no image/png"
