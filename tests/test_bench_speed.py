"""What `bench speed` computes besides timing (the GPU runs themselves are benchmarks): the `--trace` summary on a
hand-made trace (busy shares, the DiT GPU's idle gaps and who ran in them), its refusals, the verifier's jobs
counted for the timed render only, and the story timeline from hand-made chunk times."""

import time

import numpy as np
import pytest

from iamflow_core.bench import speed
from iamflow_core.bench.trace import summarize, traced_render
from iamflow_core.presets import tiny_models


def _span(cat, name, ts, dur, **extra):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": extra.pop("tid", 7), **extra}


TRACE = {
    "traceEvents": [
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "sampler"}},
        _span("kernel", "flash_attn", 0, 4000, args={"device": 0}),
        _span("kernel", "gemm", 4000, 2000, args={"device": 0}),
        # 3 ms idle on the DiT GPU, while the sampler waits on an event and a worker launches
        _span("cuda_runtime", "cudaEventSynchronize", 5500, 3000),
        _span("cpu_op", "aten::conv3d", 6500, 1000, tid=9),
        _span("kernel", "gemm", 9000, 1000, args={"device": 0}),
        _span("kernel", "conv", 1000, 2000, args={"device": 1}),
        _span("kernel", "conv", 2000, 2000, args={"device": 1}),  # overlaps the one before: counted once
        _span("gpu_memcpy", "Memcpy DtoH", 9000, 1000, args={"device": 1}),
    ]
}


def test_the_summary_gives_busy_shares_gaps_and_who_ran_in_them():
    summary = summarize(TRACE, dit_device=0)
    assert summary["devices"]["cuda:0"] == {
        "span_ms": 10.0, "busy_pct": 70.0, "top_kernels_ms": {"flash_attn": 4.0, "gemm": 3.0},
    }  # fmt: skip
    assert summary["devices"]["cuda:1"]["busy_pct"] == pytest.approx(100 * 4 / 9, abs=0.1)  # 3 + 1 ms of 9
    assert summary["dit_idle_ms"] == 3.0
    (gap,) = summary["dit_idle_gaps"]
    assert gap["ms"] == 3.0 and gap["at_ms"] == 6.0 and gap["before"] == "gemm"
    assert gap["threads"] == {"sampler": {"cudaEventSynchronize": 2.5}, "9": {"aten::conv3d": 1.0}}


def _launch(name, ts, correlation, tid=7):
    return _span("cuda_runtime", name, ts, 10, tid=tid, args={"correlation": correlation})


def _gpu(cat, name, ts, dur, correlation, device=0):
    return _span(cat, name, ts, dur, args={"device": device, "correlation": correlation})


def test_the_memory_hooks_cost_is_their_gpu_work_and_the_idle_gpu_while_they_ran():
    hooks = [
        _span("user_annotation", "iamflow.memory.after_chunk", 5800, 1200),
        _span("user_annotation", "iamflow.memory.after_chunk", 5900, 200),  # nested: counted once
        _span("user_annotation", "iamflow.memory.on_frames", 8500, 1000, tid=9),  # the decode's thread
        _span("user_annotation", "something.else", 3000, 1000),  # not the memory's
        _launch("cudaLaunchKernel", 5950, 1),
        _gpu("kernel", "topk", 10000, 500, 1),
        _launch("cudaMemcpyAsync", 6500, 2),
        _gpu("gpu_memcpy", "Memcpy DtoH (Device -> Pinned)", 10500, 800, 2),
        _launch("cudaMemcpyAsync", 6600, 3),
        _gpu("gpu_memcpy", "Memcpy DtoD (Device -> Device)", 11300, 200, 3),
        _launch("cudaLaunchKernel", 3500, 4),  # outside every memory hook
        _gpu("kernel", "gemm", 11500, 300, 4),
        _launch("cudaLaunchKernel", 9000, 5, tid=9),  # inside on_frames, on another GPU
        _gpu("kernel", "resize", 9100, 100, 5, device=1),
        _launch("cudaLaunchKernel", 6800, 6, tid=9),  # at a time the sampler was in a hook, but another thread
        _gpu("kernel", "conv", 11800, 100, 6),
    ]
    summary = summarize({"traceEvents": TRACE["traceEvents"] + hooks}, dit_device=0)
    # the DiT GPU idles 6.0-9.0 ms; the hooks ran 5.8-7.0 and 8.5-9.5 ms: 1.5 ms of that idle time is theirs
    assert summary["memory_hooks"] == {
        "host_ms": 2.2, "kernels_ms": 0.5, "device_copies_ms": 0.2, "host_copies_ms": 0.8, "dit_idle_ms": 1.5,
    }  # fmt: skip
    assert summarize(TRACE, dit_device=0)["memory_hooks"] == {
        "host_ms": 0.0, "kernels_ms": 0.0, "device_copies_ms": 0.0, "host_copies_ms": 0.0, "dit_idle_ms": 0.0,
    }  # fmt: skip


