"""Which files make up a checkpoint, and in which layout ("hf", "meta" or "gguf").

`find_weight_files` looks at a folder (or the .gguf file given) and returns its layout, its weight files in
order and the files whose changes invalidate the cached tensor index; `open_reader` builds the reader of that
format (`reader.CheckpointReader`). Finding the files reads no tensor: the checks are on names, the shard index
and the saved names of Meta's model-parallel shards, so a folder missing a shard fails before any header is read.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError, MissingFileError
from ..files import read_json_file, require_regular_file
from .gguf import GGUFReader
from .names import HF_INDEX_FILE, HF_SINGLE_FILE
from .pth import PthReader, saved_name
from .reader import CheckpointReader, WeightLayout
from .safetensors import SafetensorsReader


def open_reader(folder: Path, gguf_file: Path | None = None) -> CheckpointReader:
    """The reader of the checkpoint in `folder` (or of `gguf_file`), of the format its files are in.

    Raises:
        MissingFileError, CheckpointError: as `find_weight_files`; CheckpointError for a corrupt GGUF header.
    """
    layout = find_weight_files(folder, gguf_file)
    reader = {"hf": SafetensorsReader, "meta": PthReader, "gguf": GGUFReader}[layout.format]
    return reader(layout)


def find_weight_files(folder: Path, gguf_file: Path | None = None) -> WeightLayout:
    """Finds the weight files of the checkpoint in `folder` and the layout they are in.

    Looks, in this order, for an HF shard index, `model.safetensors`, any `*.safetensors`, Meta's
    `consolidated.*.pth` shards, and one `.gguf` file.

    Args:
        folder: the checkpoint folder (absolute).
        gguf_file: the .gguf file the caller named, if it named one; it is then the checkpoint.

    Returns:
        The layout, the weight files and the files to stamp.

    Raises:
        MissingFileError: no weight files, or a shard the index names is missing.
        CheckpointError: a bad shard index, a missing or renamed Meta shard, several .gguf files, or a weight
            file that is not a regular file.
    """
    if gguf_file is not None:
        return WeightLayout(folder, "gguf", [gguf_file], [gguf_file])
    index_file = folder / HF_INDEX_FILE
    if index_file.exists():
        weight_map = read_weight_map(index_file)
        names = sorted(set(weight_map.values()))
        for name in names:
            if not (folder / name).exists():
                raise MissingFileError(
                    f"shard {name!r} named by {index_file} is missing from {folder}; download it again"
                )
            require_regular_file(folder / name)
        files = [folder / name for name in names]
        return WeightLayout(folder, "hf", files, [*files, index_file], weight_map)
    if (folder / HF_SINGLE_FILE).exists():
        require_regular_file(folder / HF_SINGLE_FILE)
        return WeightLayout(folder, "hf", [folder / HF_SINGLE_FILE], [folder / HF_SINGLE_FILE])
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        for shard in shards:
            require_regular_file(shard)
        return WeightLayout(folder, "hf", shards, shards)
    pths = sorted(folder.glob("consolidated.*.pth"), key=lambda p: p.name)
    if pths:
        numbers = [p.name.split(".")[1] for p in pths]
        for expected, number in enumerate(numbers):
            if not number.isdigit() or int(number) != expected:
                raise CheckpointError(
                    f"{folder}: model-parallel shard consolidated.{expected:02d}.pth is missing "
                    f"(found {[p.name for p in pths]}); download it again"
                )
        for pth in pths:
            require_regular_file(pth)
        check_shard_order(pths)
        return WeightLayout(folder, "meta", pths, pths)
    ggufs = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(ggufs) == 1:
        return WeightLayout(folder, "gguf", ggufs, ggufs)
    if ggufs:
        raise CheckpointError(
            f"{folder} holds {len(ggufs)} GGUF files ({', '.join(p.name for p in ggufs[:5])}); pass the one to "
            f"open, e.g. {str(ggufs[0])!r}"
        )
    others = sorted(p.name for p in folder.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt"})
    hint = f" Found {others}, which llama_lens does not read; convert to safetensors." if others else ""
    raise MissingFileError(
        f"no weight files in {folder}: expected {HF_SINGLE_FILE}, model-*-of-*.safetensors with "
        f"{HF_INDEX_FILE}, Meta's consolidated.00.pth, or one .gguf file.{hint}"
    )


def check_shard_order(pths: list[Path]) -> None:
    """Refuses model-parallel shards renamed into another order.

    A shard's rank is its file name alone, and shards swapped (00 <-> 01) load and run: their split weights
    join in the wrong order, which permutes the embedding's columns or rows and the output's rows (a consistent
    permutation of heads or MLP units would change nothing, so no shape or value tells). The one record of the
    order is the name each file was saved under (`saved_name`), when torch.save was given the file's path, as
    Meta's code and ours do.

    Args:
        pths: the `consolidated.NN.pth` files, in rank order.

    Raises:
        CheckpointError: a file was saved under another shard's name.
    """
    for pth in pths:
        saved = saved_name(pth)
        if saved is not None and saved != pth.stem and saved.startswith("consolidated."):
            raise CheckpointError(
                f"{pth} was saved as {saved}.pth: the model-parallel shards were renamed, and a shard's rank is "
                f"its file name, so their weights would join in the wrong order; give each file its saved name"
            )


def read_weight_map(index_file: Path) -> dict[str, str]:
    """The shard index's "weight_map" (tensor name -> file name), checked entry by entry.

    Args:
        index_file: `model.safetensors.index.json`.

    Raises:
        CheckpointError: not a JSON object with a "weight_map", or an entry that is not a file name in the same
            folder.
    """
    index = read_json_file(index_file)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_file}: not a valid shard index (expected a JSON object with a 'weight_map')")
    for name, file_name in weight_map.items():
        if not isinstance(file_name, str) or not file_name or Path(file_name).name != file_name:
            raise CheckpointError(
                f"{index_file}: weight_map[{name!r}] is {file_name!r}, expected the name of a shard file in "
                "the same folder (a string such as 'model-00001-of-00002.safetensors')"
            )
    return weight_map
