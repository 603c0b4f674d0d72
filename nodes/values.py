"""The typed values that travel on IAMFlow's sockets. All frozen: ComfyUI caches node outputs and may hand one
output to several nodes, so a node never changes a value it received; it makes a new one (dataclasses.replace).

Models (IAMFLOW_DIT, IAMFLOW_TEXT_ENCODER, IAMFLOW_VAE, IAMFLOW_VLM) travel as the library's model objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from iamflow_core.render import RenderResult
from iamflow_core.settings import MemorySettings
from iamflow_core.story import Story
from iamflow_core.story.entities import EntityRegistry

DIT = "IAMFLOW_DIT"
TEXT_ENCODER = "IAMFLOW_TEXT_ENCODER"
VAE = "IAMFLOW_VAE"
LLM = "IAMFLOW_LLM"  # reserved: the extractor node loads, uses and unloads its LLM itself
VLM = "IAMFLOW_VLM"
STORY = "IAMFLOW_STORY"
MEMORY = "IAMFLOW_MEMORY"
STATE = "IAMFLOW_STATE"


@dataclass(frozen=True)
class StoryValue:
    """IAMFLOW_STORY: the story, and its entity registry once an extractor (or the artist) has made one."""

    story: Story
    registry: EntityRegistry | None = None


@dataclass(frozen=True)
class MemoryValue:
    """IAMFLOW_MEMORY: what the artist chose; the sampler builds a fresh (stateful) policy from it per run.

    verifier: a loaded `FrameVerifier` (the scorer) or None; `settings.async_verifier` says how it runs.
    """

    settings: MemorySettings
    verifier: Any = None


@dataclass(frozen=True)
class StateValue:
    """IAMFLOW_STATE: the story, its registry and what happened per chunk (a render result without its frames)."""

    story: Story
    registry: EntityRegistry | None
    render: RenderResult
