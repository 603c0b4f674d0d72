"""The named streaming presets (Self-Forcing, LongLive, Causal Forcing chunk- and frame-wise, Rolling Forcing,
Reward Forcing): each builds a valid config, and each runs end to end at tiny size, frame-wise (one latent frame per
chunk) through every path: the cache, the first chunk's own schedule, memory, transitions, VAE streaming, start
image, story map, CLI."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from iamflow_core import cli
from iamflow_core.config import CacheConfig, SamplerConfig
from iamflow_core.model_presets import DEFAULT_MODEL_PRESET, MODEL_PRESETS, model_preset
from iamflow_core.pipeline import StreamingPipeline
from iamflow_core.presets import tiny_models
from iamflow_core.render import render_story, story_map
from iamflow_core.settings import IAMFLOW, PRESETS, MemorySettings, build_memory, sampler_config
from iamflow_core.story import Story, plan_chunks
from iamflow_core.video import read_video_frame_count

HEIGHT, WIDTH = 32, 48  # latent 4 x 6: 6 tokens per frame
# 1.5 s then 0.5 s: past a 3-frame sink before the switch at every chunk size, so memory has frames to bring back.
STORY = Story.from_prompts(
    ["A woman in a red coat reads a notebook in a library.", "A young man in a grey hoodie waves at her."],
    seconds=[1.5, 0.5],
    seed=3,
)


@pytest.fixture(scope="module")
def models():
    return tiny_models()


def _render(models, preset: str, settings: MemorySettings = IAMFLOW, story: Story = STORY, **kwargs):
    config = sampler_config(settings, HEIGHT, WIDTH, model_preset(preset))
    pipe = StreamingPipeline(*models)
    return render_story(pipe, story, config, build_memory(settings), **kwargs)


@pytest.mark.parametrize("name", list(MODEL_PRESETS))
@pytest.mark.parametrize("mode", list(PRESETS))
def test_every_model_preset_builds_a_valid_sampler_config(name, mode):
    preset = MODEL_PRESETS[name]
    config = sampler_config(PRESETS[mode], model=preset)
    assert (config.cache.chunk_frames, config.cache.sink_frames) == (preset.chunk_frames, preset.sink_frames)
    assert config.cache.window_frames == preset.window_frames
    assert config.cache.memory_frames == PRESETS[mode].memory_frames
    assert config.steps == preset.steps and config.first_steps == preset.first_steps
    assert all(0 < t <= 1000 for t in (*config.steps, *(config.first_steps or ())))
    assert plan_chunks(STORY, config.cache.chunk_frames).num_chunks >= 2
    assert preset.source.startswith("github.com/") and preset.files.startswith("huggingface.co/")


def test_the_default_preset_is_the_engines_longlive_cache():
    assert sampler_config(IAMFLOW) == sampler_config(IAMFLOW, model=MODEL_PRESETS[DEFAULT_MODEL_PRESET])
    assert sampler_config(IAMFLOW).steps == SamplerConfig().steps


def test_frame_wise_presets_make_one_latent_frame_per_chunk_with_their_step_counts():
    steps = {n: (p.chunk_frames, len(p.steps), len(p.first_steps or p.steps)) for n, p in MODEL_PRESETS.items()}
    assert steps["causal-forcing-frame-4step"] == (1, 4, 4)
    assert steps["causal-forcing-frame-2step"] == (1, 2, 4)  # Causal Forcing++: the first frame in 4 steps
    assert steps["causal-forcing-frame-1step"] == (1, 1, 4)
    assert steps["rolling-forcing"] == (3, 5, 5)
    assert MODEL_PRESETS["reward-forcing"].window_frames == 9


def test_an_unknown_preset_is_one_clear_error(capsys):
    with pytest.raises(ValueError, match="unknown model preset 'causal-forcing-3step'; choose one of longlive"):
        model_preset("causal-forcing-3step")
    with pytest.raises(SystemExit) as stop:
        cli.main(["generate", "--preset", "tiny", "--preset-model", "causal-forcing-3step"])
    assert stop.value.code == 2 and "causal-forcing-frame-2step" in capsys.readouterr().err


def test_bad_sink_and_schedule_settings_are_one_clear_error_each():
    with pytest.raises(ValueError, match="unknown sink_positions 'before'; choose one of absolute, adjacent"):
        CacheConfig(sink_positions="before")
    with pytest.raises(ValueError, match=r"sink_ema must be in \[0, 1\] \(the weight of a leaving frame\), got 1.5"):
        CacheConfig(sink_ema=1.5)
    with pytest.raises(ValueError, match="first_steps must list at least one timestep, or be None"):
        SamplerConfig(first_steps=())


def test_the_first_chunk_runs_its_own_schedule(models):
    """Chunk 0 of the 2-step frame-wise preset is made in 4 steps: the chunk a 4-step run makes from the same noise;
    the chunks after it are made in 2 and differ."""
    dit, text_encoder, _ = models
    story = Story.from_prompts(["A woman reads a notebook."], seconds=0.75, seed=5)
    two_step = model_preset("causal-forcing-frame-2step")
    runs = {}
    for name, first in (("two+first", two_step.first_steps), ("four", None), ("two", None)):
        steps = two_step.first_steps if name == "four" else two_step.steps
        config = SamplerConfig(HEIGHT, WIDTH, steps=steps, cache=two_step.cache(), first_steps=first)
        runs[name] = [e.latents for e in StreamingPipeline(dit, text_encoder).run(story, config)]
    assert len(runs["four"]) == 3 and all(z.shape[2] == 1 for z in runs["four"])
    assert torch.equal(runs["two+first"][0], runs["four"][0])
    assert not torch.equal(runs["two+first"][0], runs["two"][0])
    assert not torch.equal(runs["two+first"][1], runs["four"][1])


@pytest.mark.parametrize("name", list(MODEL_PRESETS))
def test_each_preset_renders_a_story_end_to_end(models, name):
    """Identity memory and the soft transition over a prompt switch; the decoded frames are those of the plan:
    1 + 4 (F - 1) for F latent frames, chunk 0 giving 1 frame frame-wise and 9 chunk-wise."""
    result = _render(models, name)
    preset, plan = MODEL_PRESETS[name], result.plan
    assert result.complete and plan.chunk_frames == preset.chunk_frames
    assert result.frames.shape == (plan.num_video_frames, HEIGHT, WIDTH, 3)
    assert result.latents.shape[2] == plan.num_latent_frames
    assert [r.video_frames for r in result.chunks] == [plan.video_frames_of_chunk(i) for i in range(plan.num_chunks)]
    assert result.chunks[0].video_frames == (1 if preset.chunk_frames == 1 else 9)
    assert torch.isfinite(result.latents).all()
    switch = result.chunks[plan.switch_chunks[0]]
    assert switch.memory["memory_frames"]  # frames came back at the switch, frame-wise too
    assert story_map(STORY, None, result)["chunk_frames"] == preset.chunk_frames


@pytest.mark.parametrize(
    ("name", "settings"),
    [
        ("causal-forcing-frame-1step", MemorySettings(mode="none", transition="recache")),
        ("causal-forcing-frame-2step", MemorySettings(mode="memflow", transition="recache", record_interval=2)),
        ("causal-forcing-frame-4step", MemorySettings(transition="hard")),
    ],
    ids=["1step-recache", "2step-memflow", "4step-hard"],
)
def test_frame_wise_presets_run_with_every_memory_and_transition(models, name, settings):
    result = _render(models, name, settings)
    assert result.complete and result.frames.shape[0] == result.plan.num_video_frames
    assert result.chunks[result.plan.switch_chunks[0]].timings["transition"] >= 0


def test_frame_wise_with_a_start_image(models):
    """The picture is latent frame 0; frame-wise chunks follow it, 4 video frames each."""
    picture = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    result = _render(models, "causal-forcing-frame-2step", start_image=picture)
    plan = result.plan
    assert result.frames.shape[0] == 1 + 4 * plan.num_latent_frames
    assert result.latents.shape[2] == 1 + plan.num_latent_frames
    assert result.chunks[0].video_frames == 5  # the picture's frame and the first chunk's 4


def test_cli_renders_frame_wise_two_step_with_the_preset_flag(tmp_path, capsys):
    story = tmp_path / "story.txt"
    story.write_text("1.5s | A woman reads a notebook.\n0.6s | A man waves.\n", encoding="utf-8")
    out = tmp_path / "v.mp4"
    argv = ["generate", str(story), "--preset", "tiny", "--preset-model", "causal-forcing-frame-2step",
            "--height", str(HEIGHT), "--width", str(WIDTH), "--memory", "none", "--out", str(out), "--device", "cpu",
            "--vae-device", "cpu"]  # fmt: skip
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "note: segment 2: 0.6 s requested, 2 chunks of 0.25 s = 0.5 s" in err  # rounded to frame-wise chunks
    assert "model preset causal-forcing-frame-2step: 1 latent frame per chunk, 2 steps (first chunk 4)" in err
    data = json.loads(out.with_suffix(".story.json").read_text(encoding="utf-8"))
    assert data["chunk_frames"] == 1 and len(data["chunks"]) == 8
    assert data["frames"] == data["planned_frames"] == 1 + 4 * 7


def test_streaming_sampler_node_streams_frame_wise_with_its_model_preset(tmp_path, monkeypatch):
    """The node's *model_preset* combo (the CLI's choices, LongLive's default) reaches the sampler: one latent frame
    per chunk, the progress bar counting those chunks from the start."""
    from tests import _comfy_stub, test_nodes
    from tests._comfy_workflows import combo_options

    comfy = _comfy_stub.configure(tmp_path)
    test_nodes.write_tiny_models(tmp_path / "models")
    sampler = test_nodes.N["IAMFlowStreamingSampler"]
    spec = sampler.INPUT_TYPES()["optional"]["model_preset"]  # optional: prompts saved before it still run
    assert combo_options(spec) == list(MODEL_PRESETS) and spec[1]["default"] == DEFAULT_MODEL_PRESET
    monkeypatch.setattr(test_nodes.nodes.sampler, "PREVIEW_LEAD_S", 0.0)
    dit, te, vae = test_nodes.load_models()
    (images, latent, _, _), _ = test_nodes.run(
        "IAMFlowStreamingSampler", dit, te, test_nodes.story_value(registry=False), WIDTH, HEIGHT, 7, "IAMFlow/cf1",
        memory=test_nodes.memory_value("none", "recache"), vae=vae, model_preset="causal-forcing-frame-1step",
    )  # fmt: skip
    assert latent["samples"].shape[2] == 12  # 2 x 1.5 s of 0.25-s chunks
    assert images.shape[0] == 1 + 4 * 11
    assert [(v, t) for v, t, _ in comfy.progress] == [(i, 12) for i in range(1, 13)]
    comfy.root = tmp_path
    clips = [data["output"] for event, data in comfy.messages if event == "executed"]
    assert read_video_frame_count(test_nodes.saved_image(comfy, clips[0])) == 1  # chunk 0's clip: one frame


@pytest.mark.parametrize("chunk", [3, 1], ids=["chunk-wise", "frame-wise"])
def test_an_adjacent_sink_sits_just_before_the_chunk(chunk):
    """sink_positions="adjacent" (Rolling and Reward Forcing): with no previous frame kept (window = sink + chunk), a
    late chunk sees the sink as the frames right before it: its output is that of the block-causal forward of
    [sink, chunk] alone. With the sink at its own positions it is not."""
    from tests._tiny_dit import tiny_dit
    from tests.test_dit import _full_masked, _inputs, _stream

    model = tiny_dit()
    cfg = CacheConfig(chunk_frames=chunk, sink_frames=3, window_frames=3 + chunk, sink_positions="adjacent")
    x, text = _inputs(frames=12)
    t_chunks = [0.0] * (12 // chunk - 1) + [625.0]  # clean context, then the last chunk mid-denoising
    short = torch.cat([x[:, :, :3], x[:, :, 12 - chunk :]], dim=2)
    with torch.no_grad():
        moved, cache = _stream(model, x, text, cfg, t_chunks)
        alone = _full_masked(model, short, text, cfg, [0.0] * (3 // chunk) + [625.0])
        kept = _stream(model, x, text, dataclasses.replace(cfg, sink_positions="absolute"), t_chunks)[0]
    assert (moved[:, :, -chunk:] - alone[:, :, -chunk:]).abs().max().item() <= 1e-4
    assert (kept[:, :, -chunk:] - alone[:, :, -chunk:]).abs().max().item() > 1e-3
    assert cache.slot_positions[:3] == [12 - chunk - 3, 12 - chunk - 2, 12 - chunk - 1]


def test_an_adjacent_sink_changes_nothing_while_the_window_reaches_it():
    from tests._tiny_dit import tiny_dit
    from tests.test_dit import _inputs, _stream

    model = tiny_dit()
    cfg = CacheConfig(chunk_frames=1, sink_frames=3, window_frames=9, sink_positions="adjacent")
    x, text = _inputs(frames=9)
    with torch.no_grad():
        moved = _stream(model, x, text, cfg, [0.0] * 8 + [500.0])[0]
        kept = _stream(model, x, text, dataclasses.replace(cfg, sink_positions="absolute"), [0.0] * 8 + [500.0])[0]
    assert torch.equal(moved, kept)


def test_an_ema_sink_takes_in_each_frame_that_leaves_the_window():
    """Reward Forcing's sink: when chunk k's clean pass evicts chunk k-2 from a 3-frame window, sink frame j becomes
    (1 - w) sink_j + w frame_{j}, that frame's keys moved to the sink frame's position; where the sink has moved
    (adjacent), its pristine copy takes the blend and is placed again."""
    from tests._tiny_dit import tiny_dit
    from tests.test_dit import H, W, _inputs

    model, w = tiny_dit(), 0.25
    cfg = CacheConfig(chunk_frames=3, sink_frames=3, window_frames=9, sink_positions="adjacent", sink_ema=w)
    x, text = _inputs(frames=15)
    cache, cross = model.new_cache(cfg, tokens_per_frame=(H // 2) * (W // 2)), model.encode_text(text)
    rotate, seen = model.rotator(H // 2, W // 2), []
    with torch.no_grad():
        for s in range(0, 15, 3):
            sink = [cache.frame_kv(f)[:2] for f in cache.state.sink if f is not None]
            window = {f: cache.frame_kv(f)[:2] for f in cache.state.local if f is not None}
            seen.append((sink, window))
            model.forward_chunk(x[:, :, s : s + 3], torch.tensor([0.0]), cross, cache, s, commit=True)
            if s == 6:  # chunk 2 evicted frames 3-5: blended where the sink sits (it has not moved yet)
                for j in range(3):
                    (k, v), (ke, ve) = seen[2][0][j], seen[2][1][3 + j]
                    got_k, got_v, position = cache.frame_kv(j)
                    assert position == j
                    assert torch.allclose(got_k, (1 - w) * k + w * rotate(ke, [-3]), atol=1e-5)
                    assert torch.allclose(got_v, (1 - w) * v + w * ve, atol=1e-6)
            if s == 9:  # chunk 3 evicted frames 6-8; the sink had moved to 3-5: its pristine copy took the blend
                tokens = cache.tokens_per_frame
                for j in range(3):
                    (k, _), (ke, _) = seen[3][0][j], seen[3][1][6 + j]  # before chunk 3: the sink still at j
                    expected = (1 - w) * k + w * rotate(ke, [-6])
                    assert torch.allclose(cache._sink_origin[:, :, j * tokens : (j + 1) * tokens], expected, atol=1e-5)
                assert cache.slot_positions[:3] == [None] * 3  # placed again, from the copy, at the next forward
    cache.begin(range(15, 18), rotate)  # the next chunk's forward places the sink again, before frames 12-14
    assert cache.slot_positions[:3] == [9, 10, 11]
