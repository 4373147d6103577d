"""Memory figures the forward pass needs before it runs: bytes per hook point, one pass's working memory, and
the memory available on a device now (MemAvailable, the cgroup's room, CUDA's free memory).

They use only a LlamaConfig, so the hooked forward (`run_with_cache`'s guard) and the loader's planner
(loading/plan.py) share them without the model knowing about files.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config import LlamaConfig

GIB = 2**30

# Where `available_memory` and `process_memory` look on Linux, read at each call (tests point them at fake files).
MEMINFO = Path("/proc/meminfo")
CGROUP_V2 = Path("/sys/fs/cgroup")  # memory.max, memory.current, memory.stat
CGROUP_V1 = Path("/sys/fs/cgroup/memory")  # memory.limit_in_bytes, memory.usage_in_bytes, memory.stat
PROC_SELF_CGROUP = Path("/proc/self/cgroup")  # which cgroup this process is in, under those roots
PROC_SELF_STATM = Path("/proc/self/statm")  # this process's resident pages (process_memory)


def process_memory() -> int | None:
    """This process's resident memory now (bytes): /proc/self/statm, else psutil; None where neither works."""
    try:
        resident_pages = int(PROC_SELF_STATM.read_text().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)


def _working_width(cfg: LlamaConfig) -> int:
    """Values per position alive at once inside one block: the residual stream and its normalized copies,
    q/k/v before and after RoPE, z and the attention output, the MLP's gate, up, their product and output."""
    qkv = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.d_head
    return 6 * cfg.d_model + 2 * qkv + cfg.n_heads * cfg.d_head + 4 * cfg.d_mlp


def _cached_width(cfg: LlamaConfig) -> int:
    """Values per position of every hook point of one block, but the attention scores and pattern (and the
    two float32 norm scales, counted apart)."""
    q, kv = cfg.n_heads * cfg.d_head, cfg.n_kv_heads * cfg.d_head
    resid = 6 * cfg.d_model  # resid_pre, resid_mid, resid_post, attn_out, mlp_out, mlp.hook_in
    norms = 2 * cfg.d_model  # ln1 / ln2 hook_normalized
    attn = q + 2 * kv + (q + kv) + q + cfg.n_heads * cfg.d_model  # q, k, v, rot_q, rot_k, z, result
    return resid + norms + attn + 3 * cfg.d_mlp  # + mlp hook_pre, hook_pre_linear, hook_post


def hook_point_nbytes(cfg: LlamaConfig, name: str, *, batch: int, pos: int, itemsize: int) -> int:
    """Bytes of one hook point's activation for `batch` prompts of `pos` positions, in a dtype of `itemsize`
    bytes (the norm scales are float32 whatever the dtype); what `run_with_cache` checks before it runs."""
    point = name.rsplit(".", 1)[-1]
    q, kv = cfg.n_heads * cfg.d_head, cfg.n_kv_heads * cfg.d_head
    if point == "hook_scale":
        return batch * pos * 4
    widths = {
        "hook_attn_scores": cfg.n_heads * pos,  # [batch, n_heads, q_pos, k_pos]
        "hook_pattern": cfg.n_heads * pos,
        "hook_q": q,
        "hook_rot_q": q,
        "hook_z": q,
        "hook_k": kv,
        "hook_v": kv,
        "hook_rot_k": kv,
        "hook_result": cfg.n_heads * cfg.d_model,
        "hook_pre": cfg.d_mlp,
        "hook_pre_linear": cfg.d_mlp,
        "hook_post": cfg.d_mlp,
        "hook_logits": cfg.d_vocab,
    }
    return batch * pos * widths.get(point, cfg.d_model) * itemsize  # the rest are residual-stream wide


def forward_working_nbytes(cfg: LlamaConfig, *, batch: int, pos: int, itemsize: int, written_out: bool) -> int:
    """Working memory of one forward pass beside what it keeps, as `plan` counts it: one layer's activations,
    the logits with their float32 softmax, and with `written_out` attention one layer's scores, float32 softmax
    and pattern."""
    rows = batch * pos
    working = rows * _working_width(cfg) * itemsize + rows * cfg.d_vocab * (itemsize + 4)
    if written_out:
        working += batch * cfg.n_heads * pos**2 * (2 * itemsize + 4)
    return working


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes that can be allocated on `device` now; None when unknown.

    CUDA: the device's free memory. CPU: the least of MemAvailable in /proc/meminfo (psutil where there is no
    /proc) and, in a container whose cgroup has a memory limit, the room left under it (see `_cgroup_available`).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    known = [n for n in (_meminfo_available(), _cgroup_available()) if n is not None]
    return min(known) if known else None


def _meminfo_available() -> int | None:
    try:
        lines = MEMINFO.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def _cgroup_available() -> int | None:
    """The least room (limit less usage) of this process's cgroup and every cgroup above it, v2 or v1; None
    where none of them has a limit.

    A container sees its own cgroup at the root. A process in a nested cgroup (a systemd slice or scope, a job
    scheduler's cgroup) is found through /proc/self/cgroup, and every cgroup on the way up counts: a parent's
    limit covers its children's usage too.

    Usage counts the page cache, which the kernel reclaims before it refuses memory; its inactive part
    (`inactive_file` in memory.stat, what `docker stats` subtracts too) is counted as free. Without that,
    reading a checkpoint once would make the next load look as if it did not fit.
    """
    own = _own_cgroups()
    room = []
    for version, root, limit_file, usage_file, inactive_key in (
        ("v2", CGROUP_V2, "memory.max", "memory.current", "inactive_file"),
        ("v1", CGROUP_V1, "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
    ):
        for folder in _folders_up_to(root, own.get(version, "")):
            try:
                limit = int((folder / limit_file).read_text())  # v2 writes "max" for no limit: skipped
                usage = int((folder / usage_file).read_text())
            except (OSError, ValueError):
                continue
            inactive = 0
            try:
                for line in (folder / "memory.stat").read_text().splitlines():
                    key, _, value = line.partition(" ")
                    if key == inactive_key:
                        inactive = int(value)
            except (OSError, ValueError):
                pass
            room.append(max(limit - max(usage - inactive, 0), 0))
    return min(room, default=None)


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup path per hierarchy, from /proc/self/cgroup (one line each, `id:controllers:path`):
    "v2" from the `0::/path` line, "v1" from the line whose controllers include memory."""
    try:
        lines = PROC_SELF_CGROUP.read_text().splitlines()
    except OSError:
        return {}
    own = {}
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            own["v2"] = path.strip()
        elif "memory" in controllers.split(","):
            own["v1"] = path.strip()
    return own


def _folders_up_to(root: Path, path: str) -> list[Path]:
    """The folder of cgroup `path` under `root` and every folder above it up to `root` itself, those that exist.
    A path not there (a container that sees its host's path for a cgroup mounted as its own root) leaves the
    root alone, as before."""
    folders = [root / path.lstrip("/")]
    while folders[-1] != root and root in folders[-1].parents:
        folders.append(folders[-1].parent)
    return [folder for folder in folders if folder.is_dir()] or [root]


# Work that may go to disk (an attribution graph's rows under offload="auto") goes there when it would take more
# than this share of the memory available now; ll.plan predicts the same choice with the same function.
OFFLOAD_SHARE = 0.25


def exceeds_offload_share(nbytes: int, device: torch.device | str = "cpu") -> bool:
    """Whether `nbytes` is more than OFFLOAD_SHARE of the memory available on `device` now (False when that is
    unknown)."""
    available = available_memory(device)
    return available is not None and nbytes > OFFLOAD_SHARE * available
