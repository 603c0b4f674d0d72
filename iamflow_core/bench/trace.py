"""Where steady chunks spend their time on each GPU: a `torch.profiler` window over a few chunks of a render.

`traced_render` renders a story as the CLI does, profiles chunks [first, first + count) and stops the render after
them; `summarize` turns the profiler's trace into numbers: each device's busy share of the window, the idle gaps of
the DiT's GPU with what every thread ran meanwhile (a gap with no GPU work queued is the host being late: a device
sync, a lock, the GIL) and the CUDA calls that spanned most of each gap with the kernels they launched, the kernels
that take the most time, and what the memory policy's hooks cost the DiT's GPU. `bench speed --trace N` adds this
to each row.

The memory's cost on the critical path is counted from the profiler ranges the pipeline puts around each hook
(`pipeline.MEMORY_HOOK`): the GPU work launched inside them (matched by the profiler's correlation ids: kernels and
copies between device buffers, which take the GPU's time whatever stream they run on; copies to and from host
memory run on the copy engines beside the DiT's kernels and are listed apart), and the DiT GPU's idle time while a
hook ran (the host late because of the policy's Python or a wait inside it).
"""

from __future__ import annotations

import bisect
import json
import tempfile
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from ..pipeline import MEMORY_HOOK, StreamingPipeline
from ..render import render_story

_GPU_WORK = ("kernel", "gpu_memcpy", "gpu_memset")
_HOST_WORK = ("cpu_op", "cuda_runtime", "user_annotation", "python_function")


def summarize(trace: dict[str, Any], dit_device: int, gaps: int = 5, min_gap_us: float = 500.0) -> dict[str, Any]:
    """Numbers from a Chrome trace (`torch.profiler` export): per device, its busy share of its own span; the
    `gaps` longest idle gaps (≥ `min_gap_us`) on `dit_device` with the host work that overlapped each, per thread;
    the top kernels per device."""
    spans = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    work: dict[int, list[tuple[float, float, str]]] = defaultdict(list)
    for e in spans:
        if e.get("cat") in _GPU_WORK and e.get("args", {}).get("device") is not None:
            work[int(e["args"]["device"])].append((float(e["ts"]), float(e["ts"]) + float(e["dur"]), e["name"]))
    host = [e for e in spans if e.get("cat") in _HOST_WORK]
    names = {e["tid"]: e["args"]["name"] for e in trace.get("traceEvents", [])
             if e.get("ph") == "M" and e.get("name") == "thread_name" and "tid" in e}  # fmt: skip
    devices, idle, dit_gaps = {}, [], []
    for device, items in sorted(work.items()):
        items.sort()
        start, end = items[0][0], max(e for _, e, _ in items)
        busy, reached = 0.0, start
        for s, e, name in items:
            if s > reached and device == dit_device:
                dit_gaps.append((reached, s))
                if s - reached >= min_gap_us:
                    idle.append((s - reached, reached, s, name))
            busy += max(0.0, e - max(s, reached))
            reached = max(reached, e)
        kernels: dict[str, float] = defaultdict(float)
        for s, e, name in items:
            kernels[name[:80]] += e - s
        top = sorted(kernels.items(), key=lambda kv: -kv[1])[:8]
        devices[f"cuda:{device}"] = {
            "span_ms": round((end - start) / 1e3, 1), "busy_pct": round(100 * busy / max(end - start, 1e-9), 1),
            "top_kernels_ms": {name: round(us / 1e3, 1) for name, us in top},
        }  # fmt: skip
    first = min((items[0][0] for items in work.values()), default=0.0)
    launched = _launched_work(spans)
    report = []
    for length, s, e, before in sorted(idle, reverse=True)[:gaps]:
        threads: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        stalled = []
        for h in host:
            overlap = min(e, h["ts"] + h["dur"]) - max(s, h["ts"])
            if overlap > 0:
                thread = str(names.get(h["tid"], h["tid"]))
                threads[thread][h["name"][:60]] += overlap
                if h.get("cat") == "cuda_runtime" and overlap >= (e - s) / 2:
                    stalled.append(_stalled_call(h, thread, overlap, launched))
        report.append({
            "ms": round(length / 1e3, 2), "at_ms": round((s - first) / 1e3, 1), "before": before[:60],
            "threads": {t: {n: round(us / 1e3, 2) for n, us in sorted(ops.items(), key=lambda kv: -kv[1])[:3]}
                        for t, ops in threads.items()},
            "stalled_calls": stalled,
        })  # fmt: skip
    return {"devices": devices, "dit_idle_gaps": report,
            "dit_idle_ms": round(sum(g[0] for g in idle) / 1e3, 1),
            "memory_hooks": _memory_hooks(spans, dit_device, dit_gaps)}  # fmt: skip


def _launched_work(spans: list[dict]) -> dict[Any, tuple[str, bool]]:
    """Per correlation id, the first GPU work a host call launched: its name, and whether it is the first work of
    that name in the window (a kernel met for the first time may have to be loaded first)."""
    by_id: dict[Any, tuple[float, str]] = {}
    seen: dict[str, float] = {}
    for e in spans:
        if e.get("cat") not in _GPU_WORK:
            continue
        ts, name, correlation = float(e["ts"]), e["name"], e.get("args", {}).get("correlation")
        seen[name] = min(seen.get(name, ts), ts)
        if correlation is not None and (correlation not in by_id or ts < by_id[correlation][0]):
            by_id[correlation] = (ts, name)
    return {c: (name, seen[name] == ts) for c, (ts, name) in by_id.items()}


