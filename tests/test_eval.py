"""`eval`: NarraStream-Bench scores from videos and story maps, with tiny random DINO and CLIP models on the CPU."""

import http.server
import json
import threading

import numpy as np
import pytest
import torch

from iamflow_core import cli
from iamflow_core.evaluate import BENCH, metrics
from iamflow_core.evaluate.inputs import EvalError, chunk_frames, read_story_layout
from iamflow_core.video import VideoWriter

H, W = 64, 96
FRAMES_PER_CHUNK = 12  # 3 latent frames; the first chunk has 9 (latent frame 0 is one video frame)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Folders of a tiny random DINOv2 and a tiny random CLIP, as transformers saves them."""
    from transformers import BitImageProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel, Dinov2Config, Dinov2Model

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    layers = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    # large initial weights: a random DINO's CLS token then depends on the image enough to tell two apart
    dino = Dinov2Config(**layers, image_size=28, patch_size=14, initializer_range=1.0)
    Dinov2Model(dino).save_pretrained(root / "dino")
    BitImageProcessor(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(root / "dino")
    clip = CLIPConfig(
        text_config=dict(**layers, vocab_size=99, max_position_embeddings=20),
        vision_config=dict(**layers, image_size=32, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(clip).save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / "clip"
    )
    return root / "dino", root / "clip"


def _smooth(shift: float, phase: float = 0.0) -> np.ndarray:
    """A smooth colour pattern moved right by `shift` pixels: uint8 [H, W, 3]."""
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    channels = [np.sin((x - shift) / 9.0 + phase + k) * np.cos(y / 11.0 + k) for k in range(3)]
    return (127.5 + 100.0 * np.stack(channels, axis=-1)).astype(np.uint8)


def _story(folder, name, frames_of_prompt, registry=None, chunks_per_prompt=1):
    """A video whose prompt p shows frames_of_prompt(p, i) for its i-th frame, and its story map."""
    num_chunks = chunks_per_prompt * len(frames_of_prompt)
    ranges = chunk_frames(num_chunks, 1 + 4 * (3 * num_chunks - 1), "test")
    segment_of_chunk = [k // chunks_per_prompt for k in range(num_chunks)]
    video = folder / f"{name}.mp4"
    with VideoWriter(video, crf=0) as writer:
        for k, (start, end) in enumerate(ranges):
            make = frames_of_prompt[segment_of_chunk[k]]
            writer.write(np.stack([make(t) for t in range(start, end)]))
    story_map = {
        "title": name,
        "prompts": [f"prompt {p}" for p in range(len(frames_of_prompt))],
        "registry": registry,
        "memory": {"mode": "none"},
        "chunks": [{"chunk": k, "segment": s} for k, s in enumerate(segment_of_chunk)],
    }
    video.with_suffix(".story.json").write_text(json.dumps(story_map))
    return {"id": name, "video": video.name, "story_map": f"{name}.story.json", "frames": ranges[-1][1],
            "seconds": ranges[-1][1] / 16, "status": "done", "error": None}  # fmt: skip


def _manifest(folder, rows):
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _eval(manifest, models, *more):
    dino, clip = models
    argv = ["eval", str(manifest), "--dino", str(dino), "--clip", str(clip), "--device", "cpu", "--batch-size", "8"]
    return cli.main([*argv, *more])


def _scores(folder, name):
    return json.loads((folder / f"{name}.eval.json").read_text())


# the metrics on constructed inputs -----------------------------------------------------------------------------


def test_chunks_map_to_the_video_frames_of_the_wan_vae():
    assert chunk_frames(12, 141, "x") == [(0, 9)] + [(9 + 12 * k, 21 + 12 * k) for k in range(11)]
    # image-to-video: the start image (latent frame 0) leads chunk 0, the chunks' latent frames come after it
    assert chunk_frames(12, 145, "x") == [(0, 13)] + [(13 + 12 * k, 25 + 12 * k) for k in range(11)]
    assert chunk_frames(1, 9, "x") == [(0, 9)]
    for frames in (140, 137):
        with pytest.raises(EvalError, match=f"{frames} video frames do not split into 12 equal chunks"):
            chunk_frames(12, frames, "x")


def test_identical_features_are_fully_consistent_and_a_changed_prompt_is_not():
    same = torch.nn.functional.normalize(torch.ones(5, 8), dim=-1)
    assert metrics.consistency([same, same, same], BENCH)["score"] == pytest.approx(1.0)
    other = torch.nn.functional.normalize(torch.arange(40.0).view(5, 8) % 3 - 1, dim=-1)
    assert metrics.consistency([same, other, same], BENCH)["score"] < 0.9


def test_percentiles_and_mappings_follow_the_benchmark():
    assert metrics.percentile([0.0, 1.0, 2.0, 3.0, 4.0], 25) == 1.0
    assert metrics.percentile([0.0, 1.0], 84) == pytest.approx(0.84)
    assert metrics.affine_power(1.0, 0.58, 1.5) == 1.0 and metrics.affine_power(0.5, 0.58, 1.5) == 0.0
    assert metrics.reverse_weighted([0.0, 1.0]) == pytest.approx(2 / 3)
    assert metrics.consistency_frames(0, 9, BENCH.frame_positions) == [1, 2, 4, 6, 7]
    assert metrics.longrange_frames(9, 21) == [9, 12, 15, 18, 20]


def test_flicker_is_at_its_maximum_without_change_and_falls_with_it():
    assert metrics.temporal_flickering([[0.0] * 8, [0.0] * 11], BENCH)["score"] == 1.0
    assert metrics.temporal_flickering([[0.2] * 8], BENCH)["score"] == pytest.approx(np.exp(-0.4))


def test_a_jump_at_a_prompt_switch_lowers_boundary_smoothness():
    steady = [2.0] * 20
    cut = list(steady)
    cut[8] = 40.0  # the pair (8, 9) across the switch at frame 9
    segments = [(0, 9), (9, 21)]
    assert metrics.boundary_smoothness(steady, segments, BENCH)["score"] == pytest.approx(1.0)
    assert metrics.boundary_smoothness(cut, segments, BENCH)["score"] < 1e-6


def test_entities_are_compared_only_with_their_own_prompts():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    result = metrics.conditional_longrange({1: [a, a], 2: [b, b], 3: [a]}, BENCH)
    assert result["score"] == pytest.approx(1.0) and set(result["entities"]) == {"1", "2"}
    assert metrics.conditional_longrange({1: [a, b]}, BENCH)["score"] == 0.0


def test_a_dino_v1_folder_encodes_frames_that_are_not_square(tmp_path):
    """The benchmark's DINO is ViT-B/16 (transformers' ViTModel), which needs its position embeddings stretched."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    from iamflow_core.evaluate.features import load_dino

    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37, patch_size=16)
    ViTModel(config, add_pooling_layer=False).save_pretrained(tmp_path)
    ViTImageProcessor().save_pretrained(tmp_path)
    features = load_dino(tmp_path, torch.device("cpu"), BENCH).encode(torch.from_numpy(np.stack([_smooth(0.0)] * 2)))
    assert features.shape == (2, 32) and torch.allclose(features.norm(dim=-1), torch.ones(2))


# whole videos through the command ------------------------------------------------------------------------------


def test_a_still_video_is_fully_consistent_and_does_not_flicker(tmp_path, models, capsys):
    still = _smooth(0.0)
    row = _story(tmp_path, "still", [lambda t: still, lambda t: still])
    assert _eval(_manifest(tmp_path, [row]), models) == 0
    scores = _scores(tmp_path, "still")["scores"]
    for name in ("subject_consistency", "background_consistency", "temporal_flickering", "boundary_smoothness"):
        assert scores[name] == pytest.approx(1.0, abs=1e-4), name
    assert scores["conditional_longrange"] is None  # no registry: no entities
    out = capsys.readouterr().out
    assert "subject_consistency" in out and "per minute of video" in out
    summary = json.loads((tmp_path / "eval_summary.json").read_text())
    assert summary["dimensions"]["temporal_flickering"]["scored"] == 1


def test_a_cut_at_the_prompt_switch_scores_lower_than_a_continuous_move(tmp_path, models):
    moving = _story(tmp_path, "moving", [lambda t: _smooth(t), lambda t: _smooth(t)])
    cut = _story(tmp_path, "cut", [lambda t: _smooth(t), lambda t: _smooth(t, phase=2.5)])
    assert _eval(_manifest(tmp_path, [moving, cut]), models) == 0
    smooth, jumped = (_scores(tmp_path, n)["scores"]["boundary_smoothness"] for n in ("moving", "cut"))
    assert smooth > 0.5 and jumped < 0.05


def test_each_entity_is_compared_across_its_own_prompts(tmp_path, models):
    x, y = _smooth(0.0), _smooth(0.0, phase=2.5)
    entities = [{"id": 1, "name": "woman"}, {"id": 2, "name": "dog"}]
    mentions = [[{"id": 1, "text": "a woman"}], [2], [{"id": 1, "text": "she"}], [2]]  # the two forms a map holds
    registry = {"entities": entities, "prompts": mentions, "source": "user"}
    row = _story(tmp_path, "two", [lambda t: x, lambda t: y, lambda t: x, lambda t: y], registry=registry)
    assert _eval(_manifest(tmp_path, [row]), models) == 0
    record = _scores(tmp_path, "two")
    assert record["entities"] == {"1": {"name": "woman", "prompts": [0, 2]}, "2": {"name": "dog", "prompts": [1, 3]}}
    entities = record["details"]["conditional_longrange"]["entities"]
    assert entities["1"]["score"] == pytest.approx(1.0, abs=1e-4) and entities["2"]["score"] == pytest.approx(1.0)
    # had an entity been compared across the others' prompts, it would have scored below 1
    assert record["details"]["subject_consistency"]["inter_adjacent"] < 0.99


def test_stories_that_are_not_done_are_listed_and_not_scored(tmp_path, models, capsys):
    still = _smooth(0.0)
    done = _story(tmp_path, "ok", [lambda t: still, lambda t: still])
    failed = {**done, "id": "broken", "video": "broken.mp4", "status": "failed", "error": "CUDA out of memory"}
    stopped = {**done, "id": "half", "status": "stopped", "error": None}
    (tmp_path / "garbage.mp4").write_bytes(b"not a video at all")
    corrupt = {**done, "id": "garbage", "video": "garbage.mp4"}  # "done", yet unreadable: noted, the rest go on
    last = {**done, "id": "ok again"}
    assert _eval(_manifest(tmp_path, [done, failed, stopped, corrupt, last]), models) == 0
    assert not (tmp_path / "broken.eval.json").exists() and not (tmp_path / "half.eval.json").exists()
    summary = json.loads((tmp_path / "eval_summary.json").read_text())
    assert list(summary["stories"]) == ["ok", "ok again"] and (tmp_path / "ok_again.eval.json").is_file()
    not_scored = [(s["id"], s["status"]) for s in summary["not_scored"]]
    assert not_scored == [("broken", "failed"), ("half", "stopped"), ("garbage", "done")]
    assert summary["dimensions"]["subject_consistency"] == {"mean": pytest.approx(1.0), "scored": 2, "stories": 2}
    out = capsys.readouterr().out
    assert "not scored: broken (failed: CUDA out of memory)" in out and "garbage: eval failed" in out


# the judge ---------------------------------------------------------------------------------------------------


class _FakeJudge(http.server.BaseHTTPRequestHandler):
    """Answers like an OpenAI chat endpoint with fixed scores; remembers the requests."""

    requests: list = []
    status = 200

    def do_POST(self):  # noqa: N802 (the http.server name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, body))
        reply = {
            "choices": [{"message": {"role": "assistant", "content": '{"segment_scores":[80,60],"overall_score":50}'}}]
        }
        data = json.dumps(reply if self.status == 200 else {"error": "model not loaded"}).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_server():
    _FakeJudge.requests, _FakeJudge.status = [], 200
    server = http.server.HTTPServer(("127.0.0.1", 0), _FakeJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()
    server.server_close()


def test_the_judge_scores_each_prompt_from_its_frames(tmp_path, models, judge_server):
    row = _story(tmp_path, "judged", [lambda t: _smooth(t), lambda t: _smooth(t)])
    assert _eval(_manifest(tmp_path, [row]), models, "--judge-url", judge_server, "--judge-model", "qwen-vl") == 0
    record = _scores(tmp_path, "judged")
    assert record["scores"]["vlm_score"] == pytest.approx(0.8 * 0.7 + 0.2 * 0.5)
    ((path, body),) = _FakeJudge.requests
    assert path == "/v1/chat/completions" and body["model"] == "qwen-vl" and body["temperature"] == 0.0
    content = body["messages"][0]["content"]
    assert "prompt 0" in content[0]["text"] and "prompt 1" in content[0]["text"]
    assert sum(part["type"] == "image_url" for part in content) == 2 * BENCH.judge_frames_per_prompt


def test_a_failed_judge_request_leaves_only_that_dimension_unscored(tmp_path, models, judge_server, capsys):
    _FakeJudge.status = 500
    row = _story(tmp_path, "nojudge", [lambda t: _smooth(t), lambda t: _smooth(t)])
    assert _eval(_manifest(tmp_path, [row]), models, "--judge-url", judge_server, "--judge-model", "m") == 0
    record = _scores(tmp_path, "nojudge")
    assert record["scores"]["vlm_score"] is None and record["scores"]["temporal_flickering"] is not None
    assert "HTTP 500" in record["not_scored"]["vlm_score"]
    assert "vlm_score not scored" in capsys.readouterr().out


# bad inputs ----------------------------------------------------------------------------------------------------


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def test_a_missing_or_wrong_model_folder_is_one_error_naming_the_flag(tmp_path, models, capsys):
    still = _smooth(0.0)
    manifest = _manifest(tmp_path, [_story(tmp_path, "s", [lambda t: still])])
    assert _eval(manifest, (tmp_path / "nowhere", models[1])) == 2
    line = _error_line(capsys)
    assert "--dino" in line and "nowhere" in line and "no such folder" in line
    assert _eval(manifest, (models[1], models[1])) == 2  # a CLIP folder given as DINO
    assert "--dino" in (line := _error_line(capsys)) and "model_type 'clip'" in line


def test_a_missing_video_is_one_error_before_any_model_loads(tmp_path, models, capsys):
    still = _smooth(0.0)
    row = _story(tmp_path, "gone", [lambda t: still])
    (tmp_path / "gone.mp4").unlink()
    assert _eval(_manifest(tmp_path, [row]), (tmp_path / "no-dino", models[1])) == 2
    line = _error_line(capsys)
    assert "gone.mp4 does not exist" in line and "manifest line 1" in line


def test_a_story_map_that_does_not_fit_its_video_is_named(tmp_path):
    path = tmp_path / "m.story.json"
    path.write_text(json.dumps({"prompts": ["a"], "chunks": [{"chunk": 0, "segment": 0}] * 2}))
    with pytest.raises(EvalError, match="23 video frames do not split into 2"):
        read_story_layout(path, 23)
