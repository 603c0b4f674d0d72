"""`GraphRunner` without a GPU: when it captures, and that a capture holds the process-wide capture lock and waits
for other threads' launches and compiles."""

import threading
from contextlib import nullcontext

import pytest
import torch

from iamflow_core.models import graphs
from iamflow_core.models.graphs import GraphRunner


class _FakeStream:
    device = torch.device("cpu")
    cuda_stream = 0

    def wait_stream(self, other):
        pass


class _FakeGraph:
    held: list[bool] = []  # for each capture begun: whether `graphs.capture_lock` was held

    def capture_begin(self, *pool, capture_error_mode="global"):
        assert capture_error_mode == "thread_local"
        self.held.append(graphs.capture_lock.locked())

    def capture_end(self):
        pass

    def pool(self):
        return None

    def replay(self):
        pass


def fake_captures(monkeypatch) -> list[bool]:
    """Make CUDA graphs captures that record, in the returned list, whether `graphs.capture_lock` was held when they
    began (no GPU needed)."""
    held: list[bool] = []
    monkeypatch.setattr(_FakeGraph, "held", held)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: nullcontext())
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 << 30, 80 << 30))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _FakeStream())
    monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: None)
    return held


def test_a_capture_holds_the_process_wide_capture_lock(monkeypatch):
    """The DiT's forward is captured under `graphs.capture_lock`, as the verifier's answer step is: PyTorch's CUDA
    graphs expect one capture at a time in a process, and two that overlapped in a render failed together."""
    held = fake_captures(monkeypatch)
    monkeypatch.setattr(torch.cuda, "device", lambda device: nullcontext())
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None, priority=0: _FakeStream())
    runner = GraphRunner(eager_runs=1)
    x = torch.ones(3)
    assert torch.equal(runner.run("cache", "layout", lambda a: a * 2, x), x * 2)  # eager
    assert held == []
    runner.run("cache", "layout", lambda a: a * 2, x)  # captured (the fake graph replays nothing)
    assert held == [True] and runner.captures == 1 and runner.capture_s > 0 and not graphs.capture_lock.locked()


def test_a_capture_waits_for_another_threads_launches_and_compiles(monkeypatch):
    """With compiled kernels on, a capture takes the launch lock before `capture_lock`: a capture in the verifier's
    thread waits while the sampler launches or compiles (a compile beside a capture broke both in a render), and
    the sampler's own captures, made under that lock, go on."""
    from iamflow_core.models import fused

    held = fake_captures(monkeypatch)
    monkeypatch.setattr(fused, "_enabled", True)
    sampler_launching, captured = threading.Event(), threading.Event()
    release = threading.Event()

    def sampler() -> None:
        with fused.launch_guard():
            sampler_launching.set()
            release.wait(10)

    def verifier() -> None:
        with graphs.capturing(_FakeGraph(), None, _FakeStream()):
            captured.set()

    threads = [threading.Thread(target=sampler), threading.Thread(target=verifier)]
    threads[0].start()
    assert sampler_launching.wait(10)
    threads[1].start()
    assert not captured.wait(0.3)  # the capture waits for the sampler's launches
    release.set()
    assert captured.wait(10)
    for t in threads:
        t.join(10)
    # the sampler's own capture, inside its launches: the lock is re-entrant
    with fused.launch_guard(), graphs.capturing(_FakeGraph(), None, _FakeStream()):
        pass
    assert held == [True, True] and not graphs.capture_lock.locked()


def test_a_capture_empties_the_cache_only_where_the_gpu_is_nearly_full(monkeypatch):
    """A capture leaves PyTorch's cached memory alone (the VAE decode reuses it; emptying it synchronises), except on
    a GPU with less than `ROOM_FOR_A_CAPTURE` free, where the graph's pool needs the room."""
    fake_captures(monkeypatch)
    emptied: list[bool] = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    for free, expected in ((80 << 30, []), (graphs.ROOM_FOR_A_CAPTURE - 1, [True])):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, free=free: (free, 80 << 30))
        emptied.clear()
        with graphs.capturing(_FakeGraph(), None, _FakeStream()):
            pass
        assert emptied == expected


def test_a_capture_broken_inside_ends_and_raises_what_broke_it(monkeypatch):
    """An error inside a capture ends the capture (its own error, that the capture was invalidated, says less) and is
    raised as it was; the runner then runs the forward eagerly."""
    fake_captures(monkeypatch)
    ended: list[bool] = []

    def end_invalidated(self):
        ended.append(True)
        raise RuntimeError("operation failed due to a previous error during capture")

    monkeypatch.setattr(_FakeGraph, "capture_end", end_invalidated)
    with pytest.raises(RuntimeError, match="not permitted"), graphs.capturing(_FakeGraph(), None, _FakeStream()):
        raise RuntimeError("operation not permitted when stream is capturing")
    assert ended == [True] and not graphs.capture_lock.locked()
    runner = GraphRunner(eager_runs=0)
    calls: list[int] = []

    def breaks_captures(a):
        calls.append(1)
        if len(calls) == 2:  # the capture's run (the first is the real run before it)
            raise RuntimeError("operation not permitted when stream is capturing")
        return a * 2

    monkeypatch.setattr(torch.cuda, "device", lambda device: nullcontext())
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None, priority=0: _FakeStream())
    x = torch.ones(3)
    assert torch.equal(runner.run("cache", "layout", breaks_captures, x), x * 2)
    assert runner.captures == 0 and len(calls) == 3
