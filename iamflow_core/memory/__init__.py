"""Memory policies: what the streaming loop puts into the cache's memory segment, and when.

`base` holds the contract (`StepContext`, `MemoryPolicy`, `NoMemory`); `scoring` the pure scores that rank frames;
`memflow` the MemFlow baseline bank; `identity` IAMFlow's identity-aware memory, with its frame archive
(`archive`) and the pacing of the verifier's verdicts (`pacing`). A policy reads the verifier only through the
`verify.Verifier` protocol: nothing here imports a language model.
"""

from .base import MemoryPolicy, NoMemory, StepContext, require_memory_segment
from .identity import IdentityMemory
from .memflow import MemFlowMemory
from .scoring import entity_token_weights, frame_descriptor, frame_relevance, text_query

__all__ = [
    "IdentityMemory", "MemFlowMemory", "MemoryPolicy", "NoMemory", "StepContext", "entity_token_weights",
    "frame_descriptor", "frame_relevance", "require_memory_segment", "text_query",
]  # fmt: skip
