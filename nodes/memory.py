"""Memory nodes: the VLM verifier, the memory settings the sampler builds its policy from, and the inspector."""

from __future__ import annotations

import json
import logging

from . import folders
from .common import CATEGORY, HIDDEN, option_widget, options_from_widgets, widget, with_text
from .devices import check_device, device_input, resolve_device
from .story import describe_registry
from .values import MEMORY, STATE, VLM, MemoryValue, StoryValue

logger = logging.getLogger(__name__)


class IAMFlowVLMVerifier:
    DESCRIPTION = (
        "Loads a vision-language model that scores decoded frames (to pick the best frame of a chunk for memory) "
        "and corrects entity attributes."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vlm": widget(folders.hf_folders(), "VLM folder in models/LLM (e.g. Qwen3-VL-2B-Instruct)."),
                "device": device_input(1, "the verifier (a second GPU keeps it off the DiT's GPU)"),
            },
            "hidden": HIDDEN,
        }

    RETURN_TYPES = (VLM,)
    RETURN_NAMES = ("verifier",)
    OUTPUT_TOOLTIPS = ("The frame verifier; wire it into Identity Memory.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, vlm, device):
        return folders.missing(folders.LLM, vlm, folder=True) or check_device(device)

    def load(self, vlm, device, unique_id=None):
        from iamflow_core.story.vlm import FrameVerifier

        dev, warning = resolve_device(device)
        verifier = FrameVerifier(folders.folder_path(folders.LLM, vlm), device=dev)
        return with_text((verifier,), [warning, f"{vlm} on {dev}"], unique_id)


class IAMFlowIdentityMemory:
    DESCRIPTION = (
        "Memory settings: IAMFlow identity memory, the MemFlow bank or none, the frame budgets, the prompt "
        "transition and how the verifier runs. The sampler builds a fresh memory from them on every run."
    )
    # Widget order is the order saved in workflows: new options go at the end.
    OPTIONS = (
        "mode", "transition", "max_frames", "min_frames_multi_entity", "bank_size", "record_interval", "sparse_topk",
        "visual_weight", "archive_limit_mb", "async_verifier", "verifier_wait",
    )  # fmt: skip

    @classmethod
    def INPUT_TYPES(cls):
        from iamflow_core.settings import MemorySettings

        return {
            "required": {name: option_widget(MemorySettings, name) for name in cls.OPTIONS},
            "optional": {"verifier": widget(VLM, "Optional VLM verifier (identity mode).")},
        }

    RETURN_TYPES = (MEMORY,)
    RETURN_NAMES = ("memory",)
    OUTPUT_TOOLTIPS = ("Memory settings (and the verifier) for the Streaming Sampler.",)
    FUNCTION = "settings"
    CATEGORY = CATEGORY

    def settings(self, verifier=None, **options):
        from iamflow_core.settings import MemorySettings

        return (MemoryValue(options_from_widgets(MemorySettings, options), verifier),)


def describe_state(state) -> str:
    from iamflow_core.render import describe_timeline

    parts = [describe_timeline(state.render)]
    if state.render.out_path is not None:
        parts.append(f"video: {state.render.out_path} ({state.render.frames_written} frames)")
    parts.append(describe_registry(StoryValue(state.story, state.registry)))
    memory_map = state.render.memory_map
    if memory_map:
        summary = {k: v for k, v in memory_map.items() if k not in ("registry", "events")}
        parts.append("memory:\n" + json.dumps(summary, indent=2, default=str))
    return "\n\n".join(parts)


class IAMFlowInspectMemory:
    DESCRIPTION = "Shows the entity registry and the per-chunk memory timeline of a finished run as text."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"state": widget(STATE, "The state output of the Streaming Sampler.")}, "hidden": HIDDEN}

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("text",)
    OUTPUT_TOOLTIPS = ("The same text, for saving or other text nodes.",)
    FUNCTION = "inspect"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True

    def inspect(self, state, unique_id=None):
        text = describe_state(state)
        return with_text((text,), [text], unique_id)
