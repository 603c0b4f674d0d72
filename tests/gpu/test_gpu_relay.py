"""The clean pass on a second GPU (`relay.py`) with its signal kernels and CUDA graphs: on another stream of one GPU,
and on a second GPU where there is one. The video is the one the DiT's GPU alone makes."""

import pytest
import torch

from iamflow_core.models import kernels
from iamflow_core.pipeline import StreamingPipeline
from iamflow_core.presets import tiny_models
from iamflow_core.relay import SecondGPU
from iamflow_core.settings import MemorySettings, build_memory, sampler_config
from iamflow_core.story import Segment, Story
from tests.test_memory import RETURN_REGISTRY, RETURN_STORY

pytestmark = pytest.mark.gpu

# 16 chunks under one prompt, so every layout is captured as a CUDA graph and replayed, then a switch
LONG = Story((Segment("a red fox runs through snow", 12.0), Segment("the fox sleeps in a den", 3.0)), seed=3)


def _render(models, story, config, memory, second):
    dit, text_encoder, vae = models
    pipe = StreamingPipeline(dit, text_encoder, vae, compile_kernels=False, clean_pass_device=second)
    events = list(pipe.run(story, config, memory))
    return events, pipe


def _compare(plain, split):
    assert len(plain) == len(split)
    worst = max((a.latents - b.latents).abs().max().item() for a, b in zip(plain, split))
    assert worst <= 1e-4, f"latents differ by up to {worst}"


@pytest.mark.parametrize("memory", ["none", "identity"])
def test_the_clean_pass_on_another_stream_of_one_gpu_gives_the_same_video(memory):
    models = tiny_models(device="cuda")
    settings = MemorySettings(mode=memory)
    config = sampler_config(settings, 64, 96)
    story, registry = (LONG, None) if memory == "none" else (RETURN_STORY, RETURN_REGISTRY)
    plain, _ = _render(models, story, config, build_memory(settings, registry), None)
    split, pipe = _render(models, story, config, build_memory(settings, registry), "cuda:0")
    _compare(plain, split)
    if memory == "none":  # a long steady stretch: both sides captured their forwards and replayed them
        assert pipe.second.replica.graph_replays > 0 and models[0].graph_replays > 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_the_clean_pass_on_the_second_gpu_beside_the_vae_gives_the_same_video():
    models = tiny_models(device="cuda:0", vae_device="cuda:1")
    settings = MemorySettings()
    config = sampler_config(settings, 64, 96)
    plain, _ = _render(models, RETURN_STORY, config, build_memory(settings, RETURN_REGISTRY), None)
    split, pipe = _render(models, RETURN_STORY, config, build_memory(settings, RETURN_REGISTRY), "cuda:1")
    _compare(plain, split)
    assert all(a.frames.shape == b.frames.shape for a, b in zip(plain, split))
    assert pipe.second.replica.graph_replays > 0


def test_a_wait_for_a_count_that_never_comes_gives_up_and_says_so(monkeypatch):
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    target, error = torch.ones_like(counter), torch.zeros_like(counter)
    monkeypatch.setattr(kernels, "WAIT_LIMIT", 1000)
    kernels.wait_count(counter, target, error)
    assert error.item() == 1
    dit = tiny_models(device="cuda")[0]
    cache, relay = SecondGPU(dit, "cuda:0").pair(dit, sampler_config(MemorySettings(), 64, 96).cache, 24)
    relay._check()  # queues the read of the flag
    cache.error.fill_(1)
    relay._check()  # the flag read before the fill: nothing yet
    torch.cuda.synchronize()
    with pytest.raises(RuntimeError, match="waited more than"):
        for _ in range(3):
            relay._check()
            torch.cuda.synchronize()
