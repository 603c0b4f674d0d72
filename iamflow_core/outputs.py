"""Where a render's files go: never over an existing file unless asked, and checked before any model loads.

A video comes with its story map (`NAME.story.json`) and its picture (`NAME.story.png`). `free_output_path` gives
the first name, `NAME.mp4` then `NAME_00001.mp4`, `NAME_00002.mp4`, ... (as ComfyUI's savers number files), whose
three files are all free. `check_output` makes sure the folder can be written and holds room for a first estimate
of the video, so a bad `--out` fails in a second instead of after the render.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

# A first estimate of an H.264 480x832 frame at crf 18 (the story videos measured 30-60 KB a frame), scaled by area.
BYTES_PER_FRAME_480P = 64 * 1024
COMPANIONS = (".story.json", ".story.png")


class OutputError(OSError):
    """An output path that cannot be used: the message names it and says what to do."""


def output_files(video: Path) -> tuple[Path, ...]:
    """The video and its companion files."""
    return (video, *(video.with_suffix(suffix) for suffix in COMPANIONS))


def free_output_path(path: str | Path, overwrite: bool = False) -> Path:
    """`path` if none of its files exist (or `overwrite`), else the first free numbered name beside it."""
    path = Path(path).expanduser()
    if overwrite or not any(f.exists() for f in output_files(path)):
        return path
    for n in range(1, 100_000):
        candidate = path.with_name(f"{path.stem}_{n:05d}{path.suffix}")
        if not any(f.exists() for f in output_files(candidate)):
            return candidate
    raise OutputError(f"{path}: no free numbered name beside it; clean up its folder or pass --overwrite")


def estimated_bytes(num_frames: int, width: int, height: int) -> int:
    return int(num_frames * BYTES_PER_FRAME_480P * (width * height) / (832 * 480)) + 1_000_000


def check_output(path: Path, num_frames: int, width: int, height: int) -> None:
    """Raise `OutputError` unless the folder of `path` can be created and written and has room for the video."""
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".iamflow-write-test-"):
            pass
    except OSError as e:
        raise OutputError(
            f"cannot write the video to {folder}: {e.strerror or e}; choose another --out (a folder you can write to)"
        ) from e
    need, free = estimated_bytes(num_frames, width, height), shutil.disk_usage(folder).free
    if free < need:
        raise OutputError(
            f"not enough free space for {path}: {free / 2**20:.0f} MB free in {folder}, the video needs about "
            f"{need / 2**20:.0f} MB; free some space or choose another --out"
        )
