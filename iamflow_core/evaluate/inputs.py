"""What `eval` reads: the batch renderer's `manifest.jsonl` and each video's story map.

The story map (`render.story_map`, written beside each video as `NAME.story.json`) lists the prompts, the entity
registry and one record per chunk with the prompt (`segment`) it belongs to. Chunks are all the same number of
latent frames (after the start image of an image-to-video render, which leads chunk 0), and the Wan2.1 VAE turns
latent frame 0 into one video frame and every later one into four, so a chunk's video frames follow from the
video's frame count (`chunk_frames`); `StoryLayout` holds the result: each prompt's frames and each entity's
prompts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import WAN21_TEMPORAL_FACTOR
from ..story.entities import EntityRegistry, RegistryError

STATUSES = ("done", "failed", "stopped", "skipped")
_KEYS = ("id", "video", "story_map", "frames", "seconds", "status", "error")


class EvalError(ValueError):
    """A bad input of `eval` (manifest, story map, video, model folder): the message names it and the fix."""


@dataclass(frozen=True)
class ManifestRow:
    """One story of the manifest; `video` and `story_map` are absolute paths."""

    id: str
    video: Path
    story_map: Path
    frames: int
    seconds: float
    status: str
    error: str | None
    line: int

    @property
    def where(self) -> str:
        return f"manifest line {self.line} (story {self.id!r})"

    @property
    def file_stem(self) -> str:
        """The id as a file name: characters other than letters, digits, `.`, `-` and `_` become `_`."""
        return re.sub(r"[^\w.-]", "_", self.id) or "_"


def _row(obj: Any, line: int, folder: Path) -> ManifestRow:
    if not isinstance(obj, dict):
        raise EvalError(f"manifest line {line} is {type(obj).__name__}, not a JSON object; one story per line")
    missing = [k for k in _KEYS if k not in obj]
    if missing:
        raise EvalError(f"manifest line {line} lacks {', '.join(missing)}; each line needs {', '.join(_KEYS)}")
    if obj["status"] not in STATUSES:
        raise EvalError(f"manifest line {line}: status {obj['status']!r} is not one of {', '.join(STATUSES)}")
    try:
        frames, seconds = int(obj["frames"]), float(obj["seconds"])
    except (TypeError, ValueError):
        raise EvalError(
            f"manifest line {line}: frames {obj['frames']!r} and seconds {obj['seconds']!r} must be numbers"
        ) from None
    return ManifestRow(
        id=str(obj["id"]), video=folder / str(obj["video"]), story_map=folder / str(obj["story_map"]),
        frames=frames, seconds=seconds, status=obj["status"], error=obj["error"], line=line,
    )  # fmt: skip


def read_manifest(path: str | Path) -> list[ManifestRow]:
    """Every row of `manifest.jsonl` (blank lines skipped); paths are taken relative to the manifest's folder.
    The files of "done" rows are checked here, so a missing one stops the eval before any model loads."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"manifest {path} does not exist; pass the manifest.jsonl the batch renderer wrote")
    rows, ids = [], set()
    for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise EvalError(f"manifest {path} line {line} is not JSON ({e.msg}); one JSON object per line") from None
        row = _row(obj, line, path.parent)
        if row.id in ids:
            raise EvalError(f"{row.where}: the id is used twice in {path}; give each story its own id")
        ids.add(row.id)
        rows.append(row)
    for row in rows:
        if row.status == "done":
            _check_files(row)
    return rows


def _check_files(row: ManifestRow) -> None:
    for what, file in (("video", row.video), ("story map", row.story_map)):
        if not file.is_file():
            raise EvalError(
                f"{row.where}: {what} {file} does not exist; render the story again (a batch rerun redoes it) "
                'or set its status to "failed"'
            )


@dataclass(frozen=True)
class StoryLayout:
    """Where a story's prompts and entities are in its video.

    segments: [start, end) video frames of each prompt, in order (prompts that got no chunk are left out).
    prompts: the prompt of each entry of `segments`. entities: entity id -> indices into `segments` where the
    registry says the entity appears. names: entity id -> name.
    """

    segments: tuple[tuple[int, int], ...]
    prompts: tuple[str, ...]
    entities: dict[int, tuple[int, ...]]
    names: dict[int, str]


