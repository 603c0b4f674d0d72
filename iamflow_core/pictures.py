"""Pictures an artist reads at a glance: the story map after a render, the chunk plan before it, the entities.

- `story_map_picture` draws the story map the CLI writes next to a video (``*.story.json``): the prompts along
  time, one lane per entity with the frames archived in it and the lines back to them where they returned; for
  MemFlow the recorded frames and how long each stayed in memory. `story_map_summary` says the same in plain lines.
- `plan_picture` draws a `ChunkPlan` (a node preview, ~600x160); `entity_sheet` and `entity_sheet_text` show an
  `EntityRegistry`.

Pure PIL, no ComfyUI. Text is at least 12 px; a label that does not fit its place is cut with "…" or left out, so
labels never overlap. An entity has the same colour in every picture (`entity_colour`). Save a picture with
``image.save(path)``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from .story import ChunkPlan
from .story.entities import Entity, EntityRegistry

logger = logging.getLogger(__name__)

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont
Colour = tuple[int, int, int]

UNTAGGED = 0  # the lane of frames archived without an entity (entity ids start at 1)
MIN_WIDTH = 400

BACKGROUND: Colour = (255, 255, 255)
INK: Colour = (34, 34, 34)
MUTED: Colour = (110, 110, 110)
RULE: Colour = (200, 200, 200)
LANE_SHADE: Colour = (246, 246, 246)
UNTAGGED_COLOUR: Colour = (90, 90, 90)
MEMFLOW_COLOUR: Colour = (31, 119, 180)
# Saturated colours that stay apart on white; entity id n takes colour (n - 1) mod 12.
ENTITY_PALETTE: tuple[Colour, ...] = (
    (31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207),
    (140, 86, 75), (227, 119, 194), (188, 189, 34), (57, 59, 121), (173, 73, 74), (82, 84, 163),
)  # fmt: skip
# Soft backgrounds for the prompt bands, light enough for dark text.
PROMPT_PALETTE: tuple[Colour, ...] = (
    (226, 234, 246), (247, 234, 220), (227, 242, 227), (242, 229, 240), (246, 242, 214), (223, 240, 242),
)  # fmt: skip

TEXT_PX, SMALL_PX, TITLE_PX = 13, 12, 16
LINE_PX = 18  # one line of TEXT_PX text with its leading
MARGIN = 12


def entity_colour(entity_id: int) -> Colour:
    """The colour of entity `entity_id` in every picture (frames without an entity: dark grey)."""
    return UNTAGGED_COLOUR if entity_id == UNTAGGED else ENTITY_PALETTE[(entity_id - 1) % len(ENTITY_PALETTE)]


def _prompt_colour(segment: int) -> Colour:
    """The band colour of prompt `segment` (0-based)."""
    return PROMPT_PALETTE[segment % len(PROMPT_PALETTE)]


# ---------------------------------------------------------------------------------------------------------------
# fonts and text


@functools.lru_cache(maxsize=8)
def _font(size: int) -> Font:
    """PIL's default font at `size` px: scalable with FreeType (Pillow >= 10.1), else the fixed bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError) as e:  # Pillow < 10.1 has no size; no FreeType has no scalable font
        logger.debug("no scalable default font (%s); labels use PIL's small bitmap font", e)
        return ImageFont.load_default()


def _fit(text: str, face: Font, max_px: float, min_chars: int = 0) -> str:
    """`text`, cut at the end with "…" to fit `max_px`; "" when fewer than `min_chars` characters (or not even
    "…") would be left."""
    if face.getlength(text) <= max_px:
        return text
    lo, hi = 0, len(text)  # the longest prefix that fits with the ellipsis: binary search
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if face.getlength(text[:mid].rstrip() + "…") <= max_px:
            lo = mid
        else:
            hi = mid - 1
    cut = text[:lo].rstrip() + "…"
    return cut if face.getlength(cut) <= max_px and len(cut) > min_chars else ""


def _first_fitting(options: Sequence[str], face: Font, max_px: float) -> str:
    """The first of `options` that fits whole, else the last one cut to fit (or "" when that keeps less than four
    characters: "A w…" says nothing)."""
    for option in options:
        if face.getlength(option) <= max_px:
            return option
    return _fit(options[-1], face, max_px, min_chars=4) if options else ""


def _wrap(text: str, face: Font, max_px: float, max_lines: int) -> list[str]:
    """Word-wrap `text` into at most `max_lines` lines of `max_px`; the last line is cut with "…"."""
    lines: list[str] = []
    words = text.split()
    while words and len(lines) < max_lines:
        line = words.pop(0)
        while words and face.getlength(f"{line} {words[0]}") <= max_px:
            line = f"{line} {words.pop(0)}"
        lines.append(line)
    if words:
        lines[-1] = f"{lines[-1]} {' '.join(words)}"
    return [_fit(line, face, max_px) for line in lines]


def _seconds(s: float) -> str:
    """A duration as a person reads it: "0.75 s", "9.75 s", "58.6 s", "3 min 5 s"."""
    if s >= 120:
        minutes, rest = divmod(round(s), 60)
        return f"{minutes} min {rest} s" if rest else f"{minutes} min"
    return f"{round(s, 0 if s >= 100 else 1 if s >= 10 else 2):g} s"


def _clock(s: float) -> str:
    """An axis tick: "5 s", "1:30"."""
    return f"{s:g} s" if s < 60 else f"{int(s) // 60}:{int(s) % 60:02d}"


def _megabytes(mb: float) -> str:
    if mb >= 1024:
        return f"{mb / 1024:.1f} GB"
    return f"{mb:.0f} MB" if mb >= 10 else f"{mb:.1f} MB"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _numbers(indices: Sequence[int]) -> str:
    """0-based indices as 1-based numbers, runs of three or more joined: [0, 1, 2, 5] -> "1 to 3, 6"."""
    values = sorted(set(indices))
    parts, i = [], 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        if j - i >= 2:
            parts.append(f"{values[i] + 1} to {values[j] + 1}")
        else:
            parts += [str(v + 1) for v in values[i : j + 1]]
        i = j + 1
    return ", ".join(parts)


