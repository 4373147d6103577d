"""Files the dataset runner and the activation store write and trust again: written atomically, each with a digest
record, and found only inside their own folder.

- `write_atomic(path, write)`: `write` fills a temporary file in a hidden folder beside `path`
  (`files.atomic_path`), renamed into place only when whole (a killed run leaves no half file under a final name).
- With `record=True` the temporary file's size and SHA-256 are written first to a hidden record beside it,
  `.<name>.digest` (hidden, so readers of the folder such as `pd.read_parquet(folder)` skip it). A file under its
  final name that does not match its record was damaged after it was written (`matches_record`): a rerun
  recomputes it rather than trusting it.
- `inside(folder, name, source=..., key=...)`: the path of a file an index names, refused when it leads out of
  the folder (an absolute path, `..`, a symlink out), so an index cannot serve another folder's files as its own.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ArgumentError
from ..files import atomic_path, file_sha256, write_text_atomic


def record_name(path: Path) -> Path:
    """Where `path`'s size and digest are recorded."""
    return path.with_name(f".{path.name}.digest")


def digest(path: Path) -> dict[str, Any]:
    """{"size": bytes, "sha256": hex} of a file (`files.file_sha256`)."""
    size, sha256 = file_sha256(path)
    return {"size": size, "sha256": sha256}


def write_atomic(path: Path, write: Callable[[Path], Any], *, record: bool = False) -> dict[str, Any] | None:
    """Calls `write(temporary)` and renames the temporary file to `path` (`files.atomic_path`); with `record`,
    first writes the digest record (so a file under its final name always has one). The temporary file is removed
    when `write` fails.

    Returns:
        The digest with `record`, else None.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    found = None
    with atomic_path(path) as temporary:
        write(temporary)
        if record:
            found = digest(temporary)
            write_text_atomic(record_name(path), json.dumps(found))
    return found


def read_record(path: Path) -> dict[str, Any] | None:
    """The digest recorded for `path`, or None when there is none or it is not a well-formed record."""
    try:
        found = json.loads(record_name(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(found, dict) or not is_digest(found):
        return None
    return {"size": found["size"], "sha256": found["sha256"]}


def is_digest(value: Any) -> bool:
    size, sha = value.get("size"), value.get("sha256")
    return isinstance(size, int) and not isinstance(size, bool) and size >= 0 and isinstance(sha, str)


def matches_record(path: Path) -> bool:
    """Whether `path` exists and is the file its digest record describes (size first: a cut file costs no read)."""
    found = read_record(path)
    if found is None or not path.is_file() or path.stat().st_size != found["size"]:
        return False
    return digest(path)["sha256"] == found["sha256"]


def inside(folder: Path, name: Any, *, source: Path, key: str) -> Path:
    """`folder / name` for a file name read from `source` (at `key`), refused unless it stays inside `folder`.

    Raises:
        ArgumentError (a ValueError): a name that is not a plain relative file name, or leads out of the folder.
    """
    if not isinstance(name, str) or not name:
        raise ArgumentError(f"{source}: {key} must be a file name (text), got {type(name).__name__} {name!r}")
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts or "\\" in name:
        raise ArgumentError(
            f"{source}: {key} = {name!r} is not inside {folder}: a store's files are named relative to its folder"
        )
    path = folder / relative
    root = folder.resolve()
    if not path.resolve().is_relative_to(root):  # a symlink out of the folder
        raise ArgumentError(
            f"{source}: {key} = {name!r} leads out of {folder} (to {path.resolve()}): refusing a foreign file"
        )
    return path
