"""Meta `.pth` shards re-packed by another tool: torch.load reads them, but their tensors are not where a plain
read would find them. Each is refused by name rather than loaded as garbage (NaN logits)."""

from __future__ import annotations

import zipfile

import pytest
import torch

from llama_lens.errors import CheckpointError
from llama_lens.io.pth import load_pth, read_pth_tensor


def saved(tmp_path):
    path = tmp_path / "consolidated.00.pth"
    state = {"a": torch.randn(4, 4), "b": torch.randn(3)}
    torch.save(state, path)
    return path, state


def repack(source, target, *, compression, reverse=False):
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", compression) as dst:
        infos = src.infolist()
        for info in reversed(infos) if reverse else infos:
            dst.writestr(info.filename, src.read(info.filename))
    return target


def test_a_shard_torch_saved_reads_back_exactly(tmp_path):
    path, state = saved(tmp_path)
    meta = load_pth(path)
    with open(path, "rb") as handle:
        for name, tensor in meta.items():
            out = torch.empty_like(tensor, device="cpu")
            read_pth_tensor(handle.fileno(), tensor, out, path, name)
            assert torch.equal(out, state[name])


@pytest.mark.parametrize(
    ("compression", "reverse", "message"),
    [
        (zipfile.ZIP_DEFLATED, False, r"is in zip record '.*data/\d', which is compressed"),
        (zipfile.ZIP_STORED, True, r"does not start a zip record"),
        (zipfile.ZIP_DEFLATED, True, r"compressed|does not start a zip record"),
    ],
    ids=["deflated", "stored-reordered", "deflated-reordered"],
)
def test_a_repacked_shard_is_refused_by_name_though_torch_reads_it(tmp_path, compression, reverse, message):
    path, state = saved(tmp_path)
    repacked = repack(path, tmp_path / "repacked.pth", compression=compression, reverse=reverse)
    assert torch.equal(torch.load(repacked, weights_only=True)["a"], state["a"])  # a valid file, for torch
    with pytest.raises(CheckpointError, match=r"repacked\.pth: tensor '[ab]' " + f"(.*{message})"):
        load_pth(repacked)
