"""Story scripts: segments of (prompt, seconds), the file formats that hold them, and their plan in chunks.

Three ways in, one `Story` out:

- a JSON story file, one story per file::

      {"title": "Library", "seed": 1, "segments": [{"prompt": "Noah enters ...", "seconds": 10}, ...]}

- a NarraStream-Bench JSONL file, one story per line: ``{"prompts": [...]}`` with an optional ``"seconds"``
  (one number for every prompt, or one per prompt; 10 s per prompt by default), ``"title"``, ``"seed"`` and
  ``"id"`` (the story's name in a batch, see `read_story_lines`);
- the text ComfyUI users type: one segment per line, ``10s | prompt``, ``[5s] prompt``, ``prompt | 10s`` or
  ``prompt [10s]`` (lines without a duration get the default), ``#`` comments; or one pasted JSON object.

Every JSON object that holds a story may use either shape (``"segments"`` or ``"prompts"``). Errors are
`StoryError` and name the source, the 1-based line and the field. A segment lasts more than 0 and at most
`MAX_SEGMENT_SECONDS` (24 h); in the text form, something in a duration's place that is not a valid duration
(``-5s | ...``, ``abc s | ...``, ``5 min | ...``) is an error, never part of the prompt.

The generator makes video in chunks of `chunk_frames` latent frames, so `plan_chunks` rounds every segment to a
whole number of chunks (nearest, ties up, at least one) and `ChunkPlan.rounding_notes` says what changed.
"""

from __future__ import annotations

import bisect
import difflib
import json
import json.decoder
import json.scanner
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

from ..config import VIDEO_FPS, WAN21_TEMPORAL_FACTOR, CacheConfig

DEFAULT_SECONDS = 10.0  # NarraStream-Bench gives each prompt 10 s.
MAX_SEGMENT_SECONDS = 86400.0  # 24 h: beyond any real segment; keeps chunk and frame counts ordinary integers
DEFAULT_SEED = 0  # the noise seed of a story that gives none
_SEGMENT_KEYS = ("prompt", "seconds")
# "id" names a story in a batch (its files are ID.mp4, ...); one story alone does not need it.
_SEGMENTS_STORY_KEYS = ("segments", "title", "seed", "id")
_PROMPTS_STORY_KEYS = ("prompts", "seconds", "title", "seed", "id")
# Names people reach for first; the strict formats reject them, so say which key is meant.
_KEY_HINTS = {"duration": "seconds", "length": "seconds", "secs": "seconds", "text": "prompt", "caption": "prompt"}


class StoryError(ValueError):
    """A story that cannot be read. `source`, `line` (1-based), `column` and `field` say where, when known."""

    def __init__(
        self,
        problem: str,
        *,
        source: str | None = None,
        line: int | None = None,
        column: int | None = None,
        field: str | None = None,
    ) -> None:
        self.problem, self.source, self.line, self.column, self.field = problem, source, line, column, field
        where = " ".join(
            part
            for part in (
                source,
                f"line {line}" if line is not None else None,
                f"column {column}" if column is not None else None,
            )
            if part
        )
        message = f"{field} {problem}" if field else problem
        super().__init__(f"{where}: {message}" if where else message)


# ---------------------------------------------------------------------------------------------------------------
# The story


@dataclass(frozen=True)
class Segment:
    """One prompt held for `seconds` of video: more than 0 and at most `MAX_SEGMENT_SECONDS` (rounded to whole
    chunks by `plan_chunks`)."""

    prompt: str
    seconds: float

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise TypeError(f"Segment prompt must be a string, got {type(self.prompt).__name__}")
        if not self.prompt.strip():
            raise ValueError(f"Segment prompt is empty ({self.prompt!r}); write what happens in this segment")
        if isinstance(self.seconds, bool) or not isinstance(self.seconds, (int, float)):
            raise TypeError(f"Segment seconds must be a number, got {type(self.seconds).__name__}")
        _check_seconds("Segment seconds", self.seconds)
        object.__setattr__(self, "seconds", float(self.seconds))


