"""Counting a model's forward and backward passes, through the hooks of one hook point."""

from __future__ import annotations


def pass_counting_hooks(hook_name: str = "ln_final.hook_normalized") -> tuple[dict[str, int], dict[str, list]]:
    """(counts, hooks): `with model.hooks(**hooks):` adds one to counts["fwd"] for every forward pass through
    `hook_name` and to counts["bwd"] for every backward pass; reset with `counts.update(fwd=0, bwd=0)`."""
    counts = {"fwd": 0, "bwd": 0}

    def count(key: str):
        def fn(tensor, *, hook) -> None:
            counts[key] += 1

        return fn

    return counts, {"fwd_hooks": [(hook_name, count("fwd"))], "bwd_hooks": [(hook_name, count("bwd"))]}
