"""The identity memory's copies between the GPU and host memory run beside the sampling and stay in order."""

import numpy as np
import pytest
import torch

from iamflow_core.memory import archive
from iamflow_core.memory.archive import ArchivedFrame, HostValues, to_device, to_host
from iamflow_core.pipeline import StreamingPipeline
from iamflow_core.presets import DEFAULT_STORY, tiny_models
from iamflow_core.settings import IAMFLOW, build_memory, sampler_config

pytestmark = pytest.mark.gpu


def test_a_host_copy_holds_the_values_of_when_it_was_made():
    """The copy runs on the copy stream: it must wait for the work that made the tensor, and the tensor's memory
    must not be reused under it (the archive copies a clone that nothing writes again)."""
    x = torch.zeros(64 * 2**20 // 2, dtype=torch.bfloat16, device="cuda")
    torch.cuda._sleep(10**8)  # keep the stream busy, so the copy is queued behind the add
    x.add_(3)  # queued: the copy must see it
    host = to_host(x)
    del x
    torch.empty(64 * 2**20 // 2, dtype=torch.bfloat16, device="cuda").fill_(9)  # may reuse x's memory
    archive.copy_stream(torch.device("cuda")).synchronize()
    assert host.is_pinned() and bool((host == 3).all())


def test_host_copies_land_in_exactly_sized_page_locked_buffers_reused_after_the_frame_goes():
    """Each copy takes a buffer of its own size (PyTorch's pinned allocator would round 144 MB up to 256 MB), and a
    frame's buffer serves the next frame once the first is dropped, its values those of the new frame."""
    import gc

    pool = archive.HostBuffers()
    x = torch.full((3, 1, 1000, 2, 64), 2.0, dtype=torch.bfloat16, device="cuda")
    first = pool.lend(x.shape, x.dtype)
    assert first.is_pinned() and first.untyped_storage().nbytes() == x.nbytes
    first.copy_(x, non_blocking=True)
    torch.cuda.synchronize()
    assert bool((first == 2).all())
    address = first.data_ptr()
    del first
    gc.collect()
    second = pool.lend(x.shape, x.dtype)
    second.copy_(x + 1, non_blocking=True)
    torch.cuda.synchronize()
    assert second.data_ptr() == address and pool.made(x.shape, x.dtype) == 1 and bool((second == 3).all())
    host = to_host(x)  # the archive's own pool
    archive.copy_stream(torch.device("cuda")).synchronize()
    assert host.is_pinned() and host.untyped_storage().nbytes() == x.nbytes and bool((host == 2).all())


def test_the_identity_memory_reserves_host_buffers_for_its_archive_when_a_story_starts():
    from iamflow_core.memory.identity import RESERVED_FRAMES

    dit, text_encoder, vae = tiny_models(device="cuda")
    config = sampler_config(IAMFLOW, height=64, width=96)
    pipe = StreamingPipeline(dit, text_encoder, vae, compile_kernels=False)
    events = list(pipe.run(DEFAULT_STORY, config, build_memory(IAMFLOW)))
    assert any("archived" in e.memory for e in events)
    archive.host_buffers.wait()
    _, ph, pw = dit.cfg.patch_size
    cache = dit.new_cache(config.cache, tokens_per_frame=(64 // 8 // ph) * (96 // 8 // pw))  # as the pipeline's
    frame = cache.k[:, :, : cache.tokens_per_frame]
    assert archive.host_buffers.made(frame.shape, frame.dtype) >= 2 * RESERVED_FRAMES  # tiny frames: the cap


def test_frames_come_back_to_the_gpu_after_their_host_copies_landed():
    k = torch.randn(2, 1, 16, 2, 8, device="cuda")
    frames = [ArchivedFrame(i, i, 0, (1,), 0.0, 0.5, to_host(k + i), to_host(k - i)) for i in range(3)]
    back = to_device(frames, "k", k, {id(frames[1]): k + 10})  # one taken from the GPU instead
    expected = torch.cat([k, k + 10, k + 2], dim=2)
    assert torch.equal(back, expected)


def test_scores_reach_the_host_without_waiting_for_later_work():
    scores = torch.arange(4.0, device="cuda")
    values = HostValues(scores * 2)
    scores.fill_(-1)
    assert values.tolist() == [0.0, 2.0, 4.0, 6.0]


def test_the_identity_memory_gives_the_same_video_with_copies_in_turn(monkeypatch):
    """Copies on the copy stream and GPU copies reused at a refresh give the video of plain blocking copies."""
    dit, text_encoder, vae = tiny_models(device="cuda")
    config = sampler_config(IAMFLOW, height=64, width=96)

    def run() -> list[np.ndarray]:
        pipe = StreamingPipeline(dit, text_encoder, vae, compile_kernels=False)
        return [e.frames for e in pipe.run(DEFAULT_STORY, config, build_memory(IAMFLOW))]

    overlapped = run()
    blocking_copy = archive.to_device

    def plain_to_device(frames, name, like, on_device=None):
        return blocking_copy(frames, name, like)  # every frame from its host copy

    monkeypatch.setattr(archive, "to_host", lambda t: t.cpu())
    monkeypatch.setattr("iamflow_core.memory.identity.to_device", plain_to_device)
    blocking = run()
    assert len(overlapped) == len(blocking)
    for a, b in zip(overlapped, blocking):
        assert np.array_equal(a, b)


def test_the_identity_memory_never_waits_for_the_gpu_between_switches(monkeypatch):
    """Within a prompt the memory's per-chunk work (text scores, frame choice, archive copies, refreshes) only
    queues GPU work: a hidden sync would let the GPU run dry before every chunk (it cost 2-GPU renders ~15 %)."""
    from iamflow_core.memory.identity import IdentityMemory
    from iamflow_core.story import plan_chunks
    from tests.test_memory import RETURN_REGISTRY, RETURN_STORY

    dit, text_encoder, vae = tiny_models(device="cuda")
    config = sampler_config(IAMFLOW, height=64, width=96)
    switches = plan_chunks(RETURN_STORY, chunk_frames=config.cache.chunk_frames).switch_chunks
    checked = []

    def no_sync(hook):
        def run(self, ctx):
            if ctx.chunk == 0 or ctx.chunk in switches:
                return hook(self, ctx)
            torch.cuda.set_sync_debug_mode("error")
            try:
                return hook(self, ctx)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                checked.append(ctx.chunk)

        return run

    monkeypatch.setattr(IdentityMemory, "before_chunk", no_sync(IdentityMemory.before_chunk))
    monkeypatch.setattr(IdentityMemory, "after_chunk", no_sync(IdentityMemory.after_chunk))
    policy = build_memory(IAMFLOW, RETURN_REGISTRY)
    events = list(StreamingPipeline(dit, text_encoder, vae, compile_kernels=False).run(RETURN_STORY, config, policy))
    assert len(checked) == 2 * (len(events) - 1 - len(switches))
    assert any("archived" in e.memory for e in events) and any("refreshed" in e.memory for e in events)


def test_sparse_activation_picks_frames_without_waiting_for_the_gpu():
    """MemFlow's sparse activation runs at every layer of every forward (outside CUDA graphs): its frame indices go
    to the GPU once per chunk without a sync (they were two blocking copies per layer), and pick the same frames."""
    from iamflow_core.cache import frame_index, sparse_select

    torch.manual_seed(0)
    q = torch.randn(1, 8, 2, 16, device="cuda")
    k, v = torch.randn(1, 6 * 4, 2, 16, device="cuda"), torch.randn(1, 6 * 4, 2, 16, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        index = frame_index([0, 2, 3], 6, k.device)
        fast = sparse_select(q, k, v, [0, 2, 3], tokens_per_frame=4, topk=2, index=index)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    plain = sparse_select(q, k, v, [0, 2, 3], tokens_per_frame=4, topk=2)  # indices made here (with a sync)
    assert all(torch.equal(a, b) for a, b in zip(fast, plain))
