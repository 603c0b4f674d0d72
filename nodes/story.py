"""Story nodes: the script an artist types (drawn as a timeline), and the entity registry an LLM (or the artist)
makes from it (drawn as an entity sheet)."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import folder_paths
from comfy_api.latest import io, ui

from . import folders
from .common import CATEGORY, picture, show_status
from .devices import device_input, resolve_device
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


def registry_status(value: StoryValue) -> str:
    """One line naming the story's entities, e.g. `3 entities: #1 Nora, #2 Ethan, #3 red notebook`."""
    registry = value.registry
    if registry is None:
        return "no entities: identity memory follows prompt relevance"
    names = ", ".join(f"#{e.id} {e.name}" for e in registry.entities)
    return f"{len(registry.entities)} entities: {names}" if registry.entities else "no entities found"


class Story(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IAMFlowStory",
            display_name="Story",
            category=CATEGORY,
            description="A story: one prompt per line with its duration (10s | prompt), a story JSON or a "
            "NarraStream line. The node draws its plan: prompts, seconds and chunks.",
            inputs=[
                io.String.Input(
                    "text", default=EXAMPLE_STORY, multiline=True,
                    tooltip="One segment per line: `10s | prompt`, `[5s] prompt`, `prompt | 10s` or a bare prompt "
                    "(default duration); # starts a comment. Or paste a story JSON or a NarraStream JSONL line.",
                ),
                io.Float.Input(
                    "default_seconds", default=10.0, min=0.75, max=600.0, step=0.25,
                    tooltip="Duration of lines that give none. Segments are rounded to whole 0.75 s chunks (the node "
                    "says so).",
                ),
            ],
            outputs=[STORY.Output(display_name="story", tooltip="The story (segments of prompt and seconds).")],
            hidden=[io.Hidden.unique_id],
        )  # fmt: skip

    @classmethod
    def execute(cls, text, default_seconds) -> io.NodeOutput:
        from iamflow_core.pictures import plan_picture
        from iamflow_core.story import parse_story_text, plan_chunks

        story = parse_story_text(text, default_seconds=default_seconds, source="Story node")
        plan = plan_chunks(story)
        rounded = "durations rounded to whole 0.75-s chunks" if plan.rounding_notes() else None
        summary = f"{plan.num_segments} prompts · {plan.video_seconds:.1f} s · {plan.num_chunks} chunks"
        show_status(cls.hidden.unique_id, summary, rounded)
        preview = ui.PreviewImage(picture(plan_picture(plan, story.prompts)), cls=cls)
        return io.NodeOutput(StoryValue(story), ui=preview)


class EntityExtractor(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IAMFlowEntityExtractor",
            display_name="Entity Extractor",
            category=CATEGORY,
            description="Finds the characters and key objects of every prompt with an LLM and gives each a global "
            "ID; the node draws them as an entity sheet. A registry JSON replaces the LLM's answer.",
            inputs=[
                STORY.Input("story", tooltip="The story whose prompts are read."),
                io.Combo.Input(
                    "llm", options=[folders.NONE, *folders.hf_folders()], default=folders.NONE,
                    tooltip="LLM folder in models/LLM (e.g. Qwen3-4B-Instruct-2507): loaded, run once over all "
                    "prompts and unloaded before sampling. None: no LLM (use registry_json, or no registry).",
                ),
                device_input(0, "the LLM"),
                io.String.Input(
                    "registry_json", default="", multiline=True, optional=True,
                    tooltip="Optional registry JSON that replaces the LLM's answer: edit names, attributes, or which "
                    "prompt shows whom (the registry_json output gives the current one to start from).",
                ),
            ],
            outputs=[
                STORY.Output(display_name="story", tooltip="The same story with its entity registry."),
                io.String.Output(display_name="registry_json", tooltip="The registry as JSON, to view or edit."),
            ],
            hidden=[io.Hidden.unique_id],
        )  # fmt: skip

    @classmethod
    def validate_inputs(cls, llm):
        return folders.missing(folders.LLM, llm, folder=True) or True

    @classmethod
    def execute(cls, story, llm, device, registry_json="") -> io.NodeOutput:
        from iamflow_core.pictures import entity_sheet

        registry, warning = _registry(story, llm, device, registry_json)
        value = replace(story, registry=registry)
        show_status(cls.hidden.unique_id, warning, registry_status(value))
        preview = ui.PreviewImage(picture(entity_sheet(registry)), cls=cls)
        text = registry.to_json() if registry is not None else ""
        return io.NodeOutput(value, text, ui=preview)


class EntityReference(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IAMFlowEntityReference",
            display_name="Entity Reference",
            category=CATEGORY,
            description="Says with a picture what an entity of the story looks like: the picture is kept as a "
            "memory frame of that entity, never dropped, and comes back where the entity is in the prompt (Identity "
            "Memory's reference_weight says how strongly). Chain one node per picture.",
            inputs=[
                STORY.Input("story", tooltip="A story with its entity registry (from Entity Extractor)."),
                io.Image.Input(
                    "image", tooltip="The entity's picture (a batch: several pictures of it); scaled to cover the "
                    "video size and cropped to its centre.",
                ),
                io.String.Input(
                    "entity", default="1",
                    tooltip="Whose picture: the entity's id, name or alias in the registry (the Entity Extractor's "
                    "sheet lists them).",
                ),
            ],
            outputs=[STORY.Output(display_name="story", tooltip="The same story; the entity has this picture.")],
            hidden=[io.Hidden.unique_id],
        )  # fmt: skip

    @classmethod
    def execute(cls, story, image, entity) -> io.NodeOutput:
        from iamflow_core.images import as_rgb

        if story.registry is None:
            raise ValueError(
                "the story has no entity registry, so there is no entity to give a picture to; connect the story "
                "output of Entity Extractor (with an LLM or a registry_json)"
            )
        registry, who = story.registry, story.registry.find(entity)
        for n in range(image.shape[0]):
            name = f"Entity Reference {cls.hidden.unique_id}" + (f" #{n + 1}" if image.shape[0] > 1 else "")
            registry = registry.with_reference(who.id, as_rgb(image[n], f"picture {n + 1} of {who.name}"), name)
        count = sum(r.entity == who.id for r in registry.references)
        show_status(cls.hidden.unique_id, f"#{who.id} {who.name}: {count} picture{'s' if count > 1 else ''}")
        return io.NodeOutput(replace(story, registry=registry))


def _registry(story: StoryValue, llm: str, device: str, registry_json: str):
    """The registry: the artist's JSON, else the LLM's (loaded, run and unloaded here), else None. And a device
    fallback warning."""
    from iamflow_core.story.entities import EntityRegistry

    num_segments = len(story.story.segments)
    if registry_json.strip():  # pictures it names ("images") are read from ComfyUI's input folder
        folder = Path(folder_paths.get_input_directory())
        return EntityRegistry.from_json(registry_json, num_segments=num_segments, source="user", folder=folder), None
    if llm == folders.NONE:
        return None, None
    from iamflow_core.story.llm import EntityExtractor as Extractor

    dev, warning = resolve_device(device)
    extractor = Extractor(folders.folder_path(folders.LLM, llm), device=dev)
    try:
        return extractor.extract(list(story.story.prompts)), warning
    finally:
        extractor.unload()
