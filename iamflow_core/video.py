"""Writing video to disk chunk by chunk (H.264 via PyAV), and reading it back.

`VideoWriter` encodes and muxes every chunk as it arrives, so memory stays flat however long the video gets (the
encoder holds a bounded look-ahead of a few dozen frames). Closing flushes that look-ahead and writes the index;
leaving its `with` block by an exception (Ctrl-C included) closes too, so every frame handed to `write` is in a
playable file.

Frame layout everywhere here: uint8 RGB ``[T, H, W, 3]``. The VAE's output convention (``[B, 3, T, H, W]`` in
[-1, 1]) converts with `to_uint8_frames`.
"""

from __future__ import annotations

import logging
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


class VideoWriter:
    """Writes uint8 RGB frames ``[T, H, W, 3]`` to an H.264 file, one chunk per `write` call.

    Use it as a context manager. The first `write` fixes the frame size; every later one must match. Not
    thread-safe: call it from one thread. `fragmented=True` writes a fragmented mp4, which stays playable up to
    the last keyframe even if the process is killed outright (SIGKILL, power loss); the default plain mp4 needs
    `close()` (which the `with` block always calls) and plays everywhere.

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
        fragmented: bool = False,
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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        options = {"movflags": "frag_keyframe+empty_moov"} if fragmented else {}
        self._container = _pyav().open(str(self.path), mode="w", options=options)
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
            self._stream = self._open_stream(width=frames.shape[2], height=frames.shape[1])
        elif self.size != (frames.shape[2], frames.shape[1]):
            w, h = self.size
            raise ValueError(
                f"frame size {frames.shape[2]}x{frames.shape[1]} differs from this video's {w}x{h}; "
                "every chunk of one video must have the same size"
            )
        for frame in frames:
            self._mux(self._stream.encode(_pyav().VideoFrame.from_ndarray(frame, format="rgb24")))
            self._frames_written += 1

    def close(self) -> None:
        """Flush the encoder and finish the file. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._stream is not None:
                self._mux(self._stream.encode(None))  # None drains the encoder's look-ahead
        finally:
            self._container.close()
        if self._stream is None:
            logger.warning("no frames were written; %s was not created", self.path)
            return
        logger.info("wrote %d frames (%.2f s) to %s", self._frames_written, self._frames_written / self.fps, self.path)

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
        except Exception:
            logger.exception("could not finish %s after %s", self.path, exc_type.__name__)
        else:
            logger.warning("stopped by %s; kept %d frames in %s", exc_type.__name__, self._frames_written, self.path)

    def _open_stream(self, width: int, height: int) -> av.VideoStream:
        if self.pix_fmt in _EVEN_SIZE_PIX_FMTS and (width % 2 or height % 2):
            raise ValueError(
                f"frame size {width}x{height} has an odd side, but {self.pix_fmt} needs even width and height; "
                f"crop or pad the frames to {width - width % 2}x{height - height % 2}, or use pix_fmt='yuv444p'"
            )
        stream = self._container.add_stream(self.codec, rate=self.fps)
        stream.width, stream.height, stream.pix_fmt = width, height, self.pix_fmt
        stream.options = {"crf": str(self.crf), "preset": self.preset}
        return stream

    def _mux(self, packets: list[av.Packet]) -> None:
        for packet in packets:
            self._container.mux(packet)


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
