"""The socket types of the pack and the typed values that travel on them. All frozen: ComfyUI caches node outputs
and may hand one output to several nodes, so a node never changes a value it received; it makes a new one
(dataclasses.replace).

Models (IAMFLOW_DIT, IAMFLOW_TEXT_ENCODER, IAMFLOW_VAE, IAMFLOW_VLM) travel as the library's model objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from comfy_api.latest import io

from iamflow_core.render import RenderResult
from iamflow_core.settings import MemorySettings
from iamflow_core.story import Story
from iamflow_core.story.entities import EntityRegistry

DIT = io.Custom("IAMFLOW_DIT")
TEXT_ENCODER = io.Custom("IAMFLOW_TEXT_ENCODER")
VAE = io.Custom("IAMFLOW_VAE")
VLM = io.Custom("IAMFLOW_VLM")
STORY = io.Custom("IAMFLOW_STORY")
MEMORY = io.Custom("IAMFLOW_MEMORY")
STATE = io.Custom("IAMFLOW_STATE")


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

    def story_map(self) -> dict[str, Any]:
        from iamflow_core.render import story_map

        return story_map(self.story, self.registry, self.render)
