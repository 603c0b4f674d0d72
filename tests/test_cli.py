"""The command line on the tiny preset, interrupted runs, and user errors."""

import argparse
import json

import pytest
import torch

from iamflow_core import cli
from iamflow_core.config import CacheConfig, SamplerConfig
from iamflow_core.memory import NoMemory
from iamflow_core.pipeline import StreamingPipeline
from iamflow_core.presets import tiny_models
from iamflow_core.story import Segment, Story
from iamflow_core.video import read_video_frame_count


def test_tiny_preset_makes_a_video(tmp_path, capsys):
    out = tmp_path / "tiny.mp4"
    assert cli.main(["generate", "--preset", "tiny", "--out", str(out), "--device", "cpu", "--vae-device", "cpu"]) == 0
    assert read_video_frame_count(out) == 141  # 3 x 3 s -> 12 chunks -> 36 latent frames -> 1 + 4 * 35
    assert "141 frames" in capsys.readouterr().out
    story_map = json.loads(out.with_suffix(".story.json").read_text())
    assert len(story_map["chunks"]) == 12 and story_map["memory"]["registry"] is None


def test_iamflow_mode_with_a_registry_file_records_identity_retrieval(tmp_path):
    registry = {
        "entities": [{"id": 1, "name": "woman", "attributes": ["red coat"]}, {"id": 2, "name": "young man"}],
        "prompts": [
            [{"id": 1, "text": "A woman in a red coat"}],
            [2],
            [{"id": 1, "text": "The woman in the red coat"}],
        ],
    }
    (tmp_path / "r.json").write_text(json.dumps(registry))
    out = tmp_path / "v.mp4"
    argv = ["generate", "--preset", "tiny", "--out", str(out), "--device", "cpu", "--vae-device", "cpu"]
    assert cli.main([*argv, "--registry", str(tmp_path / "r.json")]) == 0
    chunks = json.loads(out.with_suffix(".story.json").read_text())["chunks"]
    assert chunks[8]["retrieved"]["wanted"] == [1]
    assert chunks[8]["retrieved"]["frames"] and all(1 in f["entities"] for f in chunks[8]["retrieved"]["frames"])


def test_a_registry_that_does_not_fit_the_story_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "r.json").write_text('{"entities": [], "prompts": [[]]}')
    argv = ["generate", "--preset", "tiny", "--out", str(tmp_path / "v.mp4"), "--device", "cpu"]
    assert cli.main([*argv, "--registry", str(tmp_path / "r.json")]) == 2
    assert "the story has 3" in capsys.readouterr().err


class _StopAt(NoMemory):
    """A policy that raises KeyboardInterrupt after making chunk `chunk` (as Ctrl-C would)."""

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk

    def after_chunk(self, ctx) -> None:
        if ctx.chunk == self.chunk:
            raise KeyboardInterrupt


def test_interrupted_run_keeps_every_finished_chunk(tmp_path):
    dit, te, vae = tiny_models()
    pipe = StreamingPipeline(dit, te, vae)
    story = Story((Segment("a woman reads in a library", 3.0),), seed=0)
    config = SamplerConfig(height=32, width=48, cache=CacheConfig(memory_frames=0))
    out = tmp_path / "cut.mp4"
    with pytest.raises(KeyboardInterrupt):
        cli._render(pipe, story, config, _StopAt(3), out)
    # chunks 0, 1, 2 were finished before the interrupt: 9 + 12 + 12 frames, in a playable file
    assert read_video_frame_count(out) == 33