@dataclass(frozen=True)
class Story:
    """An ordered list of segments, with an optional title and seed (the seed of the whole video)."""

    segments: tuple[Segment, ...]
    title: str | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.segments, list):
            object.__setattr__(self, "segments", tuple(self.segments))
        if not isinstance(self.segments, tuple):
            raise TypeError(f"Story segments must be a tuple of Segment, got {type(self.segments).__name__}")
        if not self.segments:
            raise ValueError("Story segments is empty; give at least one Segment(prompt, seconds)")
        for i, segment in enumerate(self.segments):
            if not isinstance(segment, Segment):
                raise TypeError(f"Story segments[{i}] must be a Segment, got {type(segment).__name__}")
        if self.title is not None and not isinstance(self.title, str):
            raise TypeError(f"Story title must be a string or None, got {type(self.title).__name__}")
        if self.seed is not None:
            if isinstance(self.seed, bool) or not isinstance(self.seed, int):
                raise TypeError(f"Story seed must be an integer or None, got {type(self.seed).__name__}")
            if not 0 <= self.seed < 2**64:
                raise ValueError(f"Story seed must be in [0, 2**64), got {self.seed}; use a non-negative integer")

    @classmethod
    def from_prompts(
        cls,
        prompts: Sequence[str],
        seconds: float | Sequence[float] = DEFAULT_SECONDS,
        title: str | None = None,
        seed: int | None = None,
    ) -> Story:
        """One segment per prompt; `seconds` is one duration for all or one per prompt."""
        if isinstance(seconds, (int, float)):
            seconds = [seconds] * len(prompts)
        if len(seconds) != len(prompts):
            raise ValueError(f"got {len(seconds)} durations for {len(prompts)} prompts; give one per prompt")
        return cls(tuple(Segment(p, s) for p, s in zip(prompts, seconds)), title=title, seed=seed)

    @property
    def prompts(self) -> tuple[str, ...]:
        return tuple(s.prompt for s in self.segments)

    @property
    def noise_seed(self) -> int:
        """The seed the video is made with: the story's, else `DEFAULT_SEED`."""
        return self.seed if self.seed is not None else DEFAULT_SEED

    @property
    def seconds_total(self) -> float:
        """Requested length; the generated length is `plan_chunks(story).seconds_actual`."""
        return sum(s.seconds for s in self.segments)


def _check_seconds(name: str, seconds: float, expected: str = "a positive finite number") -> None:
    """Raise ValueError unless 0 < seconds <= MAX_SEGMENT_SECONDS (ints are compared as they are: a huge JSON
    integer does not fit a float)."""
    if (isinstance(seconds, float) and not math.isfinite(seconds)) or seconds <= 0:
        raise ValueError(
            f"{name} must be {expected}, got {_number_text(seconds)}; give a duration in seconds "
            f"above 0 and at most {MAX_SEGMENT_SECONDS:g} (24 h), e.g. {DEFAULT_SECONDS:g}"
        )
    if seconds > MAX_SEGMENT_SECONDS:
        raise ValueError(
            f"{name} is {_number_text(seconds)}, more than the maximum of {MAX_SEGMENT_SECONDS:g} s (24 h) per "
            f"segment; give at most {MAX_SEGMENT_SECONDS:g} (a longer scene can be several segments)"
        )


def _number_text(value: float) -> str:
    text = repr(value)
    return text if len(text) <= 24 else f"{text[:12]}... (an integer of {len(text)} digits)"


# ---------------------------------------------------------------------------------------------------------------
# The plan in chunks


