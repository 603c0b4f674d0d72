"""Frame-wise streaming (one latent frame per chunk, Causal Forcing++ 2-step) at full size on one GPU, random
weights: it runs, through every path, at 480x832. Times nothing; `bench speed --preset-model
causal-forcing-frame-2step` measures its video FPS."""

import numpy as np
import pytest
import torch

from iamflow_core.bench.speed import build_models
from iamflow_core.model_presets import model_preset
from iamflow_core.pipeline import StreamingPipeline
from iamflow_core.render import render_story
from iamflow_core.settings import IAMFLOW, LONGLIVE, build_memory, sampler_config
from iamflow_core.story import Story

pytestmark = pytest.mark.gpu

# 6 s then 1 s: 24 + 4 frame-wise chunks of 0.25 s, past the 21-frame window before the switch, so the rolling
# window, the memory and the transition all run frame-wise.
STORY = Story.from_prompts(
    ["A woman in a red coat reads a notebook in a library.", "A young man in a grey hoodie waves at her."],
    seconds=[6.0, 1.0],
    seed=0,
)


@pytest.fixture(scope="module")
def models():
    return build_models("cuda:0", "cuda:0")


@pytest.mark.parametrize("settings", [IAMFLOW, LONGLIVE], ids=["identity-soft", "none-recache"])
def test_frame_wise_two_step_streams_a_story_at_full_size(models, settings):
    config = sampler_config(settings, model=model_preset("causal-forcing-frame-2step"))
    assert (config.height, config.width, config.cache.chunk_frames, len(config.steps)) == (480, 832, 1, 2)
    result = render_story(StreamingPipeline(*models), STORY, config, build_memory(settings), keep_latents=True)
    plan = result.plan
    assert result.complete and plan.num_chunks == 28 and plan.num_latent_frames > config.cache.window_frames
    assert result.frames.shape == (1 + 4 * 27, 480, 832, 3) and result.frames.dtype == np.uint8
    assert [r.video_frames for r in result.chunks[:3]] == [1, 4, 4]
    assert torch.isfinite(result.latents).all()
    assert result.chunks[plan.switch_chunks[0]].timings["dit"] > 0