def _prompts_phrase(segments: Sequence[int], last: str = ", ") -> str:
    """ "prompt 2", "prompts 1, 3" ("prompts 1 and 3" with `last` " and "), "no prompt"."""
    if not segments:
        return "no prompt"
    head, _, tail = _numbers(segments).rpartition(", ")
    return f"{'prompt' if len(set(segments)) == 1 else 'prompts'} {head + last if head else ''}{tail}"


def _who(entity: Entity) -> str:
    """ "the woman (#1)", "Nora (#3)": a common noun takes "the", a name (capitalised) does not."""
    name = entity.name.strip()
    first = name.split()[0].lower()
    article = "" if name[0].isupper() or first in ("the", "a", "an") else "the "
    return f"{article}{name} (#{entity.id})"


# ---------------------------------------------------------------------------------------------------------------
# reading the story map


class StoryMapError(ValueError):
    """A story map without the keys the pictures read. The message names the key and what to pass instead."""


@dataclass(frozen=True)
class _Frame:
    """An archived frame, from its summary: latent frame index, the chunk and prompt it came from, its entities."""

    frame: int
    chunk: int
    segment: int
    entities: tuple[int, ...]
    picture: str | None = None  # a reference picture (its name), archived before the first chunk


@dataclass(frozen=True)
class _Switch:
    """A prompt switch of the identity memory: the entities it wanted and the frames it brought back."""

    chunk: int
    segment: int
    wanted: tuple[int, ...]
    frames: tuple[_Frame, ...]


@dataclass(frozen=True)
class _Map:
    """The story map, typed: what the pictures and the summary read of it."""

    title: str | None
    prompts: tuple[str, ...]
    registry: EntityRegistry | None
    mode: str  # "identity", "memflow", "none" (or a newer policy's name)
    chunk_segments: tuple[int, ...]  # the prompt of each rendered chunk
    archived: tuple[_Frame, ...]  # every frame ever archived, in order
    evicted: frozenset[int]  # latent frame indices dropped from the archive later
    switches: tuple[_Switch, ...]
    memory_frames: tuple[tuple[int, ...], ...]  # per chunk: the frames in memory while it was made
    recorded: tuple[tuple[int, int], ...]  # MemFlow: (chunk, latent frame) of each recording
    corrections: tuple[tuple[int, tuple[str, ...]], ...]
    late_verdicts: int
    verdicts_used: int
    verifier_skipped: int
    peak_mb: float | None
    seconds_per_chunk: float = 0.75  # of the model that made the video (0.25 s with one latent frame per chunk)

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_segments)

    @property
    def segment_chunks(self) -> tuple[int, ...]:
        """Chunks rendered per prompt; 0 for prompts a cancelled run never reached."""
        counts = [0] * max(len(self.prompts), max(self.chunk_segments, default=-1) + 1)
        for segment in self.chunk_segments:
            counts[segment] += 1
        return tuple(counts)

    @property
    def entities(self) -> tuple[Entity, ...]:
        return self.registry.entities if self.registry is not None else ()

    def segments_of(self, entity_id: int) -> list[int]:
        """The prompts (0-based) whose registry entry names `entity_id`."""
        prompts = self.registry.prompts if self.registry is not None else ()
        return [i for i, mentions in enumerate(prompts) if any(m.entity == entity_id for m in mentions)]


def _need(obj: Any, key: str, kind: type, where: str) -> Any:
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, kind):
        raise StoryMapError(
            f"{where} has no {key!r} {kind.__name__} (got {type(value).__name__}); pass the dict the CLI writes "
            "to *.story.json (json.load it), or RenderResult.memory_map wrapped the same way"
        )
    return value


def _frame(summary: Any) -> _Frame:
    for key in ("frame", "chunk", "segment"):
        _need(summary, key, int, "an archived frame's summary")
    picture = str(summary.get("image") or "picture") if summary.get("reference") else None
    entities = tuple(summary.get("entities") or ())
    return _Frame(summary["frame"], summary["chunk"], summary["segment"], entities, picture)


def _registry(story_map: dict, memory: dict) -> EntityRegistry | None:
    """The registry of the map; the memory's copy (with the verifier's corrections) when the top one is absent."""
    data = story_map.get("registry") or memory.get("registry")
    if not data:
        return None
    return EntityRegistry.from_json(data, source=str(data.get("source", "user")))


def _archived(chunks: list, memory: dict) -> tuple[tuple[_Frame, ...], frozenset[int]]:
    """Every archived frame (from the chunk reports, the final archive and the evictions), in chunk order, and the
    latent frames evicted later. Frames of chunks the map does not list are left out."""
    evicted = [_frame(e["evicted"]) for e in memory.get("events") or () if "evicted" in e]
    reported = [f for c in chunks for f in map(_frame, c.get("archived") or ())]
    frames: dict[int, _Frame] = {}
    for f in [*reported, *map(_frame, memory.get("archive") or ()), *evicted]:
        if f.chunk < len(chunks):
            frames.setdefault(f.frame, f)
    return tuple(sorted(frames.values(), key=lambda f: (f.chunk, f.frame))), frozenset(f.frame for f in evicted)


def _switch(index: int, report: dict) -> _Switch:
    retrieved = report["retrieved"]
    frames = tuple(map(_frame, retrieved.get("frames") or ()))
    return _Switch(report.get("chunk", index), report["segment"], tuple(retrieved.get("wanted") or ()), frames)