@dataclass(frozen=True)
class ChunkPlan:
    """How many chunks each segment gets, and the frame counts that follow.

    Chunk i covers latent frames [i*chunk_frames, (i+1)*chunk_frames). The VAE decodes the first latent frame to
    one video frame and every later one to `temporal_factor`, so chunk 0 gives 1 + tf*(chunk_frames-1) video frames
    (9) and every later chunk tf*chunk_frames (12). Segment durations are counted in nominal chunks of
    `seconds_per_chunk` (0.75 s); the whole video is `video_seconds` long, (tf-1)/fps shorter than the sum.
    """

    segment_chunks: tuple[int, ...]
    seconds_requested: tuple[float, ...]
    chunk_frames: int = CacheConfig.chunk_frames
    fps: float = VIDEO_FPS
    temporal_factor: int = WAN21_TEMPORAL_FACTOR

    def __post_init__(self) -> None:
        if not self.segment_chunks or any(n < 1 for n in self.segment_chunks):
            raise ValueError(f"every segment needs at least one chunk, got segment_chunks={self.segment_chunks}")
        if len(self.seconds_requested) != len(self.segment_chunks):
            raise ValueError(
                f"seconds_requested has {len(self.seconds_requested)} entries for "
                f"{len(self.segment_chunks)} segments; give one per segment"
            )
        for name in ("chunk_frames", "fps", "temporal_factor"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ChunkPlan {name} must be positive, got {getattr(self, name)}")

    @property
    def num_segments(self) -> int:
        return len(self.segment_chunks)

    @property
    def num_chunks(self) -> int:
        return sum(self.segment_chunks)

    @property
    def num_latent_frames(self) -> int:
        return self.num_chunks * self.chunk_frames

    @property
    def num_video_frames(self) -> int:
        return 1 + self.temporal_factor * (self.num_latent_frames - 1)

    @property
    def seconds_per_chunk(self) -> float:
        return self.chunk_frames * self.temporal_factor / self.fps

    @property
    def seconds_actual(self) -> tuple[float, ...]:
        """Per segment: its chunks times `seconds_per_chunk`."""
        return tuple(n * self.seconds_per_chunk for n in self.segment_chunks)

    @property
    def video_seconds(self) -> float:
        return self.num_video_frames / self.fps

    @property
    def segment_starts(self) -> tuple[int, ...]:
        """First chunk of each segment (the first is 0)."""
        starts, total = [], 0
        for n in self.segment_chunks:
            starts.append(total)
            total += n
        return tuple(starts)

    @property
    def switch_chunks(self) -> tuple[int, ...]:
        """Chunks at which a new prompt takes over (chunk 0 is not a switch)."""
        return self.segment_starts[1:]

    def segment_of_chunk(self, chunk: int) -> int:
        self._check_chunk(chunk)
        return bisect.bisect_right(self.segment_starts, chunk) - 1

    def video_frames_of_chunk(self, chunk: int) -> int:
        """9 for chunk 0, 12 for every later chunk (with the default 3 latent frames and 4x time)."""
        self._check_chunk(chunk)
        latent = self.chunk_frames - 1 if chunk == 0 else self.chunk_frames
        return latent * self.temporal_factor + (1 if chunk == 0 else 0)

    def rounding_notes(self) -> list[str]:
        """One line per segment whose length differs from the request; empty when nothing was rounded."""
        notes = []
        for i, (n, asked, got) in enumerate(zip(self.segment_chunks, self.seconds_requested, self.seconds_actual)):
            if not math.isclose(asked, got, rel_tol=0, abs_tol=1e-9):
                notes.append(
                    f"segment {i + 1}: {asked:g} s requested, {n} chunk{'s' if n > 1 else ''} of "
                    f"{self.seconds_per_chunk:g} s = {got:g} s ({got - asked:+g} s)"
                )
        return notes

    def summary(self) -> str:
        return (
            f"{self.num_segments} segments -> {self.num_chunks} chunks, {self.num_latent_frames} latent frames, "
            f"{self.num_video_frames} video frames ({self.video_seconds:.2f} s at {self.fps:g} fps)"
        )

    def _check_chunk(self, chunk: int) -> None:
        if not 0 <= chunk < self.num_chunks:
            raise IndexError(f"chunk {chunk} is outside this plan's chunks 0..{self.num_chunks - 1}")


def plan_chunks(
    story: Story,
    chunk_frames: int = CacheConfig.chunk_frames,
    fps: float = VIDEO_FPS,
    temporal_factor: int = WAN21_TEMPORAL_FACTOR,
) -> ChunkPlan:
    """Round each segment to the nearest whole number of chunks (ties up, at least one). Pure; report the
    rounding to the user with `ChunkPlan.rounding_notes()`."""
    seconds_per_chunk = chunk_frames * temporal_factor / fps
    # The epsilon keeps exact ties (1.125 s = 1.5 chunks) from landing just below .5 through float error.
    counts = tuple(max(1, math.floor(s.seconds / seconds_per_chunk + 0.5 + 1e-9)) for s in story.segments)
    return ChunkPlan(
        segment_chunks=counts,
        seconds_requested=tuple(s.seconds for s in story.segments),
        chunk_frames=chunk_frames,
        fps=fps,
        temporal_factor=temporal_factor,
    )


# ---------------------------------------------------------------------------------------------------------------
# Reading files and text


def load_story(path: str | PathLike[str]) -> Story:
    """Read one story from a JSON file (either the ``"segments"`` or the ``"prompts"`` shape)."""
    path = Path(path)
    text = _read_text(path)
    return _story_from_object(_decode_json(text, str(path)), str(path), DEFAULT_SECONDS, line=None)


def load_stories(path: str | PathLike[str], default_seconds: float = DEFAULT_SECONDS) -> list[Story]:
    """Read every story of a file: ``.jsonl`` (one story per line, blank lines skipped), ``.json`` (one story) or
    ``.txt`` (the text form of `parse_story_text`)."""
    _check_default_seconds(default_seconds)
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        return [load_story(path)]
    if suffix == ".txt":
        return [parse_story_text(_read_text(path), default_seconds, source=str(path))]
    if suffix != ".jsonl":
        raise StoryError(
            f"has suffix {path.suffix!r}; use .json (one story), .jsonl (one per line) or .txt", source=str(path)
        )
    stories = []
    for _, _, story in read_story_lines(path, default_seconds):
        if isinstance(story, StoryError):
            raise story
        stories.append(story)
    return stories


def read_story_lines(
    path: str | PathLike[str], default_seconds: float = DEFAULT_SECONDS
) -> list[tuple[int, str | None, Story | StoryError]]:
    """Every non-blank line of a ``.jsonl`` story file, each read on its own: its 1-based line number, its ``"id"``
    (None when it gives none or cannot be read) and its story, or the `StoryError` that says why it is not one. A
    batch records a bad line and renders the others; `load_stories` stops at the first."""
    _check_default_seconds(default_seconds)
    path = Path(path)
    lines = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if line.strip():
            try:
                obj = _decode_json(line, str(path), line_offset=number - 1)
                story = _story_from_object(
                    obj, str(path), default_seconds, line=number, title=f"{path.stem} line {number}"
                )
                lines.append((number, _optional(obj, "id", str, str(path), number), story))
            except StoryError as e:
                lines.append((number, None, e))
    if not lines:
        raise StoryError(
            'holds no stories; write one JSON object per line, e.g. {"prompts": ["..."]}', source=str(path)
        )
    return lines


def parse_story_text(text: str, default_seconds: float = DEFAULT_SECONDS, source: str = "story text") -> Story:
    """Parse the text a user types: one segment per line with an optional duration (``10s | prompt``,
    ``[5s] prompt``, ``prompt | 10s``, ``prompt [10s]``), ``#`` comment lines and blank lines skipped; or one
    JSON object holding a story (a pasted story file or NarraStream JSONL line)."""
    _check_default_seconds(default_seconds)
    if text.lstrip().startswith("{"):
        return _story_from_object(_decode_json(text, source), source, default_seconds, line=None)
    segments = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            prompt, seconds = _split_duration(stripped, source, number)
            segments.append(
                _make(Segment, source, number, None, prompt, default_seconds if seconds is None else seconds)
            )
    if not segments:
        raise StoryError(
            "has no segments; write one prompt per line, e.g. `10s | a woman walks into a library`", source=source
        )
    return Story(tuple(segments))


def _check_default_seconds(default_seconds: float) -> None:
    if isinstance(default_seconds, bool) or not isinstance(default_seconds, (int, float)):
        raise TypeError(f"default_seconds must be a number, got {type(default_seconds).__name__}")
    _check_seconds("default_seconds", default_seconds, expected="a positive number of seconds")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: tolerate the byte-order mark some editors write
    except UnicodeDecodeError as e:
        raise StoryError(
            f"is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8", source=str(path)
        ) from e
    except FileNotFoundError as e:
        raise StoryError("does not exist; check the path of the story file", source=str(path)) from e
    except IsADirectoryError as e:
        raise StoryError("is a folder; give a .json, .jsonl or .txt story file", source=str(path)) from e


# --- the text form ----------------------------------------------------------------------------------------------

_NUM = r"(\d+(?:\.\d*)?|\.\d+)"
_UNIT = r"(?:s|sec|secs|seconds?)"
_DURATION_FORMS = (  # (pattern, group of the number, group of the prompt)
    (re.compile(rf"^\[\s*{_NUM}\s*{_UNIT}\s*\]\s*(.*)$", re.IGNORECASE), 1, 2),
    (re.compile(rf"^{_NUM}\s*{_UNIT}\s*\|\s*(.*)$", re.IGNORECASE), 1, 2),
    (re.compile(rf"^(.*?)\s*\[\s*{_NUM}\s*{_UNIT}\s*\]$", re.IGNORECASE), 2, 1),
    (re.compile(rf"^(.*?)\s*\|\s*{_NUM}\s*{_UNIT}$", re.IGNORECASE), 2, 1),
)
# Where a duration goes, as the text that stands there: "[x] ...", "x | ...", "... [x]", "... | x". What stands there
# may still be prompt text ("a clock showing 10 | 12 people"); `_duration_like` says when it is not.
_DURATION_PLACES = (
    re.compile(r"^\[([^\[\]]*)\]"),
    re.compile(r"^([^|\[\]]*)\|"),
    re.compile(r"\[([^\[\]]*)\]$"),
    re.compile(r"\|([^|\[\]]*)$"),
)
_BARE_NUMBER = re.compile(rf"{_NUM}")  # "[1] a woman ..." may be a scene number, so refuse to guess
# A number with a unit-like word: "-5s", "[−3s]" (a Unicode minus), "5,5s", "1e308s", "5 ss", "10 min".
_NUMBER_AND_WORD = re.compile(r"[-+\u2212\u2013]?\s*[\d.,]*\d[\d.,]*(?:e[-+]?\d+)?\s*([a-z]+)\.?", re.IGNORECASE)
# One or two words, then a seconds unit: "abc s", "ten seconds", "a few secs".
_WORDS_AND_UNIT = re.compile(rf"(?:\S+\s+){{1,2}}{_UNIT}\.?", re.IGNORECASE)
_SIGNED_NUMBER = re.compile(r"[-+\u2212\u2013]\s*[\d.,]*\d[\d.,]*")
# Time words that are not seconds, and "ss" (a doubled s): a duration meant, but not one we read.
_OTHER_TIME_UNITS = frozenset(("ss", "ms", "min", "mins", "minute", "minutes", "h", "hr", "hrs", "hour", "hours"))
_SECONDS_WORDS = ("sec", "secs", "second", "seconds")  # one typo away ("sek", "secnds") is still a duration


def _split_duration(line: str, source: str, number: int) -> tuple[str, float | None]:
    """The prompt and the seconds (None: none given) of one text line; a duration-like text that is not a valid
    duration, two durations, or a duration without a prompt is an error naming the line."""
    for pattern, num_group, prompt_group in _DURATION_FORMS:
        match = pattern.match(line)
        if match:
            prompt = match.group(prompt_group).strip()
            if any(p.match(prompt) for p, _, _ in _DURATION_FORMS):
                raise StoryError("has two durations; give one, e.g. `10s | a woman walks`", source=source, line=number)
            if not prompt:
                raise StoryError(
                    f"prompt is empty after the duration ({line!r}); write what happens in this segment, "
                    "e.g. `10s | a woman walks`",
                    source=source,
                    line=number,
                )
            _check_no_duration(prompt, source, number)
            return prompt, float(match.group(num_group))
    if _number_with_unit(line):  # a whole line of words may end in "seconds" ("gone in seconds"): only numbers
        raise StoryError(
            f"is a duration without a prompt ({line!r}); write e.g. `10s | a woman walks`", source=source, line=number
        )
    _check_no_duration(line, source, number)
    return line, None


def _check_no_duration(prompt: str, source: str, number: int) -> None:
    """Refuse a prompt that still has something duration-like where a duration goes."""
    for place in _DURATION_PLACES:
        match = place.search(prompt)
        text = match.group(1).strip() if match else ""
        if _BARE_NUMBER.fullmatch(text):
            raise StoryError(
                f"has a number without a unit where a duration goes ({prompt!r}); write seconds with an `s`, "
                "e.g. `10s | a woman walks` or `[5s] a woman walks`",
                source=source,
                line=number,
            )
        if _duration_like(text):
            raise StoryError(
                f"has {text!r} where a duration goes, which is not a valid duration; write a positive number of "
                f"seconds in digits with an `s` (at most {MAX_SEGMENT_SECONDS:g}), e.g. `10s | a woman walks` or "
                "`[5s] a woman walks`",
                source=source,
                line=number,
            )


def _duration_like(text: str) -> bool:
    """Whether `text` (what stands where a duration goes) was meant as a duration: a number of `_number_with_unit`,
    or one or two words followed by a seconds unit."""
    return _number_with_unit(text) or _WORDS_AND_UNIT.fullmatch(text) is not None


def _number_with_unit(text: str) -> bool:
    """A signed number, or a number with a time unit or a near-miss of one ("-5s", "5 ss", "10 min")."""
    with_word = _NUMBER_AND_WORD.fullmatch(text)
    if with_word:
        return _is_time_word(with_word.group(1).casefold())
    return _SIGNED_NUMBER.fullmatch(text) is not None


def _is_time_word(word: str) -> bool:
    return (
        re.fullmatch(_UNIT, word) is not None
        or word in _OTHER_TIME_UNITS
        or any(_one_edit_apart(word, unit) for unit in _SECONDS_WORDS)
    )


def _one_edit_apart(a: str, b: str) -> bool:
    """Whether `a` becomes `b` by changing, adding or removing one letter (a typo of a unit word)."""
    if abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        return sum(x != y for x, y in zip(a, b)) <= 1
    short, long = (a, b) if len(a) < len(b) else (b, a)
    return any(long[:i] + long[i + 1 :] == short for i in range(len(long)))


# --- JSON ----------------------------------------------------------------------------------------------------------


class _JsonObject(dict):
    """A decoded JSON object that remembers the 1-based line where it starts, so errors can point at it."""

    line: int = 1


class _JsonArray(list):
    """A decoded JSON array that remembers the 1-based line where it starts."""

    line: int = 1


class _LocatingDecoder(json.JSONDecoder):
    """A JSON decoder whose objects and arrays carry their line, and which rejects duplicate keys (json silently
    keeps the last).

    It uses the pure-Python scanner, because only that one calls back into `parse_object` and `parse_array`;
    stories are small.
    """

    def __init__(self, source: str, line_offset: int) -> None:
        super().__init__()
        self.source, self.line_offset = source, line_offset
        self.parse_object = self._parse_object
        self.parse_array = self._parse_array
        self.scan_once = json.scanner.py_make_scanner(self)

    def _parse_object(self, s_and_end, strict, scan_once, object_hook, object_pairs_hook, memo=None):
        text, start = s_and_end
        pairs, end = json.decoder.JSONObject(s_and_end, strict, scan_once, None, list, memo)
        obj = _JsonObject(pairs)
        obj.line = self._line(text, start)
        if len(obj) != len(pairs):
            seen = [k for k, _ in pairs]
            dup = next(k for k in seen if seen.count(k) > 1)
            raise StoryError(
                "appears twice in one object; keep one", source=self.source, line=obj.line, field=f'"{dup}"'
            )
        return obj, end

    def _parse_array(self, s_and_end, scan_once):
        items, end = json.decoder.JSONArray(s_and_end, scan_once)
        array = _JsonArray(items)
        array.line = self._line(*s_and_end)
        return array, end

    def _line(self, text: str, position: int) -> int:
        return self.line_offset + text.count("\n", 0, position) + 1


def _decode_json(text: str, source: str, line_offset: int = 0) -> Any:
    try:
        return _LocatingDecoder(source, line_offset).decode(text)
    except json.JSONDecodeError as e:
        hint = (
            "; give one story (one JSON object), or many in a .jsonl file, one per line"
            if e.msg == "Extra data"
            else ""
        )
        raise StoryError(
            f"invalid JSON: {e.msg}{hint}", source=source, line=line_offset + e.lineno, column=e.colno
        ) from e
    except StoryError:
        raise
    except ValueError as e:  # int() refuses integers of more than sys.get_int_max_str_digits() digits
        raise StoryError(
            f"holds a number of more than {sys.get_int_max_str_digits()} digits; write numbers such as seconds "
            "plainly, e.g. 10",
            source=source,
            line=line_offset + 1 if "\n" not in text.strip() else None,  # one line: a JSONL line or a one-liner
        ) from e


def _story_from_object(
    obj: Any, source: str, default_seconds: float, line: int | None, title: str | None = None
) -> Story:
    """Build a story from either JSON shape. `line` overrides the object's own line (JSONL: the file's line)."""
    line = line if line is not None else getattr(obj, "line", None)
    if not isinstance(obj, dict):
        raise StoryError(
            f'must be a JSON object like {{"segments": [...]}} or {{"prompts": [...]}}, got {_type_name(obj)}',
            source=source,
            line=line,
        )
    if "segments" in obj:
        _check_keys(obj, _SEGMENTS_STORY_KEYS, source, line, "story")
        segments = _segments_from_list(obj["segments"], source, line)
    elif "prompts" in obj:
        _check_keys(obj, _PROMPTS_STORY_KEYS, source, line, "story")
        segments = _segments_from_prompts(obj, source, line, default_seconds)
    else:
        raise StoryError(
            f'needs "segments" (a list of {{"prompt", "seconds"}}) or "prompts" (a list of strings); '
            f"got keys {sorted(obj)}",
            source=source,
            line=line,
        )
    title = _optional(obj, "title", str, source, line, default=title)
    seed = _optional(obj, "seed", int, source, line)
    return _make(Story, source, line, None, tuple(segments), title, seed)


def _segments_from_list(items: Any, source: str, line: int | None) -> list[Segment]:
    line = getattr(items, "line", line)
    if not isinstance(items, list) or not items:
        raise StoryError(
            f"must be a non-empty list of segment objects, got {_describe(items)}",
            source=source,
            line=line,
            field='"segments"',
        )
    segments = []
    for i, item in enumerate(items):
        where = getattr(item, "line", line)
        field = f"segments[{i}]"
        if not isinstance(item, dict):
            raise StoryError(
                f'must be an object {{"prompt": ..., "seconds": ...}}, got {_type_name(item)}',
                source=source,
                line=where,
                field=field,
            )
        _check_keys(item, _SEGMENT_KEYS, source, where, field)
        for key in _SEGMENT_KEYS:
            if key not in item:
                example = '"seconds": 10' if key == "seconds" else '"prompt": "..."'
                raise StoryError(f'is missing "{key}"; add e.g. {example}', source=source, line=where, field=field)
        prompt = _typed(item["prompt"], str, source, where, f'{field} "prompt"')
        seconds = _typed(item["seconds"], float, source, where, f'{field} "seconds"')
        segments.append(_make(Segment, source, where, field, prompt, seconds))
    return segments


def _segments_from_prompts(obj: dict, source: str, line: int | None, default_seconds: float) -> list[Segment]:
    prompts = obj["prompts"]
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise StoryError(
            f"must be a list of strings, got {_describe(prompts)}", source=source, line=line, field='"prompts"'
        )
    if not prompts:
        raise StoryError("is empty; give at least one prompt", source=source, line=line, field='"prompts"')
    seconds = obj.get("seconds", default_seconds)
    if isinstance(seconds, list):
        if len(seconds) != len(prompts):
            raise StoryError(
                f"has {len(seconds)} durations for {len(prompts)} prompts; give one number, or one per prompt",
                source=source,
                line=line,
                field='"seconds"',
            )
        seconds = [_typed(s, float, source, line, f'"seconds"[{i}]') for i, s in enumerate(seconds)]
    else:
        seconds = [_typed(seconds, float, source, line, '"seconds"')] * len(prompts)
    return [_make(Segment, source, line, f'"prompts"[{i}]', p, s) for i, (p, s) in enumerate(zip(prompts, seconds))]


def _check_keys(obj: dict, allowed: Sequence[str], source: str, line: int | None, what: str) -> None:
    unknown = [k for k in obj if k not in allowed]
    if unknown:
        hints = []
        for key in unknown:
            close = _KEY_HINTS.get(key.lower()) or next(iter(difflib.get_close_matches(key, allowed, n=1)), None)
            hints.append(f'"{key}"' + (f' (did you mean "{close}"?)' if close else ""))
        allowed_text = ", ".join(f'"{k}"' for k in allowed)
        raise StoryError(
            f"has unknown key(s) {', '.join(hints)}; allowed: {allowed_text}", source=source, line=line, field=what
        )


def _typed(value: Any, kind: type, source: str, line: int | None, field: str) -> Any:
    """Check a JSON value's type; JSON has one number type, so for float accept int (but never bool)."""
    ok = isinstance(value, (int, float)) if kind is float else isinstance(value, kind)
    if isinstance(value, bool) or not ok:
        expected = {str: "a string", float: "a number", int: "an integer"}[kind]
        raise StoryError(f"must be {expected}, got {_describe(value)}", source=source, line=line, field=field)
    return value


def _optional(obj: dict, key: str, kind: type, source: str, line: int | None, default: Any = None) -> Any:
    value = obj.get(key)
    return default if value is None else _typed(value, kind, source, line, f'"{key}"')


def _make(cls: type, source: str, line: int | None, field: str | None, *args: Any) -> Any:
    """Construct a Segment or Story, turning its validation error into a StoryError that says where."""
    try:
        return cls(*args)
    except (ValueError, TypeError) as e:
        # The field is named by `field` here, so drop the class name the dataclass put in front.
        raise StoryError(str(e).removeprefix(f"{cls.__name__} "), source=source, line=line, field=field) from e


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    # The located containers are subclasses; name the plain types.
    return next((t.__name__ for t in (dict, list) if isinstance(value, t)), type(value).__name__)


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{_type_name(value)} {text[:40] + '...' if len(text) > 40 else text}"