def _stalled_call(call: dict, thread: str, overlap: float, launched: dict) -> dict[str, Any]:
    """A CUDA runtime call that spans most of an idle gap of the DiT's GPU, with the work it launched."""
    name, first = launched.get(call.get("args", {}).get("correlation"), (None, None))
    return {
        "thread": thread, "call": call["name"][:40], "ms_in_gap": round(overlap / 1e3, 2),
        "launched": name[:80] if name else None, "first_in_window": first,
    }  # fmt: skip


def _union(ranges: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for s, e in sorted(ranges):
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def _overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Total length where two sorted lists of disjoint ranges overlap."""
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def _memory_hooks(spans: list[dict], dit_device: int, dit_gaps: list[tuple[float, float]]) -> dict[str, float]:
    """The memory policy's hooks in the window (milliseconds): their host time; the GPU work launched inside them on
    the DiT's GPU (kernels and device copies, which take its time; host copies, which the copy engines run beside
    it); and the DiT GPU's idle time while a hook ran."""
    hooks: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for e in spans:
        if e.get("cat") == "user_annotation" and e["name"].startswith(MEMORY_HOOK):
            hooks[e["tid"]].append((float(e["ts"]), float(e["ts"]) + float(e["dur"])))
    hooks = {tid: _union(ranges) for tid, ranges in hooks.items()}
    starts = {tid: [s for s, _ in ranges] for tid, ranges in hooks.items()}

    def inside(e: dict) -> bool:
        ranges = hooks.get(e["tid"])
        if not ranges:
            return False
        i = bisect.bisect_right(starts[e["tid"]], float(e["ts"])) - 1
        return i >= 0 and float(e["ts"]) <= ranges[i][1]

    launched = {e["args"]["correlation"] for e in spans
                if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {}) and inside(e)}  # fmt: skip
    ms = {"host_ms": 0.0, "kernels_ms": 0.0, "device_copies_ms": 0.0, "host_copies_ms": 0.0, "dit_idle_ms": 0.0}
    for e in spans:
        args = e.get("args", {})
        ours = args.get("correlation") in launched and args.get("device") == dit_device
        if e.get("cat") not in _GPU_WORK or not ours:
            continue
        if e["cat"] != "gpu_memcpy":
            ms["kernels_ms"] += float(e["dur"])
        elif "DtoH" in e["name"] or "HtoD" in e["name"]:
            ms["host_copies_ms"] += float(e["dur"])
        else:
            ms["device_copies_ms"] += float(e["dur"])
    every_hook = _union([r for ranges in hooks.values() for r in ranges])
    ms["host_ms"] = sum(e - s for s, e in every_hook)
    ms["dit_idle_ms"] = _overlap(every_hook, dit_gaps)
    return {name: round(us / 1e3, 2) for name, us in ms.items()}


def traced_render(
    models, story, config, memory, first: int, count: int, save_to: Path | None = None, **pipeline
) -> dict[str, Any]:  # fmt: skip
    """Render `story` (as `render_story` does, no file) with a profiler over chunks [first, first + count), stop
    after them, and `summarize` the window. save_to: also keep the Chrome trace there (open it in Perfetto).
    pipeline: `StreamingPipeline` options (the clean pass's device)."""
    dit = models[0]
    if dit.device.type != "cuda":
        raise ValueError(f"a traced render profiles GPU kernels; the DiT is on {dit.device}")
    stop, state = threading.Event(), {}

    def on_chunk(event, record) -> None:
        if event.index == first - 1:  # the window starts with the next chunk's work
            state["profiler"] = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            )
            state["profiler"].__enter__()
        elif event.index == first + count - 1 and "profiler" in state:
            for i in range(torch.cuda.device_count()):
                torch.cuda.synchronize(i)
            state["profiler"].__exit__(None, None, None)
            stop.set()

    if first < 1 or count < 1:
        raise ValueError(f"trace window first={first}, count={count}: the first chunk is 1 or later, count 1 or more")
    try:
        render_story(StreamingPipeline(*models, **pipeline), story, config, memory, on_chunk=on_chunk, cancel=stop,
                     keep_frames=False, keep_latents=False)  # fmt: skip
    finally:
        if "profiler" in state and not stop.is_set():  # the story ended inside the window
            state["profiler"].__exit__(None, None, None)
    if "profiler" not in state:
        raise ValueError(f"the story has fewer than {first} chunks; no trace window")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(save_to) if save_to is not None else Path(tmp) / "trace.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        state["profiler"].export_chrome_trace(str(path))
        summary = summarize(json.loads(path.read_text()), dit.device.index or 0)
    hooks = summary["memory_hooks"]
    # per chunk, what the policy costs the DiT's GPU: its kernels and device copies, and the GPU idle while it ran
    summary["memory_critical_ms_per_chunk"] = round(
        (hooks["kernels_ms"] + hooks["device_copies_ms"] + hooks["dit_idle_ms"]) / count, 2
    )
    return {"window": [first, first + count], **summary}
