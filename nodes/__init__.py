"""ComfyUI nodes of the IAMFlow pack, in ComfyUI's V3 schema (`comfy_api.latest`): thin glue over `iamflow_core`
(one library call per node). ComfyUI finds them through `comfy_entrypoint`.

Imported by the pack's `__init__.py` only inside ComfyUI (it needs `comfy_api`, `folder_paths`, `comfy` and
`server`).
"""

import importlib.util
import sys
from pathlib import Path

# ComfyUI imports the pack as a package but does not put its folder on sys.path; the library sits next to this
# folder (or is pip-installed, which wins). Appended, so it can never shadow a module of ComfyUI's own.
if importlib.util.find_spec("iamflow_core") is None:
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from comfy_api.latest import ComfyExtension, io  # noqa: E402

from .folders import register_folders  # noqa: E402

register_folders()

from .loaders import LoadDiT, LoadTextEncoder, LoadVAE  # noqa: E402
from .memory import IdentityMemory, InspectMemory, VLMVerifier  # noqa: E402
from .sampler import DecodeVAE, StreamingSampler  # noqa: E402
from .story import EntityExtractor, EntityReference, Story  # noqa: E402

NODES: list[type[io.ComfyNode]] = [
    LoadDiT, LoadTextEncoder, LoadVAE, Story, EntityExtractor, EntityReference, VLMVerifier, IdentityMemory,
    StreamingSampler, DecodeVAE, InspectMemory,
]  # fmt: skip


class IAMFlowExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> IAMFlowExtension:
    return IAMFlowExtension()


__all__ = ["NODES", "IAMFlowExtension", "comfy_entrypoint"]