def _read_map(story_map: dict) -> _Map:
    prompts = _need(story_map, "prompts", list, "the story map")
    chunks = _need(story_map, "chunks", list, "the story map")
    segments = tuple(_need(c, "segment", int, f"chunk {i} of the story map") for i, c in enumerate(chunks))
    memory = story_map.get("memory") or {}
    archived, evicted = _archived(chunks, memory)
    return _Map(
        title=story_map.get("title"),
        prompts=tuple(str(p) for p in prompts),
        registry=_registry(story_map, memory),
        mode=str(memory.get("mode") or ("identity" if "archive" in memory else "none")),
        chunk_segments=segments,
        archived=archived,
        evicted=evicted,
        switches=tuple(_switch(i, c) for i, c in enumerate(chunks) if c.get("retrieved") is not None),
        memory_frames=tuple(tuple(c.get("memory_frames") or ()) for c in chunks),
        recorded=tuple((i, c["recorded_frame"]) for i, c in enumerate(chunks) if c.get("recorded_frame") is not None),
        corrections=tuple((int(k), tuple(v)) for k, v in (memory.get("corrections") or {}).items()),
        late_verdicts=int(memory.get("late_verdicts") or 0),
        verdicts_used=int(memory.get("verdicts_used") or 0),
        verifier_skipped=int(memory.get("verifier_skipped") or 0),
        peak_mb=memory.get("peak_archive_mb"),
        seconds_per_chunk=_seconds_per_chunk(story_map),
    )


def _seconds_per_chunk(story_map: dict) -> float:
    """The map counts chunks; their length comes from the map's `chunk_frames` (latent frames per chunk; a map
    written before it was recorded has the default 3, 0.75 s)."""
    frames = story_map.get("chunk_frames", ChunkPlan((1,), (0.0,)).chunk_frames)
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise StoryMapError(f"the story map's chunk_frames must be a whole number >= 1, got {frames!r}")
    return ChunkPlan((1,), (0.0,), chunk_frames=frames).seconds_per_chunk


# ---------------------------------------------------------------------------------------------------------------
# shared drawing: prompt bands, the time axis, legend symbols


@dataclass(frozen=True)
class _Band:
    """One prompt's band: its 0-based index, first chunk, chunk count and label lines (each a list of options)."""

    segment: int
    start: int
    chunks: int
    lines: tuple[tuple[str, ...], ...]


def _draw_bands(draw: ImageDraw.ImageDraw, bands: Sequence[_Band], box: tuple[float, float, float, float]) -> None:
    """Prompt bands side by side in `box` (x0, y0, x1, y1), scaled by chunk count; each label line takes the
    first of its options that fits the band, else is cut; lines that do not fit the height are left out."""
    x0, y0, x1, y1 = box
    total = max(1, sum(b.chunks for b in bands))
    per_chunk = (x1 - x0) / total
    face = _font(TEXT_PX)
    for band in bands:
        left, right = x0 + band.start * per_chunk, x0 + (band.start + band.chunks) * per_chunk
        draw.rectangle((left, y0, right, y1), fill=_prompt_colour(band.segment))
        draw.line((left, y0, left, y1), fill=BACKGROUND, width=2)
        room = right - left - 8
        for n, options in enumerate(band.lines):
            y = y0 + 4 + n * (LINE_PX - 1)
            if y + TEXT_PX + 2 > y1 or room < 6:
                break
            draw.text((left + 5, y), _first_fitting(options, face, room), fill=INK, font=face)


def _tick_step(seconds: float, px: float) -> float:
    """The smallest round step that leaves at least 64 px between tick labels."""
    for step in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1200, 3600):
        if seconds <= 0 or step / seconds * px >= 64:
            return step
    return 3600.0


def _draw_axis(draw: ImageDraw.ImageDraw, x0: float, x1: float, y: float, seconds: float) -> None:
    """A time axis from 0 to `seconds` along x0..x1 at height y, ticks labelled in seconds (or m:ss)."""
    face = _font(SMALL_PX)
    draw.line((x0, y, x1, y), fill=MUTED, width=1)
    step = _tick_step(seconds, x1 - x0)
    tick = 0.0
    while tick <= seconds + 1e-9:
        x = x0 + (x1 - x0) * (tick / seconds if seconds > 0 else 0)
        draw.line((x, y, x, y + 4), fill=MUTED)
        label = _clock(round(tick, 2))
        width = face.getlength(label)
        draw.text((min(max(x - width / 2, x0), x1 - width), y + 5), label, fill=MUTED, font=face)
        tick += step


def _dot(draw: ImageDraw.ImageDraw, x: float, y: float, colour: Colour, r: float = 4, hollow: bool = False) -> None:
    fill = BACKGROUND if hollow else colour
    draw.ellipse((x - r, y - r, x + r, y + r), fill=fill, outline=colour, width=2 if hollow else 1)


def _diamond(draw: ImageDraw.ImageDraw, x: float, y: float, colour: Colour, hollow: bool = False) -> None:
    r = 6
    points = [(x, y - r), (x + r, y), (x, y + r), (x - r, y)]
    draw.polygon(points, fill=BACKGROUND if hollow else colour, outline=INK if not hollow else colour, width=2)


def _picture(draw: ImageDraw.ImageDraw, x: float, y: float, colour: Colour) -> None:
    """A reference picture: a small framed square."""
    draw.rectangle((x - 5, y - 5, x + 5, y + 5), fill=BACKGROUND, outline=colour, width=2)
    draw.rectangle((x - 2, y - 2, x + 2, y + 2), fill=colour)


def _arc(draw: ImageDraw.ImageDraw, x0: float, x1: float, base: float, peak: float, colour: Colour) -> None:
    """A parabola from (x0, base) up to `peak` and down to (x1, base)."""
    steps = int(max(8, min(48, abs(x1 - x0) / 4)))
    points = [(x0 + (x1 - x0) * t / steps, base - (base - peak) * 4 * (t / steps) * (1 - t / steps))
              for t in range(steps + 1)]  # fmt: skip
    draw.line(points, fill=colour, width=2, joint="curve")


@dataclass(frozen=True)
class _LegendItem:
    symbol: Callable[[ImageDraw.ImageDraw, float, float], None]  # draws itself centred at (x, y)
    text: str


def _legend_rows(items: Sequence[_LegendItem], max_px: float) -> list[list[tuple[float, _LegendItem, str]]]:
    """Items flowed into rows of `max_px`: each (x offset, item, text fitted to what is left of the row)."""
    face = _font(SMALL_PX)
    rows: list[list[tuple[float, _LegendItem, str]]] = [[]]
    x = 0.0
    for item in items:
        width = 22 + face.getlength(item.text)
        if rows[-1] and x + width > max_px:
            rows.append([])
            x = 0.0
        rows[-1].append((x, item, _fit(item.text, face, max_px - x - 22)))
        x += width + 18
    return rows if rows[0] else []


