"""Helpers that watch what the loader does: torch.load calls and shard pages resident in memory."""

import collections
import os
from pathlib import Path

import torch


def count_torch_loads(monkeypatch) -> collections.Counter:
    """file name -> torch.load calls from now on (each unpickles a whole .pth shard)."""
    opened = collections.Counter()
    torch_load = torch.load

    def counting(path, *args, **kwargs):
        opened[os.path.basename(path)] += 1
        return torch_load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting)
    return opened


def shard_pages_in_memory(folder) -> int:
    """Bytes of the files in `folder` mapped into this process and present in its memory (Rss in smaps)."""
    total, counting = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's first line: address perms offset dev inode [path]
            counting = len(fields) >= 6 and fields[5].startswith(str(folder))
        elif counting and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total
