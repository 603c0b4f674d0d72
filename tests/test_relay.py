"""The clean pass on a second device (`relay.py`), on the CPU: the same books, the same K/V, the same video.

Here both devices are the CPU and the pushes are plain copies; the GPU tests run the signal kernels on one GPU and
on two."""

import gc
import weakref

import numpy as np
import pytest
import torch

from iamflow_core.config import CacheConfig, SamplerConfig, TransitionConfig
from iamflow_core.memory import MemFlowMemory
from iamflow_core.memory.identity import IdentityMemory
from iamflow_core.pipeline import StreamingPipeline
from iamflow_core.presets import tiny_models
from iamflow_core.relay import ReceivingCache, SecondGPU
from iamflow_core.settings import MemorySettings, build_memory, sampler_config
from iamflow_core.story import Segment, Story
from tests.test_memory import RETURN_REGISTRY, RETURN_STORY

THREE = Story(
    (Segment("a red fox runs through snow", 1.5), Segment("the fox sleeps in a den", 1.5),
     Segment("an owl watches from a branch", 2.25)),
    seed=3,
)  # fmt: skip


@pytest.fixture(scope="module")
def models():
    return tiny_models(seed=0)


def _render(models, story, config, memory=None, second=False, vae=True, **kwargs):
    dit, te, v = models
    pipe = StreamingPipeline(dit, te, v if vae else None, clean_pass_device="cpu" if second else None)
    events = list(pipe.run(story, config, memory, **kwargs))
    return events, pipe


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.latents, y.latents), f"chunk {x.index}"
        assert (x.frames is None) == (y.frames is None)
        if x.frames is not None:
            assert np.array_equal(x.frames, y.frames)


@pytest.mark.parametrize("strategy", ["recache", "soft", "hard"])
def test_the_same_video_with_the_clean_pass_on_a_second_device(models, strategy):
    # a window of 6 frames (2 chunks) rolls over several times; recache rewrites it at each switch
    config = SamplerConfig(height=32, width=48, cache=CacheConfig(window_frames=9, memory_frames=0),
                           transition=TransitionConfig(strategy))  # fmt: skip
    plain, _ = _render(models, THREE, config)
    split, pipe = _render(models, THREE, config, second=True)
    _same(plain, split)


def test_a_start_image_and_memflow_give_the_same_video(models):
    config = SamplerConfig(height=32, width=48, cache=CacheConfig(window_frames=9, memory_frames=2))
    picture = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)

    def memory():
        return MemFlowMemory(bank_size=2, record_interval=1)

    plain, _ = _render(models, THREE, config, memory(), start_image=picture)
    split, _ = _render(models, THREE, config, memory(), second=True, start_image=picture)
    _same(plain, split)
    assert any(e.memory.get("memory_frames") for e in split)  # the memory segment was in use


def test_identity_memory_keeps_the_same_frames_and_scores_the_newest_a_chunk_later(models, monkeypatch):
    settings = MemorySettings()
    config = sampler_config(settings, 32, 48)
    plain_memory, split_memory = build_memory(settings, RETURN_REGISTRY), build_memory(settings, RETURN_REGISTRY)
    plain, _ = _render(models, RETURN_STORY, config, plain_memory, vae=False)
    scored: list[tuple[int, tuple[int, ...]]] = []
    original = IdentityMemory._text_scores

    def recording(self, ctx, query, frames):
        scored.append((ctx.chunk, frames))
        return original(self, ctx, query, frames)

    monkeypatch.setattr(IdentityMemory, "_text_scores", recording)
    split, _ = _render(models, RETURN_STORY, config, split_memory, second=True, vae=False)
    _same(plain, split)
    for x, y in zip(plain, split):
        assert x.memory.get("retrieved") == y.memory.get("retrieved")
        assert x.memory.get("archived") == y.memory.get("archived")
        assert x.memory["memory_frames"] == y.memory["memory_frames"]
    assert any(e.memory["memory_frames"] for e in split)
    assert plain_memory.story_map()["archive"] == split_memory.story_map()["archive"]
    # chunk c's frames (3c .. 3c + 2) are still arriving when chunk c ends: scored at chunk c + 1 (or a switch)
    assert scored and all(chunk > frames[0] // 3 for chunk, frames in scored)


def test_both_caches_hold_the_same_window_and_memory(models):
    dit = models[0]
    second = SecondGPU(dit, "cpu")
    cfg = CacheConfig(window_frames=9, memory_frames=2)
    cache, relay = second.pair(dit, cfg, tokens_per_frame=6)
    assert isinstance(cache, ReceivingCache) and relay.mirror.peer is cache
    torch.manual_seed(0)
    text = dit.encode_text(torch.randn(1, 512, dit.cfg.text_dim))
    with torch.no_grad():
        for chunk in range(5):
            latents = torch.randn(1, 16, 3, 4, 6)
            dit.forward_chunk(latents, torch.full((1,), 500.0), text, cache, 3 * chunk)  # a denoising forward
            relay.clean_pass(latents, text, 3 * chunk)
            if chunk == 2:
                k, v, _ = cache.frame_kv(6)  # the chunk just written
                cache.set_memory(k, v, [6])
    assert cache.state == relay.mirror.state and cache.slot_positions == relay.mirror.slot_positions
    window = slice(cfg.memory_frames * 6, (cfg.memory_frames + 6) * 6)
    assert torch.equal(cache.k[:, :, window], relay.mirror.k[:, :, window])
    assert torch.equal(cache.v[:, :, window], relay.mirror.v[:, :, window])
    assert relay.mirror.memory == cache.memory == (6,)
    assert torch.equal(relay.mirror._memory.k, cache._memory.k)


@pytest.mark.parametrize(
    ("cache", "match"),
    [(CacheConfig(sink_ema=0.1), "EMA sink"), (CacheConfig(memory_frames=3, sparse_topk=1), "sparse memory")],
)
def test_settings_the_second_device_cannot_keep_say_so(models, cache, match):
    second = SecondGPU(models[0], "cpu")
    with pytest.raises(ValueError, match=match):
        second.pair(models[0], cache, tokens_per_frame=6)


def test_a_dit_on_the_cpu_cannot_send_its_clean_pass_to_a_gpu(models):
    with pytest.raises(ValueError, match="same kind of device"):
        SecondGPU(models[0], "cuda:1")


def test_a_finished_story_frees_both_caches_at_once(models, monkeypatch):
    caches = []
    original = SecondGPU.pair

    def pair(self, *args):
        cache, relay = original(self, *args)
        caches.extend([weakref.ref(cache), weakref.ref(relay.mirror)])
        return cache, relay

    monkeypatch.setattr(SecondGPU, "pair", pair)
    pipe = StreamingPipeline(models[0], models[1], None, clean_pass_device="cpu")
    config = SamplerConfig(height=32, width=48, cache=CacheConfig(window_frames=9, memory_frames=0))
    gc.disable()  # reference counting alone: caches in a cycle would stay
    try:
        list(pipe.run(THREE, config))
        assert len(caches) == 2 and all(ref() is None for ref in caches)
    finally:
        gc.enable()
