"""ComfyUI entry point of the IAMFlow node pack (V3 node schema: ComfyUI calls `comfy_entrypoint`).

ComfyUI imports this file as the package `custom_nodes/<pack>`; the nodes are imported only when ComfyUI's node API
(`comfy_api`) is importable, so importing the package anywhere else (tests, the CLI) does nothing.
"""

import importlib.util

if __package__ and importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint"]