def _draw_legend(draw: ImageDraw.ImageDraw, rows: list, x0: float, y0: float) -> None:
    face = _font(SMALL_PX)
    for r, row in enumerate(rows):
        y = y0 + r * LINE_PX
        for x, item, text in row:
            item.symbol(draw, x0 + x + 8, y + 8)
            draw.text((x0 + x + 20, y + 1), text, fill=INK, font=face)


# ---------------------------------------------------------------------------------------------------------------
# the story map picture


@dataclass(frozen=True)
class StoryMapLayout:
    """Where things stand in `story_map_picture` (pixels of the image). Chunk c spans
    [chunk_left(c), chunk_left(c + 1)) in x. `lanes` are, for identity memory, entity ids (`UNTAGGED` for frames
    without an entity); for MemFlow, memory rows 0..n-1; without memory, one empty lane 0."""

    width: int
    plot_left: int
    plot_right: int
    num_chunks: int
    band_top: int
    band_height: int
    lanes_top: int
    lane_height: int
    lanes: tuple[int, ...]

    @property
    def lanes_bottom(self) -> int:
        return self.lanes_top + self.lane_height * max(1, len(self.lanes))

    def chunk_left(self, chunk: float) -> float:
        return self.plot_left + (self.plot_right - self.plot_left) * chunk / max(1, self.num_chunks)

    def chunk_x(self, chunk: float) -> float:
        """The centre of chunk `chunk`, where its marks go."""
        return self.chunk_left(chunk + 0.5)

    def lane_box(self, lane: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of lane `lane` over the time axis (label column excluded)."""
        if lane not in self.lanes:
            raise KeyError(f"no lane {lane} in this picture (lanes: {list(self.lanes)})")
        top = self.lanes_top + self.lanes.index(lane) * self.lane_height
        return self.plot_left, top, self.plot_right, top + self.lane_height


def _memflow_rows(view: _Map) -> list[list[int]]:
    """Recorded frames packed into rows so that no two frames' time spans overlap in a row (at most 8 rows)."""
    spans = {frame: [chunk, chunk] for chunk, frame in view.recorded}
    for chunk, frames in enumerate(view.memory_frames):
        for frame in frames:
            spans.setdefault(frame, [chunk, chunk])[1] = chunk
    rows: list[list[int]] = []
    ends: list[int] = []
    for frame, (start, end) in sorted(spans.items(), key=lambda item: item[1][0]):
        free = next((r for r, last in enumerate(ends) if last < start), None)
        if free is None and len(rows) < 8:
            rows.append([])
            ends.append(-1)
            free = len(rows) - 1
        free = free if free is not None else start % len(rows)  # too many: share rows
        rows[free].append(frame)
        ends[free] = max(ends[free], end)
    return rows


def _lanes(view: _Map) -> tuple[tuple[int, ...], int]:
    """The lanes of `view` and their height in pixels."""
    if view.mode == "memflow":
        return tuple(range(max(1, len(_memflow_rows(view))))), 16
    if view.mode != "identity":
        return (0,), 30
    lanes = [e.id for e in view.entities]
    frames = list(view.archived) + [f for s in view.switches for f in s.frames]
    if not lanes or any(not f.entities for f in frames):
        lanes.append(UNTAGGED)
    return tuple(lanes), 30


def story_map_layout(story_map: dict, width: int = 1200) -> StoryMapLayout:
    """The layout `story_map_picture(story_map, width)` draws with (for overlays and tests)."""
    return _layout(_read_map(story_map), width)


def _layout(view: _Map, width: int) -> StoryMapLayout:
    if width < MIN_WIDTH:
        raise ValueError(f"width {width} px is too narrow for a story map; use at least {MIN_WIDTH}")
    lanes, lane_height = _lanes(view)
    band_top = MARGIN + LINE_PX + 10
    band_height = 2 * LINE_PX + 6
    label_px = min(200, max(110, width // 6))
    return StoryMapLayout(
        width=width,
        plot_left=MARGIN + label_px,
        plot_right=width - MARGIN - 4,
        num_chunks=view.num_chunks,
        band_top=band_top,
        band_height=band_height,
        lanes_top=band_top + band_height + 6,
        lane_height=lane_height,
        lanes=lanes,
    )


def _story_bands(view: _Map) -> list[_Band]:
    bands, start = [], 0
    per_chunk = view.seconds_per_chunk
    for segment, chunks in enumerate(view.segment_chunks):
        if chunks:
            number, seconds = str(segment + 1), _seconds(chunks * per_chunk)
            words = view.prompts[segment] if segment < len(view.prompts) else ""
            bands.append(_Band(segment, start, chunks, ((f"{number} · {seconds}", number), (words,))))
        start += chunks
    return bands


def story_map_picture(story_map: dict, width: int = 1200) -> Image.Image:
    """An RGB picture of a story map (the dict of a ``*.story.json``), `width` px wide, as tall as it needs.

    Top to bottom: the title and memory mode; the prompts as coloured bands along time (x = chunks) labelled
    "1 · 3 s" and the prompt's first words; the memory lanes (identity: one lane per entity, tinted where the
    entity is in the prompt, a dot per archived frame at the chunk it came from, a diamond where frames came back at
    a prompt switch with a line back to where each was archived; MemFlow: a dot per recorded frame and a bar while it
    is in memory; none: a line saying so); a time axis; a legend; every prompt in full-ish, one line each.
    Raises StoryMapError when the dict lacks "prompts" or "chunks"."""
    view = _read_map(story_map)
    layout = _layout(view, width)
    legend = _legend_rows(_LEGENDS.get(view.mode, _no_memory_legend)(view), width - 2 * MARGIN)
    columns = 2 if width >= 900 and len(view.prompts) > 3 else 1
    prompt_rows = -(-len(view.prompts) // columns)
    legend_top = layout.lanes_bottom + 30
    prompts_top = legend_top + len(legend) * LINE_PX + 8
    image = Image.new("RGB", (width, prompts_top + prompt_rows * LINE_PX + MARGIN), BACKGROUND)
    draw = ImageDraw.Draw(image)
    _draw_header(draw, view, width)
    band_box = (layout.plot_left, layout.band_top, layout.plot_right, layout.band_top + layout.band_height)
    _draw_bands(draw, _story_bands(view), band_box)
    _draw_lane_grid(draw, view, layout)
    _PAINTERS.get(view.mode, _paint_no_memory)(draw, view, layout)
    _draw_axis(draw, layout.plot_left, layout.plot_right, layout.lanes_bottom + 4, _video_seconds(view))
    _draw_legend(draw, legend, MARGIN, legend_top)
    _draw_prompt_list(draw, view, (MARGIN, prompts_top, width - MARGIN), columns)
    return image


def _video_seconds(view: _Map) -> float:
    return view.num_chunks * view.seconds_per_chunk


def _memory_name(view: _Map) -> str:
    names = {"identity": "identity memory", "memflow": "MemFlow memory", "none": "no memory"}
    return names.get(view.mode, f"{view.mode} memory")


def _mode_text(view: _Map) -> str:
    return " · ".join((_memory_name(view), _plural(view.num_chunks, "chunk"), _seconds(_video_seconds(view))))


def _draw_header(draw: ImageDraw.ImageDraw, view: _Map, width: int) -> None:
    small, title_face = _font(TEXT_PX), _font(TITLE_PX)
    right = _mode_text(view)
    right_px = small.getlength(right)
    draw.text((width - MARGIN - right_px, MARGIN + 2), right, fill=MUTED, font=small)
    title = _fit(view.title or "Story map", title_face, width - 2 * MARGIN - right_px - 16)
    draw.text((MARGIN, MARGIN), title, fill=INK, font=title_face)


def _lane_label(view: _Map, lane: int) -> str:
    if view.mode == "memflow":
        return "in memory" if lane == 0 else ""
    if view.mode != "identity":
        return ""
    if lane == UNTAGGED:
        return "no entity" if view.registry is not None else "frames"
    entity = view.registry.entity(lane)
    return f"#{entity.id} {entity.name}"


def _draw_lane_grid(draw: ImageDraw.ImageDraw, view: _Map, layout: StoryMapLayout) -> None:
    """Lane backgrounds, entity tints where the entity is in the prompt, labels, and the prompt switch lines."""
    face = _font(TEXT_PX)
    starts = [sum(view.segment_chunks[:s]) for s in range(len(view.segment_chunks))]
    for index, lane in enumerate(layout.lanes):
        x0, y0, x1, y1 = layout.lane_box(lane)
        draw.rectangle((x0, y0, x1, y1 - 1), fill=LANE_SHADE if index % 2 == 0 else BACKGROUND)
        if view.mode == "identity" and lane != UNTAGGED:
            tint = _tint(entity_colour(lane), 0.16)
            for segment in view.segments_of(lane):
                if segment < len(starts) and view.segment_chunks[segment]:
                    left = layout.chunk_left(starts[segment])
                    right = layout.chunk_left(starts[segment] + view.segment_chunks[segment])
                    draw.rectangle((left, y0 + 2, right, y1 - 3), fill=tint)
        label = _fit(_lane_label(view, lane), face, layout.plot_left - MARGIN - 8)
        draw.text((MARGIN, y0 + (layout.lane_height - TEXT_PX) / 2 - 1), label, fill=INK, font=face)
    for start in starts[1:]:
        if start < view.num_chunks:
            x = layout.chunk_left(start)
            draw.line((x, layout.band_top, x, layout.lanes_bottom), fill=RULE, width=1)


def _tint(colour: Colour, amount: float) -> Colour:
    """`colour` mixed with white: `amount` 1 is the colour itself."""
    return tuple(round(255 - (255 - c) * amount) for c in colour)  # type: ignore[return-value]


def _paint_identity(draw: ImageDraw.ImageDraw, view: _Map, layout: StoryMapLayout) -> None:
    """Dots where frames were archived (in the lanes of their entities), diamonds and arcs where they came back."""
    for frame in view.archived:
        for lane in frame.entities or (UNTAGGED,):
            if lane in layout.lanes:
                _, y0, _, y1 = layout.lane_box(lane)
                if frame.picture is not None:  # before the first chunk, left of 0 s
                    _picture(draw, layout.chunk_x(frame.chunk), y1 - 9, entity_colour(lane))
                    continue
                hollow = frame.frame in view.evicted
                _dot(draw, layout.chunk_x(frame.chunk), y1 - 9, entity_colour(lane), hollow=hollow)
    for switch in view.switches:
        back = set()
        for frame in switch.frames:
            lanes = (set(frame.entities) & set(switch.wanted)) or set(frame.entities) or {UNTAGGED}
            for lane in lanes & set(layout.lanes):
                _, y0, _, y1 = layout.lane_box(lane)
                x0, x1 = layout.chunk_x(frame.chunk), layout.chunk_x(switch.chunk)
                _arc(draw, x0, x1, y1 - 9, y0 + 4, _tint(entity_colour(lane), 0.75))
                back.add(lane)
        for lane in set(switch.wanted) | back:
            if lane in layout.lanes:
                _, _, _, y1 = layout.lane_box(lane)
                _diamond(draw, layout.chunk_x(switch.chunk), y1 - 9, entity_colour(lane), hollow=lane not in back)
    if not view.archived and not view.switches:
        _centre_note(draw, layout, "no frame archived yet")


def _paint_memflow(draw: ImageDraw.ImageDraw, view: _Map, layout: StoryMapLayout) -> None:
    """Per recorded frame, in its row: a dot at the chunk that recorded it, a bar over the chunks it was in memory."""
    recorded_at = {frame: chunk for chunk, frame in view.recorded}
    half = max(1.0, (layout.chunk_left(1) - layout.chunk_left(0)) / 2)
    for row, frames in enumerate(_memflow_rows(view)):
        _, y0, _, y1 = layout.lane_box(row)
        y = (y0 + y1) / 2
        for frame in frames:
            for chunk, in_memory in enumerate(view.memory_frames):
                if frame in in_memory:
                    x = layout.chunk_x(chunk)
                    draw.rectangle((x - half, y - 3, x + half, y + 3), fill=_tint(MEMFLOW_COLOUR, 0.55))
            if frame in recorded_at:
                _dot(draw, layout.chunk_x(recorded_at[frame]), y, MEMFLOW_COLOUR)
    if not view.recorded and not any(view.memory_frames):
        _centre_note(draw, layout, "no frame recorded yet")


def _paint_no_memory(draw: ImageDraw.ImageDraw, view: _Map, layout: StoryMapLayout) -> None:
    text = "no memory: each chunk sees only the frames just before it"
    if view.mode != "none":
        text = f"memory {view.mode!s}: this picture does not draw it yet"
    _centre_note(draw, layout, text)


def _centre_note(draw: ImageDraw.ImageDraw, layout: StoryMapLayout, text: str) -> None:
    face = _font(TEXT_PX)
    text = _fit(text, face, layout.plot_right - layout.plot_left - 8)
    x = (layout.plot_left + layout.plot_right - face.getlength(text)) / 2
    draw.text((x, layout.lanes_top + (layout.lane_height - TEXT_PX) / 2 - 1), text, fill=MUTED, font=face)


def _identity_legend(view: _Map) -> list[_LegendItem]:
    colour = entity_colour(view.entities[0].id) if view.entities else UNTAGGED_COLOUR
    items = [_LegendItem(lambda d, x, y: _dot(d, x, y, colour), "frame archived (at the chunk it came from)")]
    if any(f.picture is not None for f in view.archived):
        items.append(_LegendItem(lambda d, x, y: _picture(d, x, y, colour), "reference picture"))
    if view.evicted:
        items.append(_LegendItem(lambda d, x, y: _dot(d, x, y, colour, hollow=True), "archived, later dropped"))
    if any(s.frames for s in view.switches):
        items.append(_LegendItem(lambda d, x, y: _diamond(d, x, y, colour), "brought back at a prompt switch"))
        arc = _tint(colour, 0.75)
        items.append(
            _LegendItem(lambda d, x, y: _arc(d, x - 8, x + 8, y + 5, y - 5, arc), "from where it was archived")
        )
    if any(set(s.wanted) - {e for f in s.frames for e in f.entities} for s in view.switches):
        items.append(
            _LegendItem(lambda d, x, y: _diamond(d, x, y, colour, hollow=True), "wanted, nothing to bring back")
        )
    if view.registry is not None and view.entities:
        tint = _tint(colour, 0.16)
        items.append(
            _LegendItem(lambda d, x, y: d.rectangle((x - 7, y - 6, x + 7, y + 6), fill=tint), "entity in the prompt")
        )
    else:
        items.append(_LegendItem(lambda d, x, y: None, "no entity registry: frames chosen by prompt relevance"))
    return items


def _memflow_legend(view: _Map) -> list[_LegendItem]:
    bar = _tint(MEMFLOW_COLOUR, 0.55)
    return [
        _LegendItem(lambda d, x, y: _dot(d, x, y, MEMFLOW_COLOUR), "frame recorded"),
        _LegendItem(lambda d, x, y: d.rectangle((x - 8, y - 3, x + 8, y + 3), fill=bar), "chunks it was in memory"),
    ]


def _no_memory_legend(view: _Map) -> list[_LegendItem]:
    return []


_PAINTERS = {"identity": _paint_identity, "memflow": _paint_memflow, "none": _paint_no_memory}
_LEGENDS = {"identity": _identity_legend, "memflow": _memflow_legend, "none": _no_memory_legend}


def _draw_prompt_list(draw: ImageDraw.ImageDraw, view: _Map, box: tuple[int, int, int], columns: int) -> None:
    """Every prompt on one line: a swatch, its number and seconds, its words (cut to the column)."""
    x0, y0, x1 = box
    face = _font(TEXT_PX)
    rows = -(-len(view.prompts) // columns)
    column_px = (x1 - x0) / columns
    for segment, prompt in enumerate(view.prompts):
        x = x0 + (segment // rows) * column_px
        y = y0 + (segment % rows) * LINE_PX
        chunks = view.segment_chunks[segment]
        draw.rectangle((x, y + 2, x + 12, y + 14), fill=_prompt_colour(segment), outline=RULE)
        head = (
            f"{segment + 1}  {_seconds(chunks * view.seconds_per_chunk)}" if chunks else f"{segment + 1}  not rendered"
        )
        draw.text((x + 18, y), head, fill=INK if chunks else MUTED, font=face)
        text_x = x + 18 + max(face.getlength(head), face.getlength("12  58.5 s")) + 10
        words = _fit(prompt, face, x + column_px - text_x - 12)
        draw.text((text_x, y), words, fill=INK if chunks else MUTED, font=face)


# ---------------------------------------------------------------------------------------------------------------
# the story map in words


def story_map_summary(story_map: dict) -> list[str]:
    """Plain lines about a story map: what each prompt switch brought back and from where, the verifier's
    corrections, the memory's size. Names come from the registry; no dict or list is ever printed.
    Raises StoryMapError when the dict lacks "prompts" or "chunks"."""
    view = _read_map(story_map)
    return _overview(view) + _SUMMARIES.get(view.mode, _no_memory_summary)(view)


def _overview(view: _Map) -> list[str]:
    lines = [f"{_plural(len(view.prompts), 'prompt')}, {_plural(view.num_chunks, 'chunk')} "
             f"({_seconds(_video_seconds(view))} of video), {_memory_name(view)}"]  # fmt: skip
    missing = [s for s, n in enumerate(view.segment_chunks) if n == 0]
    if missing:
        last = max(view.chunk_segments, default=-1)
        stop = f"in prompt {last + 1}" if last >= 0 else "before its first chunk"
        verb = "was" if len(missing) == 1 else "were"
        lines.append(f"the run stopped {stop}: {_prompts_phrase(missing, ' and ')} {verb} not rendered")
    return lines


def _name(view: _Map, entity_id: int) -> str:
    try:
        return _who(view.registry.entity(entity_id))
    except (KeyError, AttributeError):
        return f"entity #{entity_id}"


def _identity_summary(view: _Map) -> list[str]:
    lines = []
    if view.registry is None:
        lines.append("no entity registry: at each prompt switch the frames closest to the new prompt come back")
    elif view.num_chunks and view.registry.prompts:
        first = (
            view.registry.ids_in(view.chunk_segments[0]) if view.chunk_segments[0] < len(view.registry.prompts) else ()
        )
        if first:
            lines.append(f"prompt 1: introduces {' and '.join(_name(view, i) for i in first)}")
    for switch in view.switches:
        lines += _switch_lines(view, switch)
    for entity_id, attributes in view.corrections:
        lines.append(f"the verifier corrected {_name(view, entity_id)}: {', '.join(attributes) or 'no attributes'}")
    if view.verdicts_used:
        lines.append(f"{_plural(view.verdicts_used, 'chunk')} chose a frame with scores from the verifier")
    if view.late_verdicts:
        lines.append(f"{_plural(view.late_verdicts, 'chunk')} chose a frame on text alone: the verifier was late")
    if view.verifier_skipped:
        lines.append(f"{_plural(view.verifier_skipped, 'chunk')} chose a frame on text alone without asking the "
                     "verifier: its answer could not have come in time")  # fmt: skip
    return lines + [_archive_line(view)]


def _switch_lines(view: _Map, switch: _Switch) -> list[str]:
    where = f"prompt {switch.segment + 1}"
    if view.registry is None:
        if not switch.frames:
            return [f"{where}: nothing archived yet, so nothing to bring back"]
        sources = _prompts_phrase([f.segment for f in switch.frames], " and ")
        return [f"{where}: {_plural(len(switch.frames), 'frame')} brought back from {sources}, by prompt relevance"]
    if not switch.wanted:
        return [f"{where}: names no entity of the registry, so no frame is brought back"]
    lines = []
    for entity_id in switch.wanted:
        who = _name(view, entity_id)
        frames = [f for f in switch.frames if entity_id in f.entities]
        earlier = [s for s in view.segments_of(entity_id) if s < switch.segment]
        if frames:
            verb = "stays" if switch.segment - 1 in earlier else "returns" if earlier else "first appears"
            generated = [f.segment for f in frames if f.picture is None]
            pictures = [f.picture for f in frames if f.picture is not None]
            sources = " and ".join(
                ([_prompts_phrase(generated, " and ")] if generated else []) + [f"the picture {p}" for p in pictures]
            )
            lines.append(f"{where}: {who} {verb}: {_plural(len(frames), 'frame')} brought back from {sources}")
        elif earlier:
            lines.append(
                f"{where}: {who} was in {_prompts_phrase(earlier, ' and ')}, but no frame of it is left to bring back"
            )
        else:
            lines.append(f"{where}: {who} is new: nothing to bring back yet")
    return lines


def _archive_line(view: _Map) -> str:
    line = f"memory: {_plural(len(view.archived), 'frame')} archived"
    if view.peak_mb is not None:
        line += f" ({_megabytes(view.peak_mb)} at most)"
    pictures = sum(f.picture is not None for f in view.archived)
    if pictures:
        line += f", {pictures} of them reference pictures, kept throughout"
    if view.evicted:
        line += f", {len(view.evicted)} of them later dropped to stay within the memory limit"
    return line


def _memflow_summary(view: _Map) -> list[str]:
    recorded_in = {frame: view.chunk_segments[chunk] for chunk, frame in view.recorded}
    lines = []
    for start in [sum(view.segment_chunks[:s]) for s in range(1, len(view.segment_chunks))]:
        if start < view.num_chunks:
            frames = view.memory_frames[start]
            sources = [recorded_in[f] for f in frames if f in recorded_in]
            origin = f", recorded in {_prompts_phrase(sources, ' and ')}" if sources else ""
            lines.append(f"prompt {view.chunk_segments[start] + 1}: starts with "
                         f"{_plural(len(frames), 'frame')} in memory{origin}")  # fmt: skip
    most = max((len(f) for f in view.memory_frames), default=0)
    return lines + [f"memory (MemFlow): {_plural(len(view.recorded), 'frame')} recorded, at most {most} at a time"]


def _no_memory_summary(view: _Map) -> list[str]:
    if view.mode != "none":
        return [f"memory {view.mode}: not described here yet"]
    return ["no memory: each chunk sees only the frames just before it"]


_SUMMARIES = {"identity": _identity_summary, "memflow": _memflow_summary, "none": _no_memory_summary}


# ---------------------------------------------------------------------------------------------------------------
# the plan picture


def plan_picture(plan: ChunkPlan, prompts: Sequence[str], width: int = 600) -> Image.Image:
    """An RGB picture `width` x 160 of a story plan: the totals (prompts, chunks, seconds, video frames), one band
    per prompt with its number, its seconds as rounded to whole chunks ("~" where rounding changed them), its
    chunk count and first words, and a time axis. Raises ValueError when `prompts` is not one per segment."""
    if len(prompts) != plan.num_segments:
        raise ValueError(
            f"got {len(prompts)} prompts for a plan of {plan.num_segments} segments; give one per segment"
        )
    if width < MIN_WIDTH // 2:
        raise ValueError(f"width {width} px is too narrow for a plan picture; use at least {MIN_WIDTH // 2}")
    image = Image.new("RGB", (width, 160), BACKGROUND)
    draw = ImageDraw.Draw(image)
    head = (f"{_plural(plan.num_segments, 'prompt')} · {_plural(plan.num_chunks, 'chunk')} · "
            f"{_seconds(plan.video_seconds)} · {plan.num_video_frames} frames")  # fmt: skip
    draw.text((MARGIN, 8), _fit(head, _font(TEXT_PX), width - 2 * MARGIN), fill=INK, font=_font(TEXT_PX))
    bands = [_plan_band(plan, prompts, s) for s in range(plan.num_segments)]
    _draw_bands(draw, bands, (MARGIN, 32, width - MARGIN, 108))
    _draw_axis(draw, MARGIN, width - MARGIN, 112, plan.num_chunks * plan.seconds_per_chunk)
    if plan.rounding_notes():
        note = f"~ rounded to whole chunks of {_seconds(plan.seconds_per_chunk)}"
        draw.text((MARGIN, 140), _fit(note, _font(SMALL_PX), width - 2 * MARGIN), fill=MUTED, font=_font(SMALL_PX))
    return image


def _plan_band(plan: ChunkPlan, prompts: Sequence[str], segment: int) -> _Band:
    chunks, number = plan.segment_chunks[segment], str(segment + 1)
    rounded = "" if segment not in _rounded_segments(plan) else "~"
    seconds = f"{rounded}{_seconds(plan.seconds_actual[segment])}"
    lines = ((f"{number} · {seconds}", number), (_plural(chunks, "chunk"), f"{chunks} ch"), (prompts[segment],))
    return _Band(segment, plan.segment_starts[segment], chunks, lines)


def _rounded_segments(plan: ChunkPlan) -> set[int]:
    return {i for i, (a, b) in enumerate(zip(plan.seconds_requested, plan.seconds_actual)) if abs(a - b) > 1e-9}


# ---------------------------------------------------------------------------------------------------------------
# the entity sheet


def _registry_note(registry: EntityRegistry | None) -> str | None:
    """The one line that stands for a registry without entities; None when it has some."""
    if registry is None:
        return "no entity registry: memory frames are chosen by how well they match each prompt"
    if not registry.entities:
        return "the registry lists no entities: memory frames are chosen by how well they match each prompt"
    return None


def _where(registry: EntityRegistry, entity: Entity) -> str:
    segments = [i for i, mentions in enumerate(registry.prompts) if any(m.entity == entity.id for m in mentions)]
    return f"in {_prompts_phrase(segments)}"


def entity_sheet_text(registry: EntityRegistry | None) -> str:
    """Short plain lines, one per entity: "#1 woman (person): red coat; in prompts 1, 3" (aliases after
    "also called"); one line saying so for no registry or no entities."""
    note = _registry_note(registry)
    if note is not None:
        return note
    lines = []
    for e in registry.entities:
        attributes = ", ".join(e.attributes) or "no attributes"
        aliases = f"; also called {', '.join(e.aliases)}" if e.aliases else ""
        lines.append(f"#{e.id} {e.name} ({e.kind}): {attributes}{aliases}; {_where(registry, e)}")
    return "\n".join(lines)


_SHEET_COLUMNS = (("ID", 0.0), ("name", 0.09), ("kind", 0.35), ("attributes", 0.46), ("prompts", 0.80))


def entity_sheet(registry: EntityRegistry | None, width: int = 700) -> Image.Image:
    """An RGB table `width` px wide of a registry's entities: ID (with the entity's colour), name (and aliases),
    kind, attributes (wrapped, up to three lines), the prompts it appears in. For no registry or no entities, one
    line saying what the memory does instead."""
    if width < MIN_WIDTH:
        raise ValueError(f"width {width} px is too narrow for an entity sheet; use at least {MIN_WIDTH}")
    face, inner = _font(TEXT_PX), width - 2 * MARGIN
    note = _registry_note(registry)
    rows = [] if note is not None else [_sheet_row(registry, e, face, inner) for e in registry.entities]
    height = MARGIN + LINE_PX + 8 + LINE_PX + sum(len(r[1]) * (LINE_PX - 1) + 8 for r in rows) + MARGIN
    image = Image.new("RGB", (width, height if rows else MARGIN * 2 + LINE_PX * 2 + 8), BACKGROUND)
    draw = ImageDraw.Draw(image)
    source = {"llm": "found by the LLM", "user": "written by hand"}.get(registry.source if registry else "", "")
    draw.text(
        (MARGIN, MARGIN),
        _fit(f"Entities ({source})" if source else "Entities", _font(TITLE_PX), inner),
        fill=INK,
        font=_font(TITLE_PX),
    )
    y = MARGIN + LINE_PX + 8
    if note is not None:
        draw.text((MARGIN, y), _fit(note, face, inner), fill=MUTED, font=face)
        return image
    for title, at in _SHEET_COLUMNS:
        draw.text((MARGIN + at * inner, y), title, fill=MUTED, font=face)
    y += LINE_PX
    for entity, cells in rows:
        draw.line((MARGIN, y, width - MARGIN, y), fill=RULE)
        draw.rectangle((MARGIN, y + 6, MARGIN + 8, y + 16), fill=entity_colour(entity.id))
        for n, line in enumerate(cells):
            for (_, at), text in zip(_SHEET_COLUMNS, line):
                draw.text(
                    (MARGIN + at * inner + (12 if at == 0 else 0), y + 4 + n * (LINE_PX - 1)),
                    text,
                    fill=INK,
                    font=face,
                )
        y += len(cells) * (LINE_PX - 1) + 8
    return image


def _sheet_row(registry: EntityRegistry, entity: Entity, face: Font, inner: float) -> tuple[Entity, list[list[str]]]:
    """An entity's cells as lines of text, each fitted to its column: (entity, [[id, name, kind, attrs, prompts]])."""
    widths = [(b - a) * inner - 10 for (_, a), (_, b) in zip(_SHEET_COLUMNS, _SHEET_COLUMNS[1:] + (("", 1.0),))]
    names = [entity.name] + [f"also {a}" for a in entity.aliases[:1]]
    columns = [
        [f"#{entity.id}"],
        [_fit(n, face, widths[1]) for n in names],
        [entity.kind],
        _wrap(", ".join(entity.attributes) or "none", face, widths[3], 3),
        [_fit(_where(registry, entity).removeprefix("in "), face, widths[4])],
    ]
    depth = max(len(c) for c in columns)
    return entity, [[c[n] if n < len(c) else "" for c in columns] for n in range(depth)]
