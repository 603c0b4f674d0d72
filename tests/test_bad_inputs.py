"""Every bad input a user gave the command line is one clear message and exit status 2, never a traceback: one case
per row of what was tried as a new user would (stories, registries, model files, devices, options). Signals, a full
disk and read-only or existing outputs have their own files (test_stops.py, test_outputs.py)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from iamflow_core import cli
from iamflow_core.config import T5Config
from iamflow_core.presets import TINY_DIT, TINY_T5, TINY_VAE

from ._comfy_layout import write_models

TINY = ["generate", "--preset", "tiny", "--device", "cpu", "--vae-device", "cpu"]


def run(capsys, argv: list[str]) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.count("error:") == 1, err
    return err


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_models(tmp_path_factory.mktemp("models"), TINY_DIT, TINY_T5, TINY_VAE)


def test_one_registry_for_a_jsonl_of_several_stories(tmp_path, capsys):
    (tmp_path / "s.jsonl").write_text('{"prompts": ["Rosa mends a net"]}\n{"prompts": ["twins by a fountain"]}\n')
    (tmp_path / "r.json").write_text(json.dumps({"entities": [{"id": 1, "name": "Rosa"}], "prompts": [[1]]}))
    err = run(capsys, [*TINY, str(tmp_path / "s.jsonl"), "--registry", str(tmp_path / "r.json"),
                       "--out", str(tmp_path / "v.mp4")])  # fmt: skip
    assert "holds one registry for 2 stories" in err and ".jsonl" in err


def test_a_registry_file_that_does_not_exist(tmp_path, capsys):
    err = run(capsys, [*TINY, "--registry", str(tmp_path / "nope.json"), "--out", str(tmp_path / "v.mp4")])
    assert f"registry file {tmp_path / 'nope.json'} does not exist" in err


@pytest.mark.parametrize(
    ("story", "message"),
    [
        ('{"segments": [{"prompt": "a cat", "seconds": 1e308}]}', "more than the maximum of 86400 s"),
        ("-5s | a bird\n", "line 1: has '-5s' where a duration goes"),
        ("abc s | a dog\n", "line 1: has 'abc s' where a duration goes"),
    ],
    ids=["seconds-1e308", "negative-duration", "not-a-number"],
)
def test_story_numbers_out_of_range(tmp_path, capsys, story, message):
    path = tmp_path / ("s.json" if story.startswith("{") else "s.txt")
    path.write_text(story)
    assert message in run(capsys, [*TINY, str(path), "--out", str(tmp_path / "v.mp4")])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with a GPU has cuda:0")
def test_a_cuda_device_on_a_machine_without_one(tmp_path, capsys):
    err = run(capsys, ["generate", "--preset", "tiny", "--device", "cuda:0", "--out", str(tmp_path / "v.mp4")])
    assert "device 'cuda:0' is not on this machine" in err and "devices here: cpu" in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--height", "50"], "must be positive multiples of 16"), (["--max-frames", "40"], "max_frames must be in")],
)
def test_options_are_checked_with_the_tiny_preset_too(tmp_path, capsys, flags, message):
    assert message in run(capsys, [*TINY, *flags, "--out", str(tmp_path / "v.mp4")])


def test_an_unknown_attention_backend_is_refused_by_its_flag(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main([*TINY, "--attention", "bogus", "--out", str(tmp_path / "v.mp4")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "argument --attention: invalid choice: 'bogus'" in err and "Traceback" not in err


def test_a_text_encoder_of_another_width_names_both_files(tmp_path, capsys, models):
    other = write_models(tmp_path / "other", TINY_DIT, T5Config(**{**TINY_T5.__dict__, "dim": 32}), TINY_VAE)
    encoder = other / "text_encoders/umt5_xxl_fp16.safetensors"
    err = run(capsys, ["generate", "--models", str(models), "--text-encoder", str(encoder), "--device", "cpu",
                       "--vae-device", "cpu", "--out", str(tmp_path / "v.mp4"), str(_story(tmp_path))])  # fmt: skip
    assert f"the umT5 text encoder {encoder} gives 32-wide text embeddings" in err
    assert "wan2.1_t2v_1.3B_bf16.safetensors takes text_dim 64" in err


def test_a_dit_with_nan_weights_is_refused(tmp_path, capsys, models):
    state = load_file(str(models / "diffusion_models/wan2.1_t2v_1.3B_bf16.safetensors"))
    state["blocks.0.ffn.0.weight"][0, 0] = float("nan")
    dit = tmp_path / "broken.safetensors"
    save_file(state, str(dit))
    err = run(capsys, ["generate", "--models", str(models), "--dit", str(dit), "--device", "cpu", "--vae-device",
                       "cpu", "--out", str(tmp_path / "v.mp4"), str(_story(tmp_path))])  # fmt: skip
    assert f"{dit} is damaged: tensor blocks.0.ffn.0.weight holds 1 NaN values" in err


def test_a_pickle_that_runs_code_is_refused_without_torch_s_advice(tmp_path, capsys, models):
    class Evil:
        def __reduce__(self):
            import os

            return os.system, ("true",)

    evil = tmp_path / "evil.pt"
    torch.save({"generator": Evil()}, evil)
    err = run(capsys, ["generate", "--models", str(models), "--dit", str(evil), "--device", "cpu", "--vae-device",
                       "cpu", "--out", str(tmp_path / "v.mp4"), str(_story(tmp_path))])  # fmt: skip
    assert "is refused for safety" in err and "weights_only" not in err


def _story(tmp_path):
    story = tmp_path / "story.txt"
    story.write_text("0.75s | a woman reads\n")
    return story