def test_a_gap_names_the_launches_that_spanned_it_and_what_they_launched():
    """A launch call that spans most of an idle gap is listed with the work it launched and whether that work's
    name is new in the window (a kernel met for the first time may be loaded first, which can stall the GPU)."""
    events = [
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "sampler"}},
        _gpu("kernel", "dit_gemm", 0, 1000, 1),
        _span("cuda_runtime", "cudaGraphLaunch", 1200, 4000, args={"correlation": 2}),  # the sampler's replay
        _span("cuda_runtime", "cudaLaunchKernel", 1100, 4100, tid=9, args={"correlation": 3}),  # the verifier's
        _span("cuda_runtime", "cudaLaunchKernel", 1300, 100, tid=9, args={"correlation": 4}),  # short: not listed
        _gpu("kernel", "new_reduce", 5200, 100, 3),
        _gpu("kernel", "dit_gemm", 5300, 1000, 2),
    ]
    (gap,) = summarize({"traceEvents": events}, dit_device=0)["dit_idle_gaps"]
    assert gap["ms"] == 4.2 and gap["before"] == "new_reduce"
    calls = {c.pop("thread"): c for c in gap["stalled_calls"]}
    assert calls == {
        "9": {"call": "cudaLaunchKernel", "ms_in_gap": 4.1, "launched": "new_reduce", "first_in_window": True},
        "sampler": {"call": "cudaGraphLaunch", "ms_in_gap": 4.0, "launched": "dit_gemm", "first_in_window": False},
    }


def test_short_gaps_are_left_out():
    assert summarize(TRACE, dit_device=0, min_gap_us=3500)["dit_idle_gaps"] == []


def test_a_traced_render_needs_the_dit_on_a_gpu():
    dit, te, vae = tiny_models()
    with pytest.raises(ValueError, match="GPU kernels; the DiT is on cpu"):
        traced_render((dit, te, vae), None, None, None, 30, 7)


def test_the_trace_option_is_checked_before_anything_runs(capsys):
    with pytest.raises(SystemExit):
        list(speed.main(["--trace", "99"]))
    assert "--trace 99: give 1 to 20 chunks" in capsys.readouterr().err


def test_the_verifier_counts_are_those_of_the_timed_render():
    from iamflow_core.verify import AsyncVerifier, Verdict

    class Slow:
        def score(self, frames, prompt, entities, check_attributes=False):
            time.sleep(0.05)
            return Verdict((0.5,) * len(frames), {})

    frames = np.zeros((1, 4, 4, 3), np.uint8)
    with AsyncVerifier(Slow(), max_queue=4) as verifier:
        for key in range(3):  # the warm-up's jobs
            verifier.submit(key, frames, "p", [])
        waited, before = speed._drain(verifier)
        assert verifier.pending() == 0 and before["scored"] == 3 and waited >= 0.1
        verifier.submit("timed", frames, "p", [])
        verifier.result("timed", timeout=5)
        counts = speed._jobs_since(before, verifier.stats())
    assert counts["scored"] == 1 and counts["dropped"] == 0 and counts["mean_job_s"] >= 0.05
    assert speed._jobs_since(before, before) == {"scored": 0, "dropped": 0, "mean_job_s": None}


def test_the_story_timeline_splits_the_wall_time_around_the_steady_chunks():
    """30 chunks every 100 ms, the first out at 0.5 s; chunks 1-2 take 200 ms (the cache filling), a switch at chunk
    13 puts 150 ms into the chunk handed out before it (decodes come out a chunk late), chunk 20 takes 130 ms."""
    times, t = [(0, 0.5)], 0.5
    for chunk in range(1, 30):
        t += {1: 0.2, 2: 0.2, 12: 0.25, 20: 0.13}.get(chunk, 0.1)
        times.append((chunk, t))
    timeline = speed.story_timeline(times, (13, 40), wall=t + 0.06)  # a switch past the end is not counted
    assert timeline["steady_chunk_ms"] == pytest.approx(100.0)
    assert timeline["first_chunk_ms"] == pytest.approx(500.0)
    assert timeline["start_extra_ms"] == 200 and timeline["switch_extra_ms"] == 150
    assert timeline["other_extra_ms"] == 30 and timeline["switches"] == 1
    assert timeline["after_last_chunk_ms"] == pytest.approx(60.0)
    assert timeline["slowest"][:4] == [[12, 150], [1, 100], [2, 100], [20, 30]] and len(timeline["slowest"]) == 8
    wall = times[-1][1] + 0.06
    parts = 29 * 100 + 500 + 200 + 150 + 30 + 60
    assert parts == pytest.approx(1000 * wall)  # the parts add up to the wall time
    assert speed.story_timeline(times[:1], (), wall=1.0) == {}
    short = speed.story_timeline(times[:5], (3,), wall=2.0)  # no chunk past the start: no steady time to split by
    assert short == {
        "steady_chunk_ms": None,
        "first_chunk_ms": 500.0,
        "after_last_chunk_ms": pytest.approx(1000 * (2.0 - times[4][1])),
    }
