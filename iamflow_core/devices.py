"""Device names a user types (`--device cuda:1`), checked against the devices this machine has, when asked:
never at import time. A device that is not here is one clear `ValueError` listing the ones that are, instead of
torch's `AssertionError: Torch not compiled with CUDA enabled` at the first tensor moved there.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Callable

import torch

_NAME = re.compile(r"(cpu|mps|cuda)(?::(\d+))?")
_FORMS = "cpu, cuda (the current GPU), cuda:N (GPU N, from 0) or mps (Apple GPU)"


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _mps_available() -> bool:
    return torch.backends.mps.is_available()


def available_devices() -> list[str]:
    """The devices of this machine, best first: `cuda:0`, `cuda:1`, ..., `mps` where there is one, then `cpu`."""
    return [f"cuda:{i}" for i in range(_cuda_count())] + (["mps"] if _mps_available() else []) + ["cpu"]


def _why_missing(kind: str) -> str:
    """Why a device of `kind` asked for is not here, for the error message."""
    if kind == "mps":
        return "no Apple MPS device: it needs a Mac with Apple silicon and a PyTorch built with MPS"
    count = _cuda_count()
    if count:
        return f"{count} CUDA GPU{'' if count == 1 else 's'} visible, numbered from 0"
    if not torch.backends.cuda.is_built():
        return "no CUDA GPU: this PyTorch is built without CUDA; install a CUDA build of PyTorch to use a GPU"
    return "no CUDA GPU is visible: check the NVIDIA driver (nvidia-smi) and CUDA_VISIBLE_DEVICES"


def _present(kind: str, index: int | None) -> bool:
    if kind == "mps":
        return _mps_available()
    return _cuda_count() > (index or 0)


def resolve_device(name: str | torch.device) -> torch.device:
    """The torch device for `name` (`cpu`, `cuda`, `cuda:N`, `mps`), checked to exist on this machine.

    `cuda` means the current GPU and comes back with its index (`cuda:0` unless `torch.cuda.set_device` changed it).
    Raises ValueError, listing the devices there are, for a malformed name or a device this machine lacks.
    """
    here = ", ".join(available_devices())
    match = _NAME.fullmatch(str(name).strip().lower())
    if match is None or (match[1] != "cuda" and match[2] is not None):
        raise ValueError(f"device {str(name)!r} is not a device name; use {_FORMS}; devices here: {here}")
    kind, index = match[1], None if match[2] is None else int(match[2])
    if kind == "cpu":
        return torch.device("cpu")
    if not _present(kind, index):
        raise ValueError(f"device {str(name)!r} is not on this machine ({_why_missing(kind)}); devices here: {here}")
    if kind == "mps":
        return torch.device("mps")
    return torch.device("cuda", torch.cuda.current_device() if index is None else index)


def to_device_async(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on `device` without waiting for the GPU: a small host-made value (indices, angles, weights)
    goes through pinned memory with a non-blocking copy, queued behind the work before it. A plain `.to("cuda")`
    of pageable memory waits for every kernel queued so far, and the GPU then runs dry while the host catches up."""
    device = torch.device(device)
    if device.type == "cuda" and not x.is_cuda:
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


# PyTorch hands out CUDA streams from a pool of 32 per GPU and priority, in turn, and never frees them: the 33rd
# `torch.cuda.Stream()` of a process is the first again. Two threads of ours on one stream serialise, and worse,
# work launched by one onto a stream the other is capturing a CUDA graph on joins the capture (seen on an H200: a
# test's two capturing threads, one's capture stream the other's working stream, failed with
# cudaErrorStreamCaptureUnjoined). `own_stream` skips the pool's streams that a living holder of ours has. It keeps
# the streams themselves (PyTorch's stream objects cannot be weakly referenced safely: that crashed on an H200) and
# a weak reference to each holder.
_STREAMS_PER_POOL = 32
_streams_lock = threading.Lock()
_streams_held: list[tuple[torch.cuda.Stream, Callable[[], object]]] = []  # (stream, its holder while it lives)


def _forever() -> object:
    return True


def own_stream(device: torch.device | str, holder: object | None, priority: int = 0) -> torch.cuda.Stream:
    """A CUDA stream of `device` for `holder` (a worker thread, a decoder, a graph runner; None: the process) that
    no other holder's stream shares while both live. Only when every stream of the pool is held is one shared."""
    device = torch.device(device)
    with _streams_lock:
        _streams_held[:] = [(stream, alive) for stream, alive in _streams_held if alive() is not None]
        held = {(stream.device, stream.cuda_stream) for stream, _ in _streams_held}
        for _ in range(_STREAMS_PER_POOL):
            stream = torch.cuda.Stream(device, priority=priority)
            if (stream.device, stream.cuda_stream) not in held:
                break
        _streams_held.append((stream, _forever if holder is None else weakref.ref(holder)))
        return stream
