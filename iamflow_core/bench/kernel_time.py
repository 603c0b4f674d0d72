"""GPU time of one profiled piece of work by kind of kernel: the breakdowns `bench dit --profile` and `bench vae`
print."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import torch

# (kind, kernel name fragments): a kernel is the first kind one of whose fragments its lower-cased name contains
Kinds = Sequence[tuple[str, Sequence[str]]]


def kind_of(kernel: str, kinds: Kinds) -> str:
    name = kernel.lower()
    return next((kind for kind, parts in kinds if any(p in name for p in parts)), "other")


def profile_kinds(work: Callable[[], object], kinds: Kinds, top: int = 0) -> dict:
    """Run `work` once under `torch.profiler` (CUDA kernels) and return `summarize` of its kernels."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        work()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    return summarize([(e.key, e.self_device_time_total / 1000, e.count) for e in events], kinds, top)


def summarize(kernels: Sequence[tuple[str, float, int]], kinds: Kinds, top: int = 0) -> dict:
    """(name, ms, calls) of each kernel -> {"profiled_ms": {kind: ms, ..., "total": ms}} (largest kind first), with
    "top_kernels": [[ms, calls, name], ...] of the `top` largest kernels when top > 0."""
    by_kind: dict[str, float] = defaultdict(float)
    for name, ms, _ in kernels:
        by_kind[kind_of(name, kinds)] += ms
    row: dict = {"profiled_ms": {k: round(v, 1) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])}}
    row["profiled_ms"]["total"] = round(sum(by_kind.values()), 1)
    if top:
        largest = sorted(kernels, key=lambda k: -k[1])[:top]
        row["top_kernels"] = [[round(ms, 2), calls, name[:120]] for name, ms, calls in largest]
    return row
