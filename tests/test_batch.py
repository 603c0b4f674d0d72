"""The batch renderer: stories shared out across ranks by length, a 2-rank gloo run under torchrun on the CPU (one
story deliberately broken), and a rerun after a kill that skips the finished story and redoes the rest. The CLI runs
in real subprocesses on the tiny preset; stories are 2 prompts of one chunk each (21 frames)."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from iamflow_core import batch
from iamflow_core.batch import BatchError, Rank, shard
from iamflow_core.video import read_video_frame_count

FRAMES = 21  # two chunks: 9 + 12 video frames
KEYS = {"id", "video", "story_map", "frames", "seconds", "status", "error", "rank", "wall_s"}


def story_line(first: str, second: str, **extra) -> str:
    return json.dumps({**extra, "prompts": [first, second], "seconds": 0.75})


STORIES = [
    story_line("a woman in a red coat reads", "she closes the notebook", id="library"),
    story_line("a man walks in the rain", "he opens an umbrella"),
    '{"prompts": ["a cat sleeps", "a dog runs"], "seconds": -3}',  # broken: a negative duration
    story_line("a car drives at night", "it stops at a red light", id="night"),
]


def run_batch(tmp_path: Path, stories: list[str], *extra: str, ranks: int = 1, wait: bool = True):
    """`batch` on the tiny preset in a subprocess (under torchrun for several ranks): its CompletedProcess, or the
    running Popen when not `wait`."""
    path = tmp_path / "stories.jsonl"
    path.write_text("\n".join(stories) + "\n")
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1 else []
    command = [sys.executable, *launcher, "-m", "iamflow_core", "batch", str(path), "--out", str(tmp_path / "out"),
               "--preset", "tiny", "--memory", "none", *extra]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def manifest(out: Path) -> list[dict]:
    path = out / "manifest.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_the_longest_story_goes_to_the_least_loaded_rank_and_every_rank_splits_alike():
    weights = [45, 141, 93, 21, 141, 0, 69]
    shares = shard(weights, 3)
    assert shares == shard(list(weights), 3)  # deterministic
    assert sorted(i for share in shares for i in share) == list(range(len(weights)))
    assert shares == [[0, 1], [3, 4, 5], [2, 6]]  # 141+45, 141+21+0, 93+69
    loads = [sum(weights[i] for i in share) for share in shares]
    assert max(loads) - min(loads) <= max(weights)
    assert shard([5, 5], 4) == [[0], [1], [], []]  # more ranks than stories: some ranks idle
    with pytest.raises(ValueError, match="at least one rank"):
        shard([1], 0)


def test_the_rank_comes_from_torchrun_and_too_few_gpus_is_one_message(monkeypatch):
    assert Rank.from_env({}) == Rank(0, 1, 0, 1)  # not under torchrun: one rank
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert Rank.from_env(env) == Rank(3, 4, 1, 2)
    with pytest.raises(BatchError, match="out of range"):
        Rank.from_env({**env, "RANK": "4"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(batch.runs, "default_devices", lambda: ("cuda:0", "cuda:1"))

    def args(per_rank: int) -> argparse.Namespace:  # the device flags left at their defaults
        return argparse.Namespace(gpus_per_rank=per_rank, device="cuda:0", vae_device="cuda:1")

    two = args(1)
    batch.assign_devices(two, Rank(1, 2, 1, 2))
    assert (two.device, two.vae_device) == ("cuda:1", "cuda:1")
    pair = args(2)
    batch.assign_devices(pair, Rank(0, 1, 0, 1))
    assert (pair.device, pair.vae_device) == ("cuda:0", "cuda:1")
    with pytest.raises(BatchError, match=r"x 2 GPU\(s\) per rank need 4 GPUs, this host has 2; start at most 1"):
        batch.assign_devices(args(2), Rank(0, 2, 0, 2))


@pytest.mark.slow
def test_two_gloo_ranks_render_their_shares_and_record_the_broken_story(tmp_path):
    done = run_batch(tmp_path, STORIES, ranks=2)
    out = tmp_path / "out"
    assert done.returncode != 0, "a failed story makes the batch's exit status non-zero"
    records = manifest(out)
    assert [r["id"] for r in records] == ["library", "stories_001", "stories_002", "night"]  # story order
    assert all(set(r) == KEYS for r in records)
    assert [r["status"] for r in records] == ["done", "done", "failed", "done"]
    assert "line 3" in records[2]["error"] and "seconds" in records[2]["error"]
    assert {r["rank"] for r in records} == {0, 1} and not list(out.glob("manifest.rank*"))
    for r in records[:2] + records[3:]:
        assert r["frames"] == FRAMES == read_video_frame_count(out / r["video"])
        assert json.loads((out / r["story_map"]).read_text())["cancelled"] is False
        assert (out / r["video"]).with_suffix(".story.png").exists()
    assert "batch: 3 done, 1 failed of 4 stories" in done.stdout
    assert "error: 1 of 4 stories failed (stories_002)" in done.stderr


@pytest.mark.slow
def test_a_rerun_after_a_kill_skips_the_finished_story_and_redoes_the_rest(tmp_path):
    stories = [STORIES[0], STORIES[1]]  # the second is cut short (or not begun) by the kill
    out = tmp_path / "out"
    process = run_batch(tmp_path, stories, wait=False)
    try:
        deadline = time.monotonic() + 240
        while not any(r["status"] == "done" for r in manifest(out)):
            assert process.poll() is None, process.stdout.read().decode()
            assert time.monotonic() < deadline, "no story finished"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    first = out / "library.mp4"
    finished = first.stat().st_mtime_ns
    assert read_video_frame_count(first) == FRAMES
    done = run_batch(tmp_path, stories)
    assert done.returncode == 0, done.stderr
    records = manifest(out)
    assert [(r["id"], r["status"]) for r in records] == [("library", "skipped"), ("stories_001", "done")]
    assert first.stat().st_mtime_ns == finished  # the finished video was left alone
    for r in records:
        assert r["frames"] == FRAMES == read_video_frame_count(out / r["video"])
    assert "[1/2] library: already complete (21 frames), skipped" in done.stdout
