"""What every IAMFlow node shares: the category, widgets made from the library's option declarations, the
precision and device widgets, and the short status an artist reads on a node."""

from __future__ import annotations

import logging

import numpy as np
import torch
from comfy_api.latest import io

from iamflow_core.config import DTYPES, option_spec

logger = logging.getLogger(__name__)

CATEGORY = "IAMFlow"
# A node's status: at most this many lines of at most this many characters, so it never grows into its neighbour.
STATUS_LINES, STATUS_WIDTH = 2, 60


def precision_input(what: str) -> io.Combo.Input:
    return io.Combo.Input(
        "precision", options=list(DTYPES), default="bf16", tooltip=f"Number format of {what}: bf16, fp16 or fp32."
    )


def option_input(cls: type, name: str, optional: bool = False) -> io.Input:
    """The widget of a library option (a field made with `iamflow_core.config.option`): its default, bounds,
    choices and help come from the library's one declaration. An "automatic" (None) option shows its `auto`
    number. `optional`: for options added after the first release, so prompts saved before still run."""
    default, spec = option_spec(cls, name)
    if spec.choices is not None:
        return io.Combo.Input(name, options=list(spec.choices), default=default, tooltip=spec.help, optional=optional)
    if isinstance(default, bool):
        return io.Boolean.Input(name, default=default, tooltip=spec.help, optional=optional)
    low = spec.min
    if spec.auto is not None:
        default, low = (spec.auto if default is None else default), spec.auto
    kind = io.Float if isinstance(spec.step or default, float) else io.Int
    bounds = {k: v for k, v in (("min", low), ("max", spec.max), ("step", spec.step)) if v is not None}
    return kind.Input(name, default=default, tooltip=spec.help, optional=optional, **bounds)


def options_from_widgets(cls: type, values: dict):
    """An instance of the settings class `cls` from widget values named like its options (automatic -> None)."""
    return cls(**{name: option_spec(cls, name)[1].value_of(value) for name, value in values.items()})


def picture(image) -> torch.Tensor:
    """A PIL picture as a ComfyUI IMAGE: float32 [1, H, W, 3] in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array)[None]


def short(text: str, width: int = STATUS_WIDTH) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def show_status(unique_id: str | None, *lines: str | None) -> str:
    """Put a short status on the node now (ComfyUI's progress text): the first `STATUS_LINES` non-empty lines, each
    cut to `STATUS_WIDTH` characters. Everything is logged in full. Returns the text shown."""
    full = [line for line in lines if line]
    for line in full:
        logger.info("node %s: %s", unique_id, line)
    text = "\n".join(short(line) for line in full[:STATUS_LINES])
    try:
        from server import PromptServer
    except ImportError:  # no ComfyUI server (scripts)
        return text
    server = getattr(PromptServer, "instance", None)
    if unique_id is not None and server is not None and text:
        server.send_progress_text(text, unique_id)
    return text
