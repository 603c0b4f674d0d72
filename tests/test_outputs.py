"""Outputs are never lost or overwritten: an existing video gets a numbered neighbour, an output folder that cannot
be written fails before any model loads, and a disk that fills up mid-render stops it at once with the frames made
so far in a playable file (the CLI in a subprocess, tiny preset)."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from iamflow_core.outputs import OutputError, check_output, free_output_path
from iamflow_core.video import read_video_frame_count, read_video_frames

ONE_CHUNK = "0.75s | a woman reads in a library\n"


def generate(tmp_path: Path, story: str, *args: str, limit_bytes: int | None = None, prefix=()):
    path = tmp_path / "story.txt"
    path.write_text(story)
    command = [*prefix, sys.executable, "-m", "iamflow_core", "generate", str(path), "--preset", "tiny",
               "--device", "cpu", "--vae-device", "cpu", "--memory", "none", *args]  # fmt: skip

    def limit() -> None:  # a full disk, for this process only: writes past the limit fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env=env, preexec_fn=limit if limit_bytes else None
    )
    return done.returncode, done.stdout, done.stderr


def test_free_output_path_numbers_like_comfyui(tmp_path):
    video = tmp_path / "v.mp4"
    assert free_output_path(video) == video
    video.with_suffix(".story.json").write_text("{}")  # a companion file counts too
    assert free_output_path(video) == tmp_path / "v_00001.mp4"
    (tmp_path / "v_00001.mp4").write_bytes(b"")
    assert free_output_path(video) == tmp_path / "v_00002.mp4" and free_output_path(video, overwrite=True) == video


def test_no_room_for_the_video_is_one_message(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(OutputError, match=r"not enough free space for .*v.mp4: 1 MB free .* needs about \d+ MB"):
        check_output(tmp_path / "v.mp4", 933, 832, 480)


@pytest.mark.slow
def test_an_existing_video_is_never_overwritten(tmp_path):
    out = tmp_path / "v.mp4"
    assert generate(tmp_path, ONE_CHUNK, "--out", str(out))[0] == 0
    first = out.read_bytes()
    code, stdout, stderr = generate(tmp_path, ONE_CHUNK, "--out", str(out), "--seed", "5")
    assert code == 0 and f"{out} exists; writing {tmp_path / 'v_00001.mp4'} instead" in stderr
    assert out.read_bytes() == first and read_video_frame_count(tmp_path / "v_00001.mp4") == 9
    assert (tmp_path / "v_00001.story.json").is_file() and str(tmp_path / "v_00001.mp4") in stdout
    code, _, stderr = generate(tmp_path, ONE_CHUNK, "--out", str(out), "--overwrite", "--seed", "5")
    assert code == 0 and "exists" not in stderr and out.read_bytes() != first


def _read_only_folder(tmp_path: Path) -> tuple[Path, tuple[str, ...]]:
    """A folder on a read-only file system (a private mount, as root), or one without write permission."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return folder, ()
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("no unshare for a private read-only mount, and root ignores folder permissions")
    return folder, ("unshare", "-m", "sh", "-c", f'mount -t tmpfs -o ro tmpfs "{folder}" && exec "$@"', "sh")


@pytest.mark.slow
def test_a_read_only_output_fails_before_anything_loads(tmp_path):
    folder, prefix = _read_only_folder(tmp_path)
    start = time.monotonic()
    code, _, stderr = generate(tmp_path, ONE_CHUNK, "--out", str(folder / "v.mp4"), prefix=prefix)
    assert code == 2 and "Traceback" not in stderr
    assert f"error: cannot write the video to {folder}:" in stderr and "choose another --out" in stderr
    assert time.monotonic() - start < 60 and "frames in" not in stderr  # no render ran


@pytest.mark.slow
def test_a_full_disk_stops_at_once_and_keeps_a_playable_file(tmp_path):
    story = "3s | a woman reads in a library\n3s | a man walks past the shelves\n"  # 8 chunks, ~300 KB of video
    out = tmp_path / "v.mp4"
    code, _, stderr = generate(tmp_path, story, "--out", str(out), limit_bytes=120_000)
    assert code == 2 and "Traceback" not in stderr
    assert f"error: could not write {out}: File too large; the" in stderr and "frames written before" in stderr
    kept = read_video_frame_count(out)
    assert 0 < kept < 9 + 12 * 7 and read_video_frames(out).shape[0] == kept  # playable, and stopped early
    story_map = json.loads(out.with_suffix(".story.json").read_text())
    assert 0 < len(story_map["chunks"]) < 8
