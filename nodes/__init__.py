"""ComfyUI nodes of the IAMFlow pack: thin glue over `iamflow_core` (one library call per node).

Imported by the pack's `__init__.py` only inside ComfyUI (it needs `folder_paths`, `comfy` and `server`).
"""

import importlib.util
import sys
from pathlib import Path

# ComfyUI imports the pack as a package but does not put its folder on sys.path; the library sits next to this
# folder (or is pip-installed, which wins). Appended, so it can never shadow a module of ComfyUI's own.
if importlib.util.find_spec("iamflow_core") is None:
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from .folders import register_folders  # noqa: E402

register_folders()

from .loaders import IAMFlowLoadDiT, IAMFlowLoadTextEncoder, IAMFlowLoadVAE  # noqa: E402
from .memory import IAMFlowIdentityMemory, IAMFlowInspectMemory, IAMFlowVLMVerifier  # noqa: E402
from .sampler import IAMFlowDecodeVAE, IAMFlowStreamingSampler  # noqa: E402
from .story import IAMFlowEntityExtractor, IAMFlowStory  # noqa: E402

_NODES = {
    "IAMFlowLoadDiT": (IAMFlowLoadDiT, "Load Wan DiT (IAMFlow)"),
    "IAMFlowLoadTextEncoder": (IAMFlowLoadTextEncoder, "Load Text Encoder (IAMFlow)"),
    "IAMFlowLoadVAE": (IAMFlowLoadVAE, "Load Wan VAE (IAMFlow)"),
    "IAMFlowStory": (IAMFlowStory, "Story (IAMFlow)"),
    "IAMFlowEntityExtractor": (IAMFlowEntityExtractor, "Entity Extractor LLM (IAMFlow)"),
    "IAMFlowVLMVerifier": (IAMFlowVLMVerifier, "VLM Verifier (IAMFlow)"),
    "IAMFlowIdentityMemory": (IAMFlowIdentityMemory, "Identity Memory (IAMFlow)"),
    "IAMFlowStreamingSampler": (IAMFlowStreamingSampler, "Streaming Sampler (IAMFlow)"),
    "IAMFlowDecodeVAE": (IAMFlowDecodeVAE, "Decode VAE, streaming (IAMFlow)"),
    "IAMFlowInspectMemory": (IAMFlowInspectMemory, "Inspect Memory (IAMFlow)"),
}
NODE_CLASS_MAPPINGS = {name: cls for name, (cls, _) in _NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {name: title for name, (_, title) in _NODES.items()}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
