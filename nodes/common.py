"""Small helpers every IAMFlow node shares: the category, precisions, and text shown on a node."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

CATEGORY = "IAMFlow"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HIDDEN = {"unique_id": "UNIQUE_ID"}


def precision_input(what: str) -> tuple[list[str], dict]:
    return widget(list(DTYPES), f"Number format of {what}: bf16 (default), fp16 or fp32.", default="bf16")


def show_text(unique_id: str | None, text: str) -> None:
    """Put `text` on the node now (ComfyUI's progress text, in frontends that have it); also logged."""
    logger.debug("node %s: %s", unique_id, text)
    try:
        from server import PromptServer
    except ImportError:  # no ComfyUI server (tests, scripts)
        return
    server = getattr(PromptServer, "instance", None)
    if unique_id is not None and server is not None and hasattr(server, "send_progress_text"):
        server.send_progress_text(text, unique_id)


def with_text(result: tuple, lines: list[str], unique_id: str | None = None) -> dict:
    """A node return value that shows `lines` on the node (progress text now, `ui.text` in the history)."""
    text = "\n".join(line for line in lines if line)
    if text:
        show_text(unique_id, text)
    return {"ui": {"text": [text]} if text else {}, "result": result}


def widget(kind, tooltip: str, **options) -> tuple:
    """One input declaration: `kind` is a type name (INT, STRING, IAMFLOW_DIT, ...) or a list of choices."""
    return (kind, {**options, "tooltip": tooltip})
