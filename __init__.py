"""ComfyUI entry point of the IAMFlow node pack.

ComfyUI imports this file as the package `custom_nodes/<pack>`; the nodes are registered only when ComfyUI itself is
importable, so importing the package anywhere else (tests, the CLI) does nothing.
"""

import importlib.util

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

if __package__ and importlib.util.find_spec("folder_paths") is not None:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
