"""Reading checkpoint files, lazily and safely: the only module of the library that opens weight files.

A checkpoint (one file or the shards of a folder) is opened as a `Source`: its key names, shapes and dtypes are
known before any tensor data is read, and each tensor is read on its own when asked for. Safetensors files are
memory-mapped through `safe_open`; `.pt`/`.pth` files are only read with `torch.load(weights_only=True)`, which
refuses pickles that would run code. Every problem with a file raises `CheckpointError`, naming the file, what
was found and what was expected.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

PathLike = str | Path

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unknown, truncated, unsafe, the wrong model, or mismatched."""


def examples(keys: Iterable[str], n: int = 3) -> str:
    """The first `n` of `keys` in sorted order, for error messages."""
    return ", ".join(sorted(keys)[:n])


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc


@dataclass
class Source:
    """The tensors of a checkpoint (one file or the shards of a folder); shapes are known before data is read."""

    path: Path
    files: list[Path]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    read: Callable[[str], torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    state_key: str | None = None


def open_source(files: list[Path], path: Path, prefer: tuple[str, ...] = ()) -> Source:
    """Open the weight `files` of the checkpoint at `path`. prefer: the entries of a torch file that may hold its
    state dict (e.g. `generator_ema` of a training checkpoint), in order of preference."""
    if all(f.suffix == ".safetensors" for f in files):
        return open_safetensors(files, path)
    if len(files) == 1:
        return _open_torch(files[0], prefer)
    raise CheckpointError(f"{path}: cannot combine several non-safetensors files: {[f.name for f in files]}")


# --- safetensors ---------------------------------------------------------------------------------------------------


def _size(path: Path) -> str:
    return f"{path.stat().st_size} bytes" if path.is_file() else "a folder"


def open_safetensors(files: list[Path], path: Path) -> Source:
    handles, owner, shapes, dtypes, metadata = [], {}, {}, {}, {}
    for file in files:
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
            metadata.update(handle.metadata() or {})
            names = handle.keys()  # safe_open handles are not iterable
            for key in names:
                tensor_slice = handle.get_slice(key)
                shapes[key] = tuple(tensor_slice.get_shape())
                dtypes[key] = _safetensors_dtype(tensor_slice.get_dtype(), key, file)
                owner[key] = handle
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(
                f"the file looks truncated or is not a safetensors file: {file} ({_size(file)}): {exc}"
            ) from exc
        handles.append(handle)

    def read(key: str) -> torch.Tensor:
        try:
            return owner[key].get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"cannot read tensor {key} from {path}; the file may be damaged: {exc}") from exc

    return Source(path, files, shapes, dtypes, read, metadata)


def _safetensors_dtype(name: str, key: str, file: Path) -> torch.dtype:
    if name not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{file}: tensor {key} has dtype {name}, which IAMFlow cannot read")
    return SAFETENSORS_DTYPES[name]


# --- PyTorch files (.pt, .pth), never code -------------------------------------------------------------------------


def _torch_load(file: Path) -> object:
    """torch.load that only accepts plain tensors and containers, never code."""
    try:
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # Files written by torch < 1.6 (legacy format) cannot be memory-mapped.
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message ends with the advice to load the file with weights_only=False, i.e. to run its code:
        # never passed on (`from None` keeps it out of tracebacks too); what the file imports is kept.
        raise CheckpointError(
            f"{file} is refused for safety: it is a pickle that is not plain tensors and holds code that would run "
            f"when it is loaded{_unsafe_global(exc)}. IAMFlow never runs code from a model file; get the "
            ".safetensors version of this model instead"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise CheckpointError(
            f"the file looks truncated or is not a PyTorch checkpoint: {file} ({_size(file)}): {exc}"
        ) from exc


def _unsafe_global(exc: pickle.UnpicklingError) -> str:
    """The Python object that torch's unpickler refused, as ` (it imports posix.system)`; empty if it names none."""
    found = re.search(r"GLOBAL (\S+)", str(exc))
    return f" (it imports {found[1]})" if found else ""


def _tensor_dict(obj: object, file: Path, prefer: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], str | None]:
    """The state dict inside a torch.load result: the object itself, or its first `prefer` entry."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file} holds a {type(obj).__name__}; expected a dictionary of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if tensors:
        return tensors, None
    for key in prefer:
        if isinstance(obj.get(key), dict):
            inner, _ = _tensor_dict(obj[key], file, ())
            return inner, key
    raise CheckpointError(
        f"{file} holds no tensors at its top level and none of {', '.join(prefer) or 'the known entries'}; "
        f"its entries are: {', '.join(map(str, list(obj)[:12]))}"
    )


def _open_torch(file: Path, prefer: tuple[str, ...]) -> Source:
    tensors, state_key = _tensor_dict(_torch_load(file), file, prefer)
    shapes = {k: tuple(t.shape) for k, t in tensors.items()}
    dtypes = {k: t.dtype for k, t in tensors.items()}
    return Source(file, [file], shapes, dtypes, tensors.__getitem__, {}, state_key)
