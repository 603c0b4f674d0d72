"""Device widgets: `cuda:N` for each visible GPU and `cpu`, and a graceful fallback for devices a workflow names
that this machine lacks (a workflow saved on two GPUs must still run on one)."""

from __future__ import annotations

import logging
import re

import torch
from comfy_api.latest import io

logger = logging.getLogger(__name__)

_DEVICE = re.compile(r"cpu|cuda:(\d+)")


def device_options() -> list[str]:
    """`cuda:0`, `cuda:1`, ... for every visible GPU, then `cpu`. Read per call, never at import time."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i}" for i in range(count)] + ["cpu"]


def device_input(preferred: int = 0, what: str = "this model") -> io.Combo.Input:
    """A device combo that defaults to GPU `preferred` (or the last GPU there is, or the CPU)."""
    options = device_options()
    default = f"cuda:{min(preferred, len(options) - 2)}" if len(options) > 1 else "cpu"
    tooltip = (
        f"Where {what} runs. A device this machine lacks (a workflow saved on more GPUs) falls back to the last "
        "GPU, or the CPU, with a warning."
    )
    return io.Combo.Input("device", options=options, default=default, tooltip=tooltip)


def resolve_device(name: str) -> tuple[torch.device, str | None]:
    """The device to use for `name`, and a short warning when it had to fall back (logged in full here, shown on
    the node)."""
    match = _DEVICE.fullmatch(name)
    if match is None:
        raise ValueError(f"device {name!r} is not a device; use 'cpu' or 'cuda:N' (e.g. cuda:0)")
    if match.group(1) is None:
        return torch.device("cpu"), None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(match.group(1))
    if index < count:
        return torch.device(name), None
    fallback = torch.device(f"cuda:{count - 1}") if count else torch.device("cpu")
    plural = "" if count == 1 else "s"
    logger.warning(
        "device %s is not on this machine (%d GPU%s visible); using %s instead", name, count, plural, fallback
    )
    return fallback, f"{name} is not on this machine: using {fallback}"
