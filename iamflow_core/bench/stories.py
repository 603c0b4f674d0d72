"""The benchmarks' built-in story: six 10-s prompts of a woman, a man and a red notebook, with its entities."""

from __future__ import annotations

from ..story import Segment, Story
from ..story.entities import EntityRegistry

DEFAULT_PROMPTS = (
    "A woman with short black curls in a beige sweater reads a red notebook at a library table, soft window light.",
    "A tall man in a navy coat walks between the shelves and stops beside her table, holding two coffee cups.",
    "The woman looks up and smiles; the man sets a cup down and points at a page of the red notebook.",
    "Close-up of the red notebook: hand-drawn maps and notes, the woman's finger tracing a route.",
    "The man leaves through the glass doors; the woman keeps reading alone as rain starts outside.",
    "Evening: the woman in the beige sweater closes the red notebook and packs it into her bag, lamps glowing.",
)

DEFAULT_STORY = Story(tuple(Segment(p, 10.0) for p in DEFAULT_PROMPTS), title="bench 6 x 10 s", seed=0)

# Entities of DEFAULT_PROMPTS: 1 the woman, 2 the man, 3 the red notebook.
DEFAULT_REGISTRY = EntityRegistry.from_json(
    {
        "entities": [
            {"id": 1, "name": "woman", "attributes": ["short black curls", "beige sweater"]},
            {"id": 2, "name": "man", "attributes": ["tall", "navy coat"]},
            {"id": 3, "name": "red notebook", "kind": "object", "attributes": ["red"]},
        ],
        "prompts": [[1, 3], [2, 1], [1, 2, 3], [3, 1], [2, 1], [1, 3]],
    },
    num_segments=6,
    source="user",
)
