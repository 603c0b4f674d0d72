"""The command line on full-size model files in the ComfyUI layout (random weights) at 480x832, on a GPU."""

import json

import pytest

from iamflow_core import cli
from iamflow_core.config import DiTConfig, T5Config, VAEConfig
from iamflow_core.video import read_video_frame_count

from .._comfy_layout import write_models

pytestmark = pytest.mark.gpu


def test_cli_renders_a_story_at_full_size_from_comfyui_files(tmp_path, monkeypatch):
    models = write_models(tmp_path / "models", DiTConfig(), T5Config(), VAEConfig(), device="cuda")
    story = tmp_path / "story.json"
    story.write_text(json.dumps({"segments": [{"prompt": "a woman reads in a library", "seconds": 3},
                                              {"prompt": "a man walks past the shelves", "seconds": 3}]}))  # fmt: skip
    out = tmp_path / "video.mp4"
    monkeypatch.setenv("IAMFLOW_COMPILE", "0")  # eager kernels: this test is about files and wiring, not speed
    argv = ["generate", str(story), "--models", str(models), "--out", str(out), "--memory", "memflow"]
    assert cli.main([*argv, "--device", "cuda:0", "--vae-device", "cuda:0"]) == 0
    assert read_video_frame_count(out) == 93  # 2 x 4 chunks = 24 latent frames = 1 + 4 * 23 video frames
    assert len(json.loads(out.with_suffix(".story.json").read_text())["chunks"]) == 8
