"""Small helpers every IAMFlow node shares: the category, precisions, widgets of library options, and text shown
on a node."""

from __future__ import annotations

import logging

from iamflow_core.config import DTYPES

logger = logging.getLogger(__name__)

CATEGORY = "IAMFlow"
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


def option_widget(cls: type, name: str, **extra) -> tuple:
    """The widget of a library option (a field made with `iamflow_core.config.option`): its default, bounds,
    choices and help come from the library's one declaration."""
    from iamflow_core.config import option_spec

    default, spec = option_spec(cls, name)
    if spec.choices is not None:
        return widget(list(spec.choices), spec.help, default=default, **extra)
    if spec.auto is not None:  # "automatic" (None) is shown as a number a widget can hold
        default, low = (spec.auto if default is None else default), spec.auto
    else:
        low = spec.min
    kind = "BOOLEAN" if isinstance(default, bool) else "FLOAT" if isinstance(spec.step or default, float) else "INT"
    bounds = {k: v for k, v in (("min", low), ("max", spec.max), ("step", spec.step)) if v is not None}
    return widget(kind, spec.help, default=default, **bounds, **extra)


def options_from_widgets(cls: type, values: dict):
    """An instance of the settings class `cls` from widget values named like its options (automatic -> None)."""
    from iamflow_core.config import option_spec

    return cls(**{name: option_spec(cls, name)[1].value_of(value) for name, value in values.items()})
