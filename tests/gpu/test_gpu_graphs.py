"""CUDA-graph replay of the chunk forward gives what the eager forward gives, through layout changes and memory."""

import pytest
import torch

from iamflow_core.config import CacheConfig, DiTConfig
from iamflow_core.models import fused
from iamflow_core.models.dit import CausalWanDiT
from iamflow_core.pipeline import StreamingPipeline
from iamflow_core.presets import DEFAULT_STORY, tiny_models
from iamflow_core.settings import IAMFLOW, MEMFLOW, build_memory, sampler_config

pytestmark = pytest.mark.gpu

CFG = DiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=3, text_dim=64)


@torch.no_grad()
def _stream(model: CausalWanDiT, graphs: bool, device: str = "cuda") -> list[torch.Tensor]:
    """10 chunks of 4 denoising + 1 clean forward (from chunk 5 on one that only writes the cache), then the cache;
    memory frames come in at chunk 5 and go at chunk 8."""
    model.cuda_graphs = graphs
    model._graphs.clear()
    g = torch.Generator(device=device).manual_seed(0)
    cache = model.new_cache(CacheConfig(memory_frames=3), tokens_per_frame=8 * 12)
    cross = model.encode_text(torch.randn(1, 512, 64, device=device, generator=g))
    outs = []
    for chunk in range(10):
        if chunk == 5:
            k, v, _ = cache.frame_kv(1)
            k2, v2, _ = cache.frame_kv(10)
            cache.set_memory(torch.cat([k, k2], 2), torch.cat([v, v2], 2), [1, 10])
        if chunk == 8:
            cache.clear_memory()
        x = torch.randn(1, 16, 3, 16, 24, device=device, generator=g)
        for t in (1000.0, 750.0, 500.0, 250.0):
            outs.append(model.forward_chunk(x, torch.tensor([t], device=device), cross, cache, 3 * chunk))
        if chunk < 5:
            outs.append(model.forward_chunk(x, torch.zeros(1, device=device), cross, cache, 3 * chunk, commit=True))
        else:  # the clean pass that only writes the cache, checked by the cache and what follows
            model.write_chunk(x, torch.zeros(1, device=device), cross, cache, 3 * chunk)
    return [*outs, cache.k.clone(), cache.v.clone()]


def _same(eager: list[torch.Tensor], graphed: list[torch.Tensor]) -> None:
    worst = max((a.float() - b.float()).abs().max().item() for a, b in zip(eager, graphed))
    assert worst <= 1e-3 * max(a.float().abs().max().item() for a in eager)


@pytest.mark.parametrize("compiled", [False, True])
def test_graph_replay_matches_eager(compiled):
    fused.enable(compiled)
    torch.manual_seed(0)
    model = CausalWanDiT(CFG).cuda().to(torch.bfloat16).eval()
    eager = _stream(model, graphs=False)
    graphed = _stream(model, graphs=True)
    assert len(model._graphs) >= 2  # the steady layout, with and without memory
    _same(eager, graphed)
    fused.enable(False)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_graphs_of_a_model_on_a_gpu_that_is_not_the_current_one():
    """A batch rank's or a loader's DiT on cuda:1 while cuda:0 is current: the replays compute, as the eager
    forwards do (a capture on cuda:0's stream recorded nothing and replayed one stale output)."""
    assert torch.cuda.current_device() == 0
    torch.manual_seed(0)
    _stream(CausalWanDiT(CFG).cuda().eval(), graphs=True)  # a capture on cuda:0 first, as a process may have made
    model = CausalWanDiT(CFG).to("cuda:1", torch.bfloat16).eval()
    eager = _stream(model, graphs=False, device="cuda:1")
    graphed = _stream(model, graphs=True, device="cuda:1")
    assert model._graphs.replays > 0
    _same(eager, graphed)


def test_moving_the_model_drops_graphs():
    model = CausalWanDiT(CFG).cuda().eval()
    _stream(model, graphs=True)
    assert len(model._graphs) > 0
    model.to(torch.bfloat16)
    assert len(model._graphs) == 0


@pytest.mark.parametrize("settings", [MEMFLOW, IAMFLOW], ids=["memflow", "identity"])
def test_pipeline_same_video_with_graphs(settings):
    dit, text_encoder, vae = tiny_models(device="cuda")
    config = sampler_config(settings, height=64, width=96)
    runs, replays = [], dit._graphs.replays
    for graphs in (False, True):
        dit.cuda_graphs = graphs
        pipe = StreamingPipeline(dit, text_encoder, vae, compile_kernels=False)
        runs.append([e.frames for e in pipe.run(DEFAULT_STORY, config, build_memory(settings))])
    assert dit._graphs.replays > replays  # the graphed run replayed graphs
    assert len(dit._graphs) == 0  # and released them when the story ended
    for a, b in zip(*runs):
        assert abs(a.astype(int) - b.astype(int)).max() <= 1


