"""Building models without memory: parameters on the meta device, then the loaded tensors taken as they are.

A model is constructed inside `parameters_on_meta()` (no allocation, no init), its state dict shapes are what a
checkpoint is checked against (`meta_shapes`), and `assign` gives it the loaded tensors (`assign=True`).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from .plan import CheckpointInfo
from .reading import CheckpointError

_register = nn.Module.register_parameter
_on_meta = threading.local()  # per thread: inside parameters_on_meta (models load on threads side by side)
_patch_lock = threading.Lock()
_patch_users = 0
# The initializers modules call from `reset_parameters`. On a meta tensor they change nothing (there is no data), but
# they still run: PyTorch's Python reference implementations, half the time of building the DiT or umT5 on meta (CPU
# probe), and the first of them imports torch._dynamo (1.3 s on an H200 host) while other loaders wait on that import.
_INITS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "xavier_uniform_", "xavier_normal_",
          "kaiming_uniform_", "kaiming_normal_", "orthogonal_")  # fmt: skip
_init_functions = {name: getattr(nn.init, name) for name in _INITS if hasattr(nn.init, name)}


def _skipping_meta(init):
    @functools.wraps(init)
    def run(tensor: torch.Tensor, *args, **kwargs):
        return tensor if tensor.is_meta else init(tensor, *args, **kwargs)

    return run


_meta_skipping_inits = {name: _skipping_meta(init) for name, init in _init_functions.items()}


def _register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
    _register(module, name, param)
    if param is not None and getattr(_on_meta, "depth", 0):
        module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create parameters on the meta device (no memory, no init); buffers stay real, because non-persistent
    buffers (latent statistics, position tables) are not in checkpoints and must be computed at construction.
    Only in this thread: `nn.Module.register_parameter` is patched while any thread is inside, and the patch acts
    for the threads inside only. The `nn.init` functions skip meta tensors meanwhile (for every thread: on a meta
    tensor they do nothing anyway)."""
    global _patch_users
    with _patch_lock:
        if _patch_users == 0:
            nn.Module.register_parameter = _register_on_meta
            for name, init in _meta_skipping_inits.items():
                setattr(nn.init, name, init)
        _patch_users += 1
    _on_meta.depth = getattr(_on_meta, "depth", 0) + 1
    try:
        yield
    finally:
        _on_meta.depth -= 1
        with _patch_lock:
            _patch_users -= 1
            if _patch_users == 0:
                nn.Module.register_parameter = _register
                for name, init in _init_functions.items():
                    setattr(nn.init, name, init)


def meta_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def assign(model: nn.Module, state: dict[str, torch.Tensor], path: Path, device: torch.device) -> None:
    """load_state_dict(strict, assign) with failures as CheckpointError, then real buffers on `device`."""
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # check_keys ran already, so this is unexpected; still never a raw traceback
        raise CheckpointError(f"{path} does not fit {type(model).__name__}: {exc}") from exc
    model.to(device)  # moves the buffers built at construction; the parameters are there already
    if hasattr(model, "reset_buffers"):
        model.reset_buffers()
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{type(model).__name__} kept tensors without data after loading {path}: {left[:5]}")
    model.eval()


def build(
    cls: type[nn.Module], cfg: object, state: dict[str, torch.Tensor], info: CheckpointInfo, device: torch.device | str
) -> nn.Module:
    """Build `cls(cfg)` without memory, take the loaded tensors as they are, eval mode without gradients."""
    with parameters_on_meta():
        model = cls(cfg)
    model.requires_grad_(False)
    assign(model, state, Path(info.path), torch.device(device))
    model.load_info = info
    return model
