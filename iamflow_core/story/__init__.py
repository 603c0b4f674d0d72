"""Stories: the script format (segments of prompt and seconds) and its plan in chunks."""

from .script import (
    DEFAULT_SECONDS,
    DEFAULT_SEED,
    MAX_SEGMENT_SECONDS,
    ChunkPlan,
    Segment,
    Story,
    StoryError,
    load_stories,
    load_story,
    parse_story_text,
    plan_chunks,
    read_story_lines,
)

__all__ = [
    "DEFAULT_SECONDS",
    "DEFAULT_SEED",
    "MAX_SEGMENT_SECONDS",
    "ChunkPlan",
    "Segment",
    "Story",
    "StoryError",
    "load_stories",
    "load_story",
    "parse_story_text",
    "plan_chunks",
    "read_story_lines",
]
