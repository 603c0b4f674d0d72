"""Story nodes: the script an artist types, and the entity registry an LLM (or the artist) makes from it."""

from __future__ import annotations

import logging
from dataclasses import replace

from . import folders
from .common import CATEGORY, HIDDEN, widget, with_text
from .devices import check_device, device_input, resolve_device
from .values import STORY, StoryValue

logger = logging.getLogger(__name__)

EXAMPLE_STORY = """\
# One line per beat: seconds | prompt. Lines starting with # are comments. A story JSON or a NarraStream line works too.
10s | In a quiet library reading room, Nora, a young woman with short black curls and a beige sweater, opens a red notebook at a long wooden table, warm afternoon light.
10s | Ethan, a tall man with a grey beard and round glasses, walks between the tall shelves carrying a stack of old books.
10s | Ethan sets the books down across the table from Nora; she looks up and smiles, the red notebook open between them.
10s | Close-up of the red notebook: Nora's hand turns a page covered in pencil sketches of the library.
10s | Nora and Ethan lean over the notebook together, talking quietly, dust drifting in the light.
10s | Nora closes the red notebook and walks to the window, the library glowing in the evening sun.
"""  # noqa: E501


def describe_registry(value: StoryValue) -> str:
    """The registry as the artist reads it: entities, then which appear in each prompt, then the JSON to edit."""
    registry = value.registry
    if registry is None:
        return "no entity registry (identity memory falls back to prompt relevance)"
    lines = [f"{len(registry.entities)} entities ({registry.source}):"]
    lines += [f"  #{e.id} {e.name} ({e.kind}): {', '.join(e.attributes) or '-'}" for e in registry.entities]
    for i, mentions in enumerate(registry.prompts):
        names = ", ".join(f"#{m.entity} {registry.entity(m.entity).name}" for m in mentions) or "-"
        lines.append(f"  prompt {i + 1}: {names}")
    lines += [f"  note: {n}" for n in registry.notes]
    return "\n".join(lines) + "\n\nregistry JSON (paste into registry_json to edit):\n" + registry.to_json()


class IAMFlowStory:
    DESCRIPTION = "A story: one prompt per line with its duration (10s | prompt), a story JSON or a NarraStream line."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text": widget(
                    "STRING",
                    "One segment per line: `10s | prompt`, `[5s] prompt`, `prompt | 10s` or a bare prompt (default "
                    "duration); # starts a comment. Or paste a story JSON or a NarraStream JSONL line.",
                    default=EXAMPLE_STORY,
                    multiline=True,
                ),
                "default_seconds": widget(
                    "FLOAT",
                    "Duration of lines that give none. Segments are rounded to whole 0.75 s chunks (the node "
                    "says so).",
                    default=10.0,
                    min=0.75,
                    max=600.0,
                    step=0.25,
                ),
            },
            "hidden": HIDDEN,
        }

    RETURN_TYPES = (STORY,)
    RETURN_NAMES = ("story",)
    OUTPUT_TOOLTIPS = ("The story (segments of prompt and seconds).",)
    FUNCTION = "parse"
    CATEGORY = CATEGORY

    def parse(self, text, default_seconds, unique_id=None):
        from iamflow_core.story import parse_story_text, plan_chunks

        story = parse_story_text(text, default_seconds=default_seconds, source="Story node")
        plan = plan_chunks(story)
        return with_text((StoryValue(story),), [plan.summary(), *plan.rounding_notes()], unique_id)


class IAMFlowEntityExtractor:
    DESCRIPTION = (
        "Finds the characters and key objects of every prompt with an LLM and gives each a global ID; the registry "
        "is shown on the node and can be replaced by JSON."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "story": widget(STORY, "The story whose prompts are read."),
                "llm": widget(
                    [folders.NONE] + folders.hf_folders(),
                    "LLM folder in models/LLM (e.g. Qwen3-4B-Instruct-2507): loaded, run once over all prompts and "
                    "unloaded before sampling. None: no LLM (use registry_json, or no registry).",
                    default=folders.NONE,
                ),
                "device": device_input(0, "the LLM"),
            },
            "optional": {
                "registry_json": widget(
                    "STRING",
                    "Optional registry JSON (as this node shows it after a run) that replaces the LLM's answer: "
                    "edit names, attributes, or which prompt shows whom.",
                    default="",
                    multiline=True,
                ),
            },
            "hidden": HIDDEN,
        }

    RETURN_TYPES = (STORY,)
    RETURN_NAMES = ("story",)
    OUTPUT_TOOLTIPS = ("The same story with its entity registry.",)
    FUNCTION = "extract"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, llm, device):
        return folders.missing(folders.LLM, llm, folder=True) or check_device(device)

    def extract(self, story, llm, device, registry_json="", unique_id=None):
        from iamflow_core.story.entities import EntityRegistry

        num_segments, warning = len(story.story.segments), None
        if registry_json.strip():
            registry = EntityRegistry.from_json(registry_json, num_segments=num_segments, source="user")
        elif llm == folders.NONE:
            registry = None
        else:
            from iamflow_core.story.llm import EntityExtractor

            dev, warning = resolve_device(device)
            extractor = EntityExtractor(folders.folder_path(folders.LLM, llm), device=dev)
            try:
                registry = extractor.extract(list(story.story.prompts))
            finally:
                extractor.unload()
        value = replace(story, registry=registry)
        return with_text((value,), [warning, describe_registry(value)], unique_id)
