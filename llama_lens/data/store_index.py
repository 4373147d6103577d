"""An activation store's index.json read back, every value checked before it is used.

A value of the wrong type, a file name that leads out of the store's folder (absolute, `..`, a symlink out) or a
missing key is an ArgumentError naming index.json and the key, not a KeyError or TypeError from deep inside the
dataset. Indexes written before shard digests existed have no "size"/"sha256" per shard: their shards are still
checked against their own headers, only not against a digest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ArgumentError
from .safe_files import inside


def read_index(path: Path) -> dict[str, Any]:
    """The index at `path`, checked; each shard gains "path" (inside the store's folder) and has "size" and
    "sha256" (None when the index predates them).

    Raises:
        ArgumentError (a ValueError): not JSON, a missing key or a value of the wrong type (named), a shard file
            outside the folder.
    """
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise ArgumentError(f"{path} is not a JSON index ({err}); rerun the dataset run to rewrite it") from None
    _check(isinstance(index, dict), path, "the top level", index, "an object")
    hook_names = _key(index, "hook_names", path)
    _check(isinstance(hook_names, list) and all(isinstance(n, str) for n in hook_names), path, "hook_names",
           hook_names, "a list of hook names")  # fmt: skip
    shapes = _key(index, "shapes", path)
    _check(isinstance(shapes, dict), path, "shapes", shapes, "an object")
    for name in hook_names:
        shape = _key(shapes, name, path, prefix="shapes.")
        _check(isinstance(shape, list) and all(_count(d) for d in shape), path, f"shapes.{name}", shape,
               "a list of non-negative ints")  # fmt: skip
    shards = _key(index, "shards", path)
    _check(isinstance(shards, list), path, "shards", shards, "a list")
    checked = []
    for k, shard in enumerate(shards):
        key = f"shards[{k}]"
        _check(isinstance(shard, dict), path, key, shard, "an object")
        file = inside(path.parent, _key(shard, "file", path, prefix=f"{key}."), source=path, key=f"{key}.file")
        size, sha = shard.get("size"), shard.get("sha256")
        _check(size is None or _count(size), path, f"{key}.size", size, "a byte count")
        _check(sha is None or isinstance(sha, str), path, f"{key}.sha256", sha, "a hex digest")
        checked.append(shard | {"path": file, "size": size, "sha256": sha})
    return index | {"shards": checked}


def _key(mapping: dict[str, Any], key: str, path: Path, *, prefix: str = "") -> Any:
    if key not in mapping:
        raise ArgumentError(f"{path} has no key {prefix}{key!r}; rerun the dataset run to rewrite it")
    return mapping[key]


def _check(ok: bool, path: Path, key: str, value: Any, wanted: str) -> None:
    if not ok:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise ArgumentError(f"{path}: {key} is {type(value).__name__} {shown}, not {wanted}")


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
