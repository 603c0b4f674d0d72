"""`GraphRunner` without a GPU: when it captures, and that a capture holds the process-wide capture lock and waits
for other threads' launches and compiles."""

import threading
from contextlib import contextmanager, nullcontext

import torch

from iamflow_core.models import graphs
from iamflow_core.models.graphs import GraphRunner


class _FakeStream:
    device = torch.device("cpu")
    cuda_stream = 0

    def wait_stream(self, other):
        pass


class _FakeGraph:
    def pool(self):
        return None

    def replay(self):
        pass


def fake_captures(monkeypatch) -> list[bool]:
    """Make `torch.cuda.graph` a capture that records, in the returned list, whether `graphs.capture_lock` was held
    when it began (no GPU needed)."""
    held: list[bool] = []

    @contextmanager
    def fake_capture(graph, **kwargs):
        held.append(graphs.capture_lock.locked())
        yield

    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_capture)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _FakeStream())
    monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: None)
    return held


def test_a_capture_holds_the_process_wide_capture_lock(monkeypatch):
    """The DiT's forward is captured under `graphs.capture_lock`, as the verifier's answer step is: PyTorch's CUDA
    graphs expect one capture at a time in a process, and two that overlapped in a render failed together."""
    held = fake_captures(monkeypatch)
    monkeypatch.setattr(torch.cuda, "device", lambda device: nullcontext())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: nullcontext())
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None, priority=0: _FakeStream())
    runner = GraphRunner(eager_runs=1)
    x = torch.ones(3)
    assert torch.equal(runner.run("cache", "layout", lambda a: a * 2, x), x * 2)  # eager
    assert held == []
    runner.run("cache", "layout", lambda a: a * 2, x)  # captured (the fake graph replays nothing)
    assert held == [True] and runner.captures == 1 and not graphs.capture_lock.locked()


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
        with graphs.capturing(None, None, _FakeStream()):
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
    with fused.launch_guard(), graphs.capturing(None, None, _FakeStream()):
        pass
    assert held == [True, True] and not graphs.capture_lock.locked()
