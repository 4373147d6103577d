"""out/manifest.json: a run's parameters, written by its first call and matched by every rerun into the folder.

A rerun with the same parameters resumes the run (finished shards are skipped); one with other parameters is
refused, naming the keys that differ.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..data.safe_files import write_atomic
from ..data.store import STORE_FOLDER
from ..errors import ManifestMismatchError
from .shards import SHARD_FOLDER

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1


def jsonable(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples as lists, other objects as their str)."""
    return json.loads(json.dumps(value, default=str))


def describe_tokenizer(tokenizer: Any) -> str | None:
    """A tokenizer as the manifest records it: its absolute path, or its class and source."""
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        return None if tokenizer is None else str(Path(tokenizer).resolve())
    kind = type(tokenizer)
    return f"{kind.__module__}.{kind.__qualname__}({getattr(tokenizer, 'source', '')})"


def load_info(load_kwargs: dict[str, Any]) -> dict[str, Any]:
    """`ll.load`'s arguments as the manifest records them."""
    info = {k: (list(v) if k == "layers" and v is not None else v) for k, v in load_kwargs.items() if k != "tokenizer"}
    if "tokenizer" in load_kwargs:
        info["tokenizer"] = describe_tokenizer(load_kwargs["tokenizer"])
    return jsonable(info)


def check_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """Writes out/manifest.json, or checks that the one there matches (a rerun resumes only the same run).

    Raises:
        ManifestMismatchError: the folder holds a run with other parameters; the differences are named.
    """
    path = out / MANIFEST_FILE
    manifest = jsonable(manifest)
    if path.exists():
        found, wanted = _flat(read_manifest(path)), _flat(manifest)
        differ = [k for k in sorted(set(found) | set(wanted)) if found.get(k) != wanted.get(k)]
        if differ:
            details = "; ".join(f"{k}: {_short(found.get(k))} there, {_short(wanted.get(k))} now" for k in differ[:5])
            raise ManifestMismatchError(
                f"{out} holds a run with other parameters ({path.name}: {details}); a rerun into the same folder "
                "must repeat the run's parameters to resume it: choose another out= folder, or delete this one"
            )
        return
    write_atomic(path, lambda temporary: temporary.write_text(json.dumps(manifest, indent=2)))


def read_manifest(path: Path) -> dict[str, Any]:
    """out/manifest.json as written.

    Raises:
        ManifestMismatchError (a ValueError): a file that is not a JSON object (named), so not this run's.
    """
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        found = err
    if not isinstance(found, dict):
        kind = type(found).__name__
        what = f"not JSON ({found})" if isinstance(found, Exception) else f"a JSON {kind}, not an object"
        raise ManifestMismatchError(
            f"{path} is {what}: the folder does not hold a dataset run; choose another out= folder, or delete it"
        )
    return found


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as {"task_params.top_k": 5, ...}, so a mismatch names the very key."""
    if not isinstance(value, dict) or not value:
        return {prefix: value}
    flat = {}
    for key, item in value.items():
        flat |= _flat(item, f"{prefix}.{key}" if prefix else key)
    return flat


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def remove_partial_files(out: Path) -> None:
    """Deletes the temporary files of a killed run (never read: only renamed files count)."""
    for folder in (out / SHARD_FOLDER, out / STORE_FOLDER):
        if folder.is_dir():
            for path in folder.glob(".*.tmp-*"):
                path.unlink(missing_ok=True)
