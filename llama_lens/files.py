"""Checks on a checkpoint's files and what is read from them, so that a hostile or damaged file is named at once.

- Only regular files are opened: a FIFO named `model.safetensors` would block `open()` forever, and a device
  such as /dev/zero would never end.
- JSON nested too deeply for the parser is a damaged file, named as such, not a RecursionError traceback.
- A weight holding NaN or inf (a damaged file, a bad conversion) is warned about as it is read: otherwise every
  result downstream is NaN with nothing to say where it came from.
- Files we write get the mode `open()` would give them, and appear whole or not at all (`atomic_path`): a save
  that fails half way (disk full, killed) leaves the file it was replacing as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, LlamaLensError

_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a directory",
}


def require_regular_file(path: Path) -> os.stat_result:
    """The file's stat, after checking that it is a regular file (a symlink to one is fine).

    Raises:
        FileNotFoundError: it does not exist.
        CheckpointError: it is a FIFO, device, socket or directory, which a read would block on or never end.
    """
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        kind = _KINDS.get(stat.S_IFMT(info.st_mode), "not a regular file")
        raise CheckpointError(
            f"{path} is {kind}, not a regular file; llama_lens reads checkpoint files only from regular files "
            "(reading this one could block forever): put the file itself there"
        )
    return info


def read_json_file(path: Path, error: type[LlamaLensError] = CheckpointError) -> Any:
    """The JSON value in a regular file.

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointError: not a regular file (see `require_regular_file`).
        error: not valid UTF-8 JSON, or nested too deeply to parse.
    """
    require_regular_file(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path}: not valid JSON ({err})") from None
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply to parse; the file is damaged, download it again") from None


def default_file_mode() -> int:
    """The mode a new file gets from `open()`: 0o666 less the process's umask (0o644 under the usual 022)."""
    try:  # Linux 4.7+: read without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)  # elsewhere: set and restored at once
    os.umask(umask)
    return 0o666 & ~umask


def set_default_file_mode(path: Path) -> None:
    """Gives `path` the mode `open()` would have: safetensors writes its files 0o600 (owner only), which
    locks everyone else out of a cache or checkpoint folder shared through group or world permissions."""
    os.chmod(path, default_file_mode())


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write the new file to; renamed over `path` when the block ends.

    The rename is atomic (same folder, same file system): a reader sees the old file or the new one, never half of
    one, and a write that fails half way (an exception, a full disk) removes the temporary and leaves `path` as it
    was. The new file gets the mode `open()` would give it (not mkstemp's 0o600).

    Example:
        with atomic_path(folder / "params.safetensors") as temporary:
            save_file(tensors, str(temporary))
    """
    path = Path(path)
    # The temporary file keeps the final name, in a fresh folder beside it: torch.save records the name it was
    # given inside the zip ("consolidated.00/data.pkl"), and Meta shards are ordered by it.
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    temporary = folder / path.name
    try:
        yield temporary
        set_default_file_mode(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
        folder.rmdir()


def file_sha256(path: str | Path) -> tuple[int, str]:
    """(bytes, SHA-256 hex digest) of a file, read in blocks by `hashlib.file_digest`: no copy of the file in
    memory, and the size is what was hashed."""
    with open(path, "rb") as handle:
        sha = hashlib.file_digest(handle, "sha256")
        return handle.tell(), sha.hexdigest()


def write_text_atomic(path: str | Path, text: str) -> None:
    """Writes `text` (UTF-8) to `path` whole or not at all (see `atomic_path`)."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def warn_if_not_finite(tensor: torch.Tensor, what: str) -> None:
    """Warns when `tensor` (a weight just read) holds NaN or inf, naming `what` ("tensor 'x' in file").

    One pass of `torch.aminmax` (NaN propagates into both, inf into one), with no temporary the size of the
    tensor: about half the time of copying it (`scripts/bench_finite_check.py`). The count is only taken once
    something was found.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    low, high = torch.aminmax(tensor)
    if bool(torch.isfinite(low) & torch.isfinite(high)):
        return
    n_nan = int(torch.isnan(tensor).sum())
    n_inf = int(torch.isinf(tensor).sum())
    warnings.warn(
        f"{what} holds {n_nan} NaN and {n_inf} inf value(s) of {tensor.numel()}: every result that uses it will be "
        "NaN or inf; the file may be damaged (download it again) or the conversion that wrote it broken",
        RuntimeWarning,
        stacklevel=4,
    )
