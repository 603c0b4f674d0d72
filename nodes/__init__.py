"""ComfyUI nodes of the IAMFlow pack (thin glue over iamflow_core). Filled in by the node-pack work."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
