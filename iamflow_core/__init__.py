"""IAMFlow core: streaming Wan2.1 engine, story pipeline and identity-aware memory. Never imports ComfyUI."""

__version__ = "0.1.0"
