import logging

import numpy as np
import pytest
import torch

from iamflow_core.video import VideoWriter, read_video_frame_count, read_video_frames, to_uint8_frames

H, W = 48, 64
CHUNK_FRAMES = (9, 12, 12)  # chunk 0 decodes to 9 video frames, every later chunk to 12


def flat_chunk(frames: int, value: int) -> np.ndarray:
    """One flat grey per chunk: H.264 keeps flat images within a few levels, so chunks stay recognisable."""
    return np.full((frames, H, W, 3), value, dtype=np.uint8)


def chunk_means(video: np.ndarray) -> list[float]:
    return [float(f.mean()) for f in video]


def test_three_chunks_round_trip(tmp_path):
    path = tmp_path / "nested" / "dir" / "out.mp4"  # parents are created
    with VideoWriter(path) as writer:
        for i, n in enumerate(CHUNK_FRAMES):
            writer.write(flat_chunk(n, 40 + 80 * i))
        assert writer.frames_written == 33
    assert writer.closed
    assert read_video_frame_count(path) == 33
    video = read_video_frames(path)
    assert video.shape == (33, H, W, 3) and video.dtype == np.uint8
    expected = [40.0] * 9 + [120.0] * 12 + [200.0] * 12
    assert np.allclose(chunk_means(video), expected, atol=3)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_exception_inside_with_keeps_finished_chunks(tmp_path, caplog, error):
    path = tmp_path / "interrupted.mp4"
    with pytest.raises(error), caplog.at_level(logging.WARNING), VideoWriter(path) as writer:
        writer.write(flat_chunk(9, 50))
        writer.write(flat_chunk(12, 150))
        raise error("stopped mid-run")
    assert writer.closed
    assert f"stopped by {error.__name__}; kept 21 frames" in caplog.text
    assert read_video_frame_count(path) == 21
    video = read_video_frames(path)
    assert len(video) == 21
    assert np.allclose(chunk_means(video), [50.0] * 9 + [150.0] * 12, atol=3)


def test_fragmented_mp4_round_trip(tmp_path):
    path = tmp_path / "frag.mp4"
    with VideoWriter(path, fps=8, fragmented=True) as writer:
        writer.write(flat_chunk(9, 10))
        writer.write(flat_chunk(12, 90))
    assert read_video_frame_count(path) == 21


def test_float_and_torch_inputs(tmp_path):
    path = tmp_path / "float.mp4"
    with VideoWriter(path) as writer:
        writer.write(np.full((3, H, W, 3), 0.5, dtype=np.float32))  # float in [0, 1]
        writer.write(torch.full((3, H, W, 3), 1.0, dtype=torch.bfloat16))
        writer.write(torch.zeros((2, H, W, 3), dtype=torch.uint8))
        writer.write(np.zeros((0, H, W, 3), dtype=np.uint8))  # an empty chunk is a no-op
    means = chunk_means(read_video_frames(path))
    assert np.allclose(means, [128] * 3 + [255] * 3 + [0] * 2, atol=3)


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        (np.zeros((2, 3, H, W), np.uint8), r"for \[T, 3, H, W\] use frames.permute"),
        (np.zeros((H, W, 3), np.uint8), r"must be \[T, H, W, 3\] RGB"),
        (np.full((2, H, W, 3), -0.5, np.float32), r"use to_uint8_frames\(\)"),
        (np.full((2, H, W, 3), 300, np.int32), "integer frames must lie in 0..255"),
        (np.zeros((2, 47, W, 3), np.uint8), "frame size 64x47 has an odd side.*pad the frames to 64x46"),
    ],
)
def test_bad_frames(tmp_path, frames, message):
    with VideoWriter(tmp_path / "bad.mp4") as writer, pytest.raises(ValueError, match=message):
        writer.write(frames)
    assert not (tmp_path / "bad.mp4").exists()  # nothing written, no half-made file


def test_size_change_and_write_after_close(tmp_path):
    writer = VideoWriter(tmp_path / "a.mp4")
    writer.write(flat_chunk(2, 0))
    with pytest.raises(ValueError, match="frame size 66x48 differs from this video's 64x48"):
        writer.write(np.zeros((1, H, W + 2, 3), np.uint8))
    writer.close()
    writer.close()  # idempotent
    with pytest.raises(RuntimeError, match="is closed"):
        writer.write(flat_chunk(1, 0))
    assert read_video_frame_count(tmp_path / "a.mp4") == 2


def test_writer_argument_checks(tmp_path):
    with pytest.raises(ValueError, match=r"must end in one of \.mp4"):
        VideoWriter(tmp_path / "out.avi")
    with pytest.raises(ValueError, match="crf must be in 0..51"):
        VideoWriter(tmp_path / "out.mp4", crf=80)


def test_to_uint8_frames_from_vae_convention():
    video = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0, 1.7]).view(1, 1, 6, 1, 1).expand(1, 3, 6, 2, 4)
    frames = to_uint8_frames(video)
    assert frames.shape == (6, 2, 4, 3) and frames.dtype == np.uint8
    assert frames[:, 0, 0, 0].tolist() == [0, 64, 128, 191, 255, 255]  # (x + 1) * 127.5, rounded, clamped
    channels = torch.stack([torch.full((2, 2, 2), v) for v in (-1.0, 0.0, 1.0)])  # [3, T, H, W]
    assert to_uint8_frames(channels)[0, 0, 0].tolist() == [0, 128, 255]  # channel order kept
    with pytest.raises(ValueError, match="batch of 2"):
        to_uint8_frames(torch.zeros(2, 3, 1, 2, 2))
    with pytest.raises(ValueError, match=r"expects \[B, 3, T, H, W\]"):
        to_uint8_frames(torch.zeros(1, 2, 4, 3))
