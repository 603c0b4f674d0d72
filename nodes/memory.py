"""Memory nodes: the VLM verifier, the memory settings the sampler builds its policy from, and the inspector."""

from __future__ import annotations

import json
import logging

from . import folders
from .common import CATEGORY, HIDDEN, widget, with_text
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
        "Memory settings: IAMFlow identity memory, the MemFlow bank or none, the frame budgets and the prompt "
        "transition. The sampler builds a fresh memory from them on every run."
    )

    @classmethod
    def INPUT_TYPES(cls):
        from iamflow_core.memory.settings import MODES
        from iamflow_core.transition import STRATEGIES

        return {
            "required": {
                "mode": widget(
                    list(MODES),
                    "identity: frames showing the new prompt's entities come back at each prompt switch (IAMFlow). "
                    "memflow: a bank of frames ranked by prompt relevance (MemFlow). none: sink + rolling window "
                    "only (LongLive).",
                    default="identity",
                ),
                "transition": widget(
                    list(STRATEGIES),
                    "Prompt switch. soft: blend old and new prompt over a window sized by how different they are "
                    "(IAMFlow); recache: re-encode the recent frames under the new prompt (LongLive/MemFlow); "
                    "hard: just switch.",
                    default="soft",
                ),
                "max_frames": widget(
                    "INT", "identity: memory frames put back into attention, at most.", default=4, min=1, max=16
                ),
                "min_frames_multi_entity": widget(
                    "INT",
                    "identity: at least this many frames when a prompt has two or more entities (at most max_frames).",
                    default=2,
                    min=0,
                    max=16,
                ),
                "bank_size": widget("INT", "memflow: frames in the bank.", default=3, min=1, max=16),
                "record_interval": widget(
                    "INT", "memflow: capture a frame every this many chunks.", default=3, min=1, max=64
                ),
                "sparse_topk": widget(
                    "INT",
                    "0: off. Else each attention head attends only to its top-k sink and memory frames (sparse "
                    "activation).",
                    default=0,
                    min=0,
                    max=64,
                ),
                "visual_weight": widget(
                    "FLOAT",
                    "identity: weight of the verifier's visual score against text relevance when choosing a "
                    "chunk's frame (needs a verifier).",
                    default=0.3,
                    min=0.0,
                    max=1.0,
                    step=0.05,
                ),
                "archive_limit_mb": widget(
                    "INT",
                    "identity: host memory for archived frames; beyond it the least useful frames are dropped.",
                    default=2048,
                    min=64,
                    max=65536,
                    step=64,
                ),
                "async_verifier": widget(
                    "BOOLEAN",
                    "Run the verifier in a worker thread on its own device while sampling goes on (the sampler "
                    "waits only when memory needs a score). Off: verify inline.",
                    default=True,
                ),
            },
            "optional": {
                "verifier": widget(VLM, "Optional VLM verifier (identity mode)."),
            },
        }

    RETURN_TYPES = (MEMORY,)
    RETURN_NAMES = ("memory",)
    OUTPUT_TOOLTIPS = ("Memory settings (and the verifier) for the Streaming Sampler.",)
    FUNCTION = "settings"
    CATEGORY = CATEGORY

    def settings(self, mode, transition, max_frames, min_frames_multi_entity, bank_size, record_interval,
                 sparse_topk, visual_weight, archive_limit_mb, async_verifier, verifier=None):  # fmt: skip
        from iamflow_core.memory.settings import MemorySettings

        settings = MemorySettings(
            mode=mode, transition=transition, max_frames=max_frames, bank_size=bank_size,
            min_frames_multi_entity=min_frames_multi_entity, record_interval=record_interval,
            sparse_topk=sparse_topk, visual_weight=visual_weight, archive_limit_mb=archive_limit_mb,
        )  # fmt: skip
        return (MemoryValue(settings, verifier, async_verifier),)


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
