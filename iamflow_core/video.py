"""Writing video to disk chunk by chunk (H.264 via PyAV), and reading it back.

`VideoWriter` encodes and muxes every chunk as it arrives, so memory stays flat however long the video gets. By
default it writes a fragmented mp4 with no encoder look-ahead, each frame in its own fragment flushed to the file:
the file is playable at every moment, so a process killed outright (SIGKILL, power loss) keeps every frame handed
to `write` but the newest one (an mp4 fragment is closed by the frame after it). Leaving its `with` block by an
exception (Ctrl-C included) closes the file, with every frame. A write that fails (disk full, I/O error) raises
`VideoWriteError` naming the file and the frames kept.

Frame layout everywhere here: uint8 RGB ``[T, H, W, 3]``. The VAE's output convention (``[B, 3, T, H, W]`` in
[-1, 1]) converts with `to_uint8_frames`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from fractions import Fraction
from os import PathLike
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    import av

logger = logging.getLogger(__name__)

_CONTAINER_SUFFIXES = (".mp4", ".mov", ".m4v", ".mkv")
_EVEN_SIZE_PIX_FMTS = ("yuv420p", "yuvj420p", "nv12")  # chroma is subsampled 2x in both directions
# A float frame a little outside [0, 1] is rounding noise; further out it is almost surely [-1, 1] VAE output.
_FLOAT_RANGE_SLACK = 0.02


def _pyav():
    """PyAV, imported when a file is written or read (frame conversion works without it)."""
    import av

    return av


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """VAE output ``[B=1, 3, T, H, W]`` or ``[3, T, H, W]`` in [-1, 1] -> uint8 RGB frames ``[T, H, W, 3]``."""
    return uint8_frames_on_device(video).cpu().numpy()


def uint8_frames_on_device(video: torch.Tensor) -> torch.Tensor:
    """`to_uint8_frames` without the copy to the host: a uint8 tensor ``[T, H, W, 3]`` where `video` lives."""
    if video.ndim == 5:
        if video.shape[0] != 1:
            raise ValueError(f"to_uint8_frames takes one video, got a batch of {video.shape[0]}; pass video[i]")
        video = video[0]
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"to_uint8_frames expects [B, 3, T, H, W] or [3, T, H, W], got {tuple(video.shape)}")
    # Quantize where the tensor lives, then copy: uint8 is half the bytes of bf16 to move to the host.
    frames = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).contiguous()


def _as_uint8_frames(frames: np.ndarray | torch.Tensor) -> np.ndarray:
    """Frames ``[T, H, W, 3]``, uint8 or float in [0, 1], as a contiguous uint8 numpy array."""
    shape = tuple(frames.shape)
    if len(shape) != 4 or shape[-1] != 3:
        hint = "; for [T, 3, H, W] use frames.permute(0, 2, 3, 1)" if len(shape) == 4 and shape[1] == 3 else ""
        raise ValueError(f"frames must be [T, H, W, 3] RGB, got shape {shape}{hint}")
    if shape[0] == 0:
        return np.zeros(shape, dtype=np.uint8)
    if isinstance(frames, torch.Tensor):
        frames = frames.detach()
        if frames.is_floating_point():
            _check_unit_range(float(frames.min()), float(frames.max()))
            frames = (frames.float().clamp(0, 1) * 255).round().to(torch.uint8)
        frames = frames.cpu().numpy()
    elif np.issubdtype(frames.dtype, np.floating):
        _check_unit_range(float(frames.min()), float(frames.max()))
        frames = (np.clip(frames, 0, 1) * 255).round()
    if frames.dtype != np.uint8:
        if frames.min() < 0 or frames.max() > 255:
            raise ValueError(f"integer frames must lie in 0..255, got {frames.min()}..{frames.max()}; pass uint8")
        frames = frames.astype(np.uint8)
    return np.ascontiguousarray(frames)


def _check_unit_range(low: float, high: float) -> None:
    if low < -_FLOAT_RANGE_SLACK or high > 1 + _FLOAT_RANGE_SLACK:
        raise ValueError(
            f"float frames must lie in [0, 1], got values in [{low:.3g}, {high:.3g}]; "
            "for VAE output in [-1, 1] use to_uint8_frames()"
        )


class VideoWriteError(OSError):
    """Writing the video failed (disk full, I/O error): the message names the file and the frames kept there."""


class VideoWriter:
    """Writes uint8 RGB frames ``[T, H, W, 3]`` to an H.264 file, one chunk per `write` call.

    Use it as a context manager. The file is created at the first `write` (no frames, no file); that call fixes
    the frame size and every later one must match. Not thread-safe: call it from one thread. `fragmented=True`
    (the default) writes the kill-proof fragmented mp4 of the module docstring; `False` writes a plain mp4 whose
    index is written by `close()` (which the `with` block always calls): nothing of it plays if the process dies.

    The x264 preset is `veryfast`: crf fixes the quality, and a faster preset spends bits instead of CPU. With
    `medium`, encoding 480x832 took the cores the sampling loop needs and slowed a whole render on one H100 from
    24.9 to 21.4 video FPS. Pass `preset="medium"` for smaller files when speed does not matter.
    """

    def __init__(
        self,
        path: str | PathLike[str],
        fps: float = 16,
        *,
        crf: int = 18,
        preset: str = "veryfast",
        codec: str = "libx264",
        pix_fmt: str = "yuv420p",
        fragmented: bool = True,
    ) -> None:
        self.path = Path(path)
        if self.path.suffix.lower() not in _CONTAINER_SUFFIXES:
            raise ValueError(f"video path {str(self.path)!r} must end in one of {', '.join(_CONTAINER_SUFFIXES)}")
        if not fps > 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if not 0 <= crf <= 51:
            raise ValueError(f"crf must be in 0..51 (lower is better quality; 18 is visually lossless), got {crf}")
        self.fps = Fraction(fps).limit_denominator(1001)
        self.crf, self.preset, self.codec, self.pix_fmt = crf, preset, codec, pix_fmt
        self.fragmented = fragmented
        self._container = None
        self._stream: av.VideoStream | None = None
        self._frames_written = 0
        self._closed = False

    @property
    def frames_written(self) -> int:
        """Frames handed to the encoder so far; after `close()`, the frames in the file."""
        return self._frames_written

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def size(self) -> tuple[int, int] | None:
        """(width, height) once the first chunk is written."""
        return None if self._stream is None else (self._stream.width, self._stream.height)

    def write(self, frames: np.ndarray | torch.Tensor) -> None:
        """Encode and mux one chunk of frames ``[T, H, W, 3]`` (uint8, or float in [0, 1])."""
        if self._closed:
            raise RuntimeError(f"VideoWriter for {self.path} is closed; open a new one to write more")
        frames = _as_uint8_frames(frames)
        if self._stream is None:
            self._check_size(width=frames.shape[2], height=frames.shape[1])
            self._stream = self._io(self._open, width=frames.shape[2], height=frames.shape[1])
        elif self.size != (frames.shape[2], frames.shape[1]):
            w, h = self.size
            raise ValueError(
                f"frame size {frames.shape[2]}x{frames.shape[1]} differs from this video's {w}x{h}; "
                "every chunk of one video must have the same size"
            )
        for frame in frames:
            packets = self._stream.encode(_pyav().VideoFrame.from_ndarray(frame, format="rgb24"))
            self._io(self._mux, packets)
            self._frames_written += 1

    def close(self) -> None:
        """Flush the encoder and finish the file. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._container is None:
            logger.info("no frames were written; %s was not created", self.path)
            return
        try:
            self._io(self._mux, self._stream.encode(None))  # None drains the encoder
        finally:
            self._io(self._container.close)
        logger.info("wrote %d frames (%.2f s) to %s", self._frames_written, self._frames_written / self.fps, self.path)

    def _io(self, fn, *args, **kwargs):
        """Run a file operation; an OSError or FFmpeg error ends the file (cut back to its last whole frame, so it
        stays playable) and becomes one `VideoWriteError` naming the file and the frames kept."""
        try:
            return fn(*args, **kwargs)
        except (OSError, _pyav().FFmpegError) as e:
            reason = getattr(e, "strerror", None) or str(e)
            kept = self._end_after_failure()
            where = f"the {kept} frames written before are kept there (playable)" if kept else "no frame was kept"
            raise VideoWriteError(f"could not write {self.path}: {reason}; {where}") from e

    def _end_after_failure(self) -> int:
        """Close what can be closed after a failed write and cut the file back to its whole fragments. Returns the
        frames in it."""
        self._closed = True
        if self._container is not None:
            with contextlib.suppress(OSError, _pyav().FFmpegError):
                self._container.close()
        if not self.fragmented or not self.path.exists():
            return 0
        end = complete_fragments_end(self.path)
        if end < self.path.stat().st_size:
            os.truncate(self.path, end)
        try:
            return read_video_frame_count(self.path)
        except (OSError, _pyav().FFmpegError, IndexError):
            return 0

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.close()
            return
        # Keep the finished frames; a failure while closing must not hide the error that got us here.
        try:
            self.close()
        except Exception as e:
            logger.warning("could not finish %s after %s: %s", self.path, exc_type.__name__, e)
        else:
            if self._frames_written:
                logger.warning(
                    "stopped by %s; kept %d frames in %s", exc_type.__name__, self._frames_written, self.path
                )

    def _check_size(self, width: int, height: int) -> None:
        if self.pix_fmt in _EVEN_SIZE_PIX_FMTS and (width % 2 or height % 2):
            raise ValueError(
                f"frame size {width}x{height} has an odd side, but {self.pix_fmt} needs even width and height; "
                f"crop or pad the frames to {width - width % 2}x{height - height % 2}, or use pix_fmt='yuv444p'"
            )

    def _open(self, width: int, height: int) -> av.VideoStream:
        """Create the file and its H.264 stream."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        options = {}
        if self.fragmented:  # each frame its own fragment, each write flushed to the file at once
            options = {"movflags": "frag_every_frame+empty_moov+default_base_moof", "flush_packets": "1"}
        self._container = _pyav().open(str(self.path), mode="w", options=options)
        stream = self._container.add_stream(self.codec, rate=self.fps)
        stream.width, stream.height, stream.pix_fmt = width, height, self.pix_fmt
        stream.options = {"crf": str(self.crf), "preset": self.preset}
        if self.fragmented:  # no look-ahead: a frame is in the file as soon as the next one is encoded
            stream.options["tune"] = "zerolatency"
        return stream

    def _mux(self, packets: list[av.Packet]) -> None:
        for packet in packets:
            self._container.mux(packet)


def complete_fragments_end(path: str | PathLike[str]) -> int:
    """Byte offset just past the last whole media-data box (`mdat`) of an mp4: where a fragmented mp4 whose end was
    cut off (a full disk) can be truncated to play. 0 when it holds none."""
    with open(path, "rb") as f:
        size, pos, end = os.fstat(f.fileno()).st_size, 0, 0
        while pos + 8 <= size:
            f.seek(pos)
            header = f.read(16)
            box_size, kind = int.from_bytes(header[:4], "big"), header[4:8]
            if box_size == 1:  # a 64-bit size follows the type
                box_size = int.from_bytes(header[8:16], "big")
            elif box_size == 0:  # to the end of the file
                box_size = size - pos
            if box_size < 8 or pos + box_size > size:
                break
            pos += box_size
            if kind == b"mdat":
                end = pos
    return end


def read_video_frame_count(path: str | PathLike[str]) -> int:
    """Frames in the first video stream, counted from its packets (exact for H.264; no decoding)."""
    with _pyav().open(str(path)) as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size > 0)


def read_video_frames(path: str | PathLike[str]) -> np.ndarray:
    """Decode every frame of the first video stream: uint8 RGB ``[T, H, W, 3]``. For tests and short clips."""
    with _pyav().open(str(path)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    if not frames:
        raise ValueError(f"{path} holds no video frames")
    return np.stack(frames)
