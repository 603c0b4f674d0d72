"""A render stopped from outside keeps what it made: the CLI on the tiny preset in a real subprocess, stopped by
SIGINT (Ctrl-C), SIGTERM (a scheduler, `docker stop`), SIGHUP (a closed terminal) and SIGKILL after a few chunks.

Every stop leaves a playable mp4 with the finished chunks; every stop but SIGKILL also leaves the story map of what
was made, one line saying where the frames are, and the conventional exit status (128 + the signal number).
SIGKILL cannot be caught: the fragmented mp4 still holds every frame written but the newest one.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from iamflow_core.video import read_video_frame_count, read_video_frames

pytestmark = pytest.mark.slow

STORY = "3s | a woman in a red coat reads a notebook\n3s | a man in a grey hoodie walks past the shelves\n"  # 8 chunks
PROGRESS = re.compile(r"(\d+)/8 \[")


def frames_of(chunks: int) -> int:
    return 0 if chunks == 0 else 9 + 12 * (chunks - 1)


class Render:
    """`python -m iamflow_core generate` on the tiny preset, its stderr read as it comes."""

    def __init__(self, tmp_path: Path) -> None:
        story = tmp_path / "story.txt"
        story.write_text(STORY)
        self.out = tmp_path / "v.mp4"
        command = [sys.executable, "-m", "iamflow_core", "generate", str(story), "--preset", "tiny",
                   "--out", str(self.out), "--device", "cpu", "--vae-device", "cpu", "--memory", "none"]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.err = ""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while chunk := self.process.stderr.read1(4096):
            self.err += chunk.decode(errors="replace")

    def chunks_done(self) -> int:
        found = PROGRESS.findall(self.err)
        return int(found[-1]) if found else 0

    def stop_after(self, chunks: int, signum: int) -> int:
        """Send `signum` once `chunks` chunks are reported; the chunks reported done by then."""
        deadline = time.monotonic() + 240
        while self.chunks_done() < chunks:
            assert self.process.poll() is None, f"the render ended early:\n{self.err}"
            assert time.monotonic() < deadline, f"no progress:\n{self.err}"
            time.sleep(0.05)
        done = self.chunks_done()
        self.process.send_signal(signum)
        return done

    def wait(self) -> int:
        try:
            code = self.process.wait(timeout=120)
        finally:
            if self.process.poll() is None:  # never leave it running
                self.process.kill()
        self.reader.join(timeout=10)
        return code


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_caught_stop_keeps_the_finished_chunks_and_the_story_map(tmp_path, signum):
    render = Render(tmp_path)
    done = render.stop_after(2, signum)
    assert render.wait() == 128 + signum, render.err
    assert "Traceback" not in render.err
    story_map = json.loads(render.out.with_suffix(".story.json").read_text())
    made = len(story_map["chunks"])
    assert done <= made < 8  # the chunks reported, and maybe one more finished before the signal was handled
    frames = read_video_frame_count(render.out)
    assert frames == frames_of(made) and read_video_frames(render.out).shape[0] == frames
    line = f"stopped by {signum.name} after {made} of 8 chunks: {frames} frames kept in {render.out} (playable)"
    assert line in render.err
    assert render.out.with_suffix(".story.png").stat().st_size > 0


def test_sigkill_leaves_a_playable_file_with_the_frames_written(tmp_path):
    render = Render(tmp_path)
    done = render.stop_after(3, signal.SIGKILL)
    assert render.wait() == -signal.SIGKILL
    frames = read_video_frame_count(render.out)
    # chunk `done` may still be on its way to the file; every frame of the chunks before it is there, but maybe
    # the newest one (an mp4 fragment is closed by the frame after it)
    assert frames_of(done - 1) - 1 <= frames <= frames_of(8)
    assert read_video_frames(render.out).shape[0] == frames