def test_interrupt_from_the_command_line_exits_130(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_render", interrupted)
    code = cli.main(["generate", "--preset", "tiny", "--out", str(tmp_path / "x.mp4"), "--device", "cpu"])
    assert code == 130
    assert "finished chunk" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "/no/such/story.json"], "does not exist"),
        (["generate"], "no story given"),
        (["generate", "STORY", "--models", "MODELS"], "model files are missing"),
    ],
)
def test_user_errors_are_one_clear_message(tmp_path, capsys, argv, message):
    story = tmp_path / "s.jsonl"
    story.write_text('{"prompts": ["a cat on a roof"]}\n')
    argv = [a.replace("STORY", str(story)).replace("MODELS", str(tmp_path / "models")) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "Traceback" not in err


def test_missing_model_message_lists_every_file(tmp_path):
    from iamflow_core.weights import MissingModelFiles, find_model_files

    with pytest.raises(MissingModelFiles) as info:
        find_model_files(tmp_path)
    text = str(info.value)
    for name in ("wan2.1_t2v_1.3B_bf16.safetensors", "umt5_xxl_fp16.safetensors", "wan_2.1_vae.safetensors"):
        assert name in text
    assert str(tmp_path) in text


def test_model_files_found_in_a_comfyui_models_folder(tmp_path):
    from iamflow_core.weights import find_model_files

    for rel in ("diffusion_models/wan2.1_t2v_1.3B_bf16.safetensors", "text_encoders/umt5_xxl_fp16.safetensors",
                "vae/wan_2.1_vae.safetensors"):  # fmt: skip
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    files = find_model_files(tmp_path)
    assert files.dit.name == "wan2.1_t2v_1.3B_bf16.safetensors" and files.vae.parent.name == "vae"
    assert files.tokenizer is None  # taken from the text-encoder file


def test_generate_from_a_comfyui_models_folder(tmp_path, capsys):
    """The real loaders on files named and laid out as ComfyUI users have them (tiny sizes, CPU); the CLI says what
    the DiT runs as once it has loaded."""
    from iamflow_core.presets import TINY_DIT, TINY_T5, TINY_VAE

    from ._comfy_layout import write_models

    models = write_models(tmp_path / "models", TINY_DIT, TINY_T5, TINY_VAE)
    story = tmp_path / "story.txt"
    story.write_text("1.5s | a woman reads in a library\n1.5s | a man walks past the shelves\n")
    out = tmp_path / "v.mp4"
    argv = ["generate", str(story), "--models", str(models), "--out", str(out), "--height", "32", "--width", "48"]
    assert cli.main([*argv, "--device", "cpu", "--vae-device", "cpu"]) == 0  # bf16, as on a GPU
    assert read_video_frame_count(out) == 45  # 4 chunks = 12 latent frames = 1 + 4 * 11
    assert "DiT: wan, 2 blocks on cpu, bfloat16; attention sdpa\n" in capsys.readouterr().err


def test_the_dit_line_names_fp8_linears_and_the_attention_they_bring(tmp_path, monkeypatch):
    """An FP8 file: its FP8 linears are counted and `auto` attention is FA3's FP8 kernel where it exists (this CPU
    has no FA3: the backends are told here)."""
    from iamflow_core.models import attention
    from iamflow_core.models.attention import resolve_backend
    from iamflow_core.runs import dit_line
    from iamflow_core.weights import load_dit

    from . import _checkpoints as ck

    monkeypatch.setattr(attention, "available_backends", lambda: ["auto", "sdpa", "flash3", "flash3_fp8"])
    dit = load_dit(ck.write_iamflow_fp8(tmp_path / "iamflow_fp8.safetensors", ck.dit_state()), dtype=torch.float32)
    dit.attention_backend = resolve_backend("auto", fp8=True)
    # IAMFlow's file stores its attention projections in FP8: 8 a block (self- and cross-attention q, k, v, o)
    assert dit_line(dit) == "DiT: wan-fp8, 2 blocks on cpu, float32, 16 FP8 linears; attention flash3_fp8"


def test_iamflow_mode_with_llm_and_vlm_folders(tmp_path, capsys):
    """Entity extraction (tiny Qwen3) before sampling and asynchronous verification (tiny Qwen3-VL) through the CLI.
    Random weights answer nonsense: the run must degrade to a valid, empty registry and neutral scores."""
    from ._tiny_qwen import tiny_qwen_folders

    qwen = tiny_qwen_folders()
    out = tmp_path / "v.mp4"
    argv = ["generate", "--preset", "tiny", "--out", str(out), "--device", "cpu", "--vae-device", "cpu"]
    assert cli.main([*argv, "--llm", str(qwen.llm), "--vlm", str(qwen.vlm)]) == 0
    assert "entities: 0 found by the LLM in 3 prompts (" in capsys.readouterr().err  # the wait before loading, said
    story_map = json.loads(out.with_suffix(".story.json").read_text())
    assert story_map["registry"]["source"] == "llm"
    assert len(story_map["chunks"]) == 12 and read_video_frame_count(out) == 141


def test_the_extraction_line_says_what_the_llm_found_and_how_long_it_took():
    from iamflow_core.runs import extraction_line
    from iamflow_core.settings import MemorySettings

    from .test_memory import RETURN_REGISTRY, RETURN_STORY

    args = argparse.Namespace(llm="Qwen3-4B-Instruct-2507", registry=None)
    identity, stories = MemorySettings(mode="identity"), [RETURN_STORY, RETURN_STORY]
    line = extraction_line(args, identity, stories, [RETURN_REGISTRY, None], 1.234)
    assert line == "entities: 3 found by the LLM in 6 prompts of 2 stories (1.2 s)"
    assert extraction_line(args, identity, stories[:1], [RETURN_REGISTRY], 0.5).endswith("in 3 prompts (0.5 s)")
    assert extraction_line(args, MemorySettings(mode="none"), stories, [None, None], 0.1) is None  # no LLM ran
    given = argparse.Namespace(llm="Qwen3-4B-Instruct-2507", registry="story.registry.json")
    assert extraction_line(given, identity, stories, [RETURN_REGISTRY] * 2, 0.1) is None  # the registry was given


def test_a_reader_that_went_away_ends_the_command_quietly():
    """`python -m iamflow_core bench pacing | head -1`: the pipe closes under the command, which stops without a
    traceback (exit status 1), as other command-line tools do."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # nobody will read: the command's first line meets a broken pipe
    try:
        done = subprocess.run([sys.executable, "-m", "iamflow_core", "bench", "pacing"], stdout=write,
                              stderr=subprocess.PIPE, timeout=300)  # fmt: skip
    finally:
        os.close(write)
    assert done.returncode == 1
    assert b"Traceback" not in done.stderr, done.stderr.decode()[-2000:]
