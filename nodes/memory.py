"""Memory nodes: the VLM verifier, the memory settings the sampler builds its policy from, and the inspector that
draws the story map."""

from __future__ import annotations

import logging

from comfy_api.latest import io, ui

from . import folders
from .common import CATEGORY, option_input, options_from_widgets, picture, show_status
from .devices import device_input, resolve_device
from .values import MEMORY, STATE, VLM, MemoryValue

logger = logging.getLogger(__name__)


class VLMVerifier(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IAMFlowVLMVerifier",
            display_name="VLM Verifier",
            category=CATEGORY,
            description="Loads a vision-language model that scores decoded frames (to pick the best frame of a chunk "
            "for memory) and corrects entity attributes.",
            inputs=[
                io.Combo.Input(
                    "vlm", options=folders.hf_folders(), tooltip="VLM folder in models/LLM (e.g. Qwen3-VL-2B-Instruct)"
                ),
                device_input(1, "the verifier (a second GPU keeps it off the DiT's GPU)"),
            ],
            outputs=[VLM.Output(display_name="verifier", tooltip="The frame verifier; wire it into Identity Memory.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, vlm):
        return folders.missing(folders.LLM, vlm, folder=True) or True

    @classmethod
    def execute(cls, vlm, device) -> io.NodeOutput:
        from iamflow_core.story.vlm import FrameVerifier

        dev, warning = resolve_device(device)
        verifier = FrameVerifier(folders.folder_path(folders.LLM, vlm), device=dev)
        show_status(cls.hidden.unique_id, warning or str(dev))
        return io.NodeOutput(verifier)


class IdentityMemory(io.ComfyNode):
    # Widget order is the order saved in workflows: new options go at the end.
    OPTIONS = (
        "mode", "transition", "max_frames", "min_frames_multi_entity", "bank_size", "record_interval", "sparse_topk",
        "visual_weight", "archive_limit_mb", "async_verifier", "verifier_wait", "reference_weight",
    )  # fmt: skip
    ADDED = ("reference_weight",)  # optional inputs: API prompts saved before they existed still run

    @classmethod
    def define_schema(cls) -> io.Schema:
        from iamflow_core.settings import MemorySettings

        return io.Schema(
            node_id="IAMFlowIdentityMemory",
            display_name="Identity Memory",
            category=CATEGORY,
            description="Memory settings: IAMFlow identity memory, the MemFlow bank or none, the frame budgets, the "
            "prompt transition and how the verifier runs. The sampler builds a fresh memory from them on every run.",
            inputs=[
                *(option_input(MemorySettings, name, optional=name in cls.ADDED) for name in cls.OPTIONS),
                VLM.Input("verifier", optional=True, tooltip="Optional VLM verifier (identity mode)."),
            ],
            outputs=[MEMORY.Output(display_name="memory", tooltip="Memory settings and verifier, for the sampler.")],
        )

    @classmethod
    def execute(cls, verifier=None, **options) -> io.NodeOutput:
        from iamflow_core.settings import MemorySettings

        return io.NodeOutput(MemoryValue(options_from_widgets(MemorySettings, options), verifier))


class InspectMemory(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IAMFlowInspectMemory",
            display_name="Inspect Memory",
            category=CATEGORY,
            description="Draws the story map of a finished run: prompts along time, one lane per entity, where frames "
            "were archived and where they came back; and says it in words.",
            inputs=[STATE.Input("state", tooltip="The state output of the Streaming Sampler.")],
            outputs=[
                io.String.Output(display_name="text", tooltip="What the memory did, in plain words."),
                io.Image.Output(display_name="story_map", tooltip="The story map as a picture."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, state) -> io.NodeOutput:
        from iamflow_core.pictures import story_map_picture, story_map_summary

        story_map = state.story_map()
        lines = story_map_summary(story_map)
        image = picture(story_map_picture(story_map))
        show_status(cls.hidden.unique_id, lines[0] if lines else None)  # the rest is in the picture and the text
        return io.NodeOutput("\n".join(lines), image, ui=ui.PreviewImage(image, cls=cls))