def test_captures_in_two_threads_take_turns():
    """The sampler and the verifier capture CUDA graphs from their own threads, at moments neither controls; they
    take turns (`graphs.capture_lock`), and every capture of both succeeds and replays what it captured. Each thread
    works on a stream of its own (`own_stream`, as the pack's threads do): with `torch.cuda.Stream()` for each, the
    pool's round robin gave one thread's capture stream the other's working stream within 30 captures, and that
    capture failed (cudaErrorStreamCaptureUnjoined)."""
    import threading

    from iamflow_core.devices import own_stream
    from iamflow_core.models.graphs import GraphRunner

    failures: list[str] = []

    def capture_many(seed: int) -> None:
        x = torch.randn(512, 512, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
        stream = own_stream("cuda", threading.current_thread())
        stream.wait_stream(torch.cuda.current_stream())  # x is made on this thread's default stream
        with torch.cuda.stream(stream):
            for i in range(30):
                runner = GraphRunner(eager_runs=0)
                out = runner.run(("owner", seed, i), "key", lambda a: torch.tanh(a @ a).sum(0), x)
                if runner.captures != 1 or not torch.allclose(out, torch.tanh(x @ x).sum(0), atol=1e-3, rtol=1e-3):
                    failures.append(f"thread {seed}, capture {i}")

    threads = [threading.Thread(target=capture_many, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_a_capture_in_another_thread_waits_for_compiles():
    """The sampler compiles under the launch lock (new shapes, or functions loaded from the kernel cache) while the
    verifier's thread captures its answer step: a capture takes that lock first, so it waits for the compile, and
    both succeed. Before, a function loaded from the kernel cache during the verifier's capture broke both."""
    import threading

    from iamflow_core.devices import own_stream
    from iamflow_core.models.graphs import GraphRunner

    @fused._fusable
    def shifted_tanh(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) * 2 + 1

    failures: list[str] = []
    # drawn before: CUDA's default generator may not advance while another thread captures ("Offset increment
    # outside graph capture"); the sampler draws its noise from a generator of its own
    inputs = [torch.randn(n * 64, 96, device="cuda") for n in range(1, 7)]

    def compile_shapes() -> None:  # each new shape compiles (or loads from the kernel cache)
        for n, x in enumerate(inputs, 1):
            with fused.launch_guard():
                y = shifted_tanh(x)
            if not torch.allclose(y, torch.tanh(x) * 2 + 1, atol=1e-5):
                failures.append(f"compiled shape {n}")

    x = torch.randn(256, 256, device="cuda")

    def capture_many() -> None:
        stream = own_stream("cuda", threading.current_thread())
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for i in range(30):
                runner = GraphRunner(eager_runs=0)
                out = runner.run(("verifier", i), "key", lambda a: torch.tanh(a @ a).sum(0), x)
                if runner.captures != 1 or not torch.allclose(out, torch.tanh(x @ x).sum(0), atol=1e-3, rtol=1e-3):
                    failures.append(f"capture {i}")

    def recording_errors(work) -> None:
        try:
            work()
        except Exception as e:  # noqa: BLE001 - a thread's error must fail the test, not only print
            failures.append(f"{work.__name__}: {type(e).__name__}: {e}")

    fused.enable(True)
    try:
        threads = [threading.Thread(target=recording_errors, args=(work,)) for work in (compile_shapes, capture_many)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        fused.enable(False)
    assert failures == []


def test_a_capture_neither_waits_for_other_work_nor_frees_cached_memory():
    """A capture in a render leaves the rest of the GPU alone (`graphs.capturing`): it does not wait for work queued
    on other streams (the VAE decode, the verifier's job, the DiT's queue) and keeps PyTorch's cached blocks, which
    the next decode reuses. `torch.cuda.graph` synchronised the GPU and emptied the caches before every capture."""
    import threading

    from iamflow_core.devices import own_stream
    from iamflow_core.models.graphs import GraphRunner

    busy = torch.cuda.Stream()
    with torch.cuda.stream(busy):
        torch.cuda._sleep(3_000_000_000)  # a second or more of another stream's work
        busy_done = torch.cuda.Event()
        busy_done.record()
    cached = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    del cached  # a freed block, kept in PyTorch's cache
    reserved = torch.cuda.memory_reserved()
    mine = own_stream("cuda", threading.current_thread())
    with torch.cuda.stream(mine):
        runner = GraphRunner(eager_runs=0)
        x = torch.randn(256, 256, device="cuda")
        out = runner.run("owner", "key", lambda a: torch.tanh(a @ a).sum(0), x)
        still_busy = not busy_done.query()
        assert runner.captures == 1 and still_busy, "the capture waited for another stream's work"
        assert torch.cuda.memory_reserved() >= reserved, "the capture emptied PyTorch's cache"
        assert torch.allclose(out, torch.tanh(x @ x).sum(0), atol=1e-3, rtol=1e-3)
    busy_done.synchronize()


def test_a_failed_capture_gives_the_thread_its_stream_back():
    """A capture that fails at its end (here: a device-wide wait inside it invalidates it) gives the thread back the
    stream it had (`torch.cuda.graph` left its stream context entered: the thread launched on the capture stream
    from then on)."""
    import threading

    from iamflow_core.devices import own_stream
    from iamflow_core.models.graphs import GraphRunner

    def syncs(a: torch.Tensor) -> torch.Tensor:  # a device-wide wait: not allowed while capturing
        torch.cuda.synchronize()
        return (a * 2).sum()

    mine = own_stream("cuda", threading.current_thread())
    with torch.cuda.stream(mine):
        runner = GraphRunner(eager_runs=0)
        x = torch.ones(64, device="cuda")
        out = runner.run("owner", "key", syncs, x)
        assert runner.captures == 0 and out.item() == 128  # ran eagerly after the failed capture
        assert torch.cuda.current_stream() == mine