def chunk_frames(num_chunks: int, video_frames: int, where: str) -> list[tuple[int, int]]:
    """[start, end) video frames of each of `num_chunks` equal chunks of a Wan2.1 video of `video_frames`.

    Latent frame 0 is one video frame, every later one `WAN21_TEMPORAL_FACTOR` (4). Text-to-video: the chunks
    share the latent frames from 0. Image-to-video (`generate --image`): the start image is latent frame 0 and leads
    chunk 0's frames; the chunks share the latent frames after it. Only one of the two fits a given count (with
    more than one chunk), so the story map need not say which.
    """
    factor, chunks = WAN21_TEMPORAL_FACTOR, max(num_chunks, 1)
    after_first, rest = divmod(video_frames - 1, factor)  # latent frames after latent frame 0
    if video_frames >= 1 and not rest and after_first >= chunks - 1:
        if (after_first + 1) % chunks == 0:  # text-to-video
            per_chunk = (after_first + 1) // chunks
            starts = [0] + [factor * k * per_chunk - (factor - 1) for k in range(1, chunks + 1)]
            return list(zip(starts[:-1], starts[1:]))
        if after_first % chunks == 0 and after_first:  # image-to-video
            per_chunk = after_first // chunks
            starts = [0] + [1 + factor * k * per_chunk for k in range(1, chunks + 1)]
            return list(zip(starts[:-1], starts[1:]))
    raise EvalError(
        f"{where}: {video_frames} video frames do not split into {num_chunks} equal chunks of the Wan2.1 VAE "
        f"(1 + {factor} x latent frames after the first); was the video cut or re-encoded? render the story again"
    )


def _segments(chunks: list[dict], ranges: list[tuple[int, int]], where: str) -> dict[int, tuple[int, int]]:
    spans: dict[int, tuple[int, int]] = {}
    for chunk, (start, end) in zip(chunks, ranges):
        segment = chunk.get("segment") if isinstance(chunk, dict) else None
        if not isinstance(segment, int):
            raise EvalError(f"{where}: a chunk record has no integer 'segment'; write the story map again")
        if segment in spans and spans[segment][1] != start:
            raise EvalError(f"{where}: the chunks of prompt {segment} are not consecutive; write the map again")
        spans[segment] = (spans.get(segment, (start, end))[0], end)
    return spans


def _registry(data: dict, num_prompts: int, where: str) -> EntityRegistry | None:
    raw = data.get("registry") or (data.get("memory") or {}).get("registry")
    if not raw:
        return None
    try:
        return EntityRegistry.from_json(raw, num_segments=num_prompts)
    except RegistryError as e:
        raise EvalError(f"{where}: its entity registry is invalid: {e}") from None


def read_story_layout(path: Path, video_frames: int) -> StoryLayout:
    """The layout of the story whose map is at `path` and whose video has `video_frames` frames."""
    where = f"story map {path}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EvalError(f"{where} is not JSON ({e.msg} at line {e.lineno}); write the story map again") from None
    if not isinstance(data, dict) or not isinstance(data.get("prompts"), list) or not data.get("chunks"):
        raise EvalError(f"{where} lacks 'prompts' or 'chunks'; pass the .story.json the renderer wrote")
    prompts, chunks = data["prompts"], data["chunks"]
    spans = _segments(chunks, chunk_frames(len(chunks), video_frames, where), where)
    order = sorted(spans)
    registry = _registry(data, len(prompts), where)
    entities: dict[int, list[int]] = {}
    if registry is not None:
        for index, segment in enumerate(order):
            for entity in registry.ids_in(segment) if segment < len(registry.prompts) else ():
                entities.setdefault(entity, []).append(index)
    return StoryLayout(
        segments=tuple(spans[s] for s in order),
        prompts=tuple(str(prompts[s]) if s < len(prompts) else "" for s in order),
        entities={e: tuple(v) for e, v in entities.items()},
        names={e.id: e.name for e in registry.entities} if registry is not None else {},
    )
