"""Reading checkpoint files, lazily and safely: the only module of the library that opens weight files.

A checkpoint (one file or the shards of a folder) is opened as a `Source`: its key names, shapes and dtypes are
known before any tensor data is read, and each tensor is read on its own when asked for. Safetensors files are
memory-mapped through `safe_open`, and read onto a GPU by several threads at once (`Source.stream`); `.pt`/`.pth`
files are only read with `torch.load(weights_only=True)`, which refuses pickles that would run code. Every problem
with a file raises `CheckpointError`, naming the file, what was found and what was expected.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import queue
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..devices import own_stream

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
    read_many: Callable[[list[str], torch.device], Iterator[torch.Tensor]] | None = None

    def stream(self, keys: list[str], device: torch.device) -> Iterator[torch.Tensor]:
        """The tensors of `keys`, in order, as stored (dtype and shape) on `device`: onto a GPU from safetensors files,
        read by several threads at once (`read_extents`); else one by one (on the CPU, memory-mapped: read as used)."""
        if self.read_many is not None and device.type == "cuda":
            return self.read_many(keys, device)
        return (self.read(key).to(device) for key in keys)


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

    extents: dict[str, Extent] = {}

    def read_many(keys: list[str], device: torch.device) -> Iterator[torch.Tensor]:
        if not extents:
            for file in files:
                extents.update(_extents(file))
        return read_extents([extents[key] for key in keys], device, path)

    return Source(path, files, shapes, dtypes, read, metadata, read_many=read_many)


def _safetensors_dtype(name: str, key: str, file: Path) -> torch.dtype:
    if name not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{file}: tensor {key} has dtype {name}, which IAMFlow cannot read")
    return SAFETENSORS_DTYPES[name]


# --- many tensors at once, by several threads -----------------------------------------------------------------------
#
# One thread reading a memory-mapped file tensor by tensor copies a page at a time, and its copy to a GPU goes through
# CUDA's own small staging buffer: umT5's 11 GB took seconds. Here worker threads read pieces of the tensors with
# `os.preadv` (no GIL held; on Windows, which has none, from files of their own) into page-locked buffers of their
# own and copy each piece to its place in the tensor on their own CUDA stream; the caller's stream waits for a
# tensor's pieces before it gets the tensor.

PIECE_BYTES = 16 << 20  # a read and a copy; two page-locked buffers of this size per worker
READ_WORKERS = 8
READ_AHEAD_BYTES = 2 << 30  # read at most this far past the tensor the caller is at (a tensor larger still is read)


@dataclass(frozen=True)
class Extent:
    """Where a stored tensor's bytes are: file, absolute offset, length, and what they hold."""

    key: str
    file: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def _extents(file: Path) -> dict[str, Extent]:
    """Each tensor's `Extent` from a safetensors header (8 bytes of header length, the JSON header, then the data)."""
    try:
        with open(file, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length))
        start = 8 + length
        extents = {}
        for key, entry in header.items():
            if key != "__metadata__":
                begin, end = entry["data_offsets"]
                dtype = _safetensors_dtype(entry["dtype"], key, file)
                extents[key] = Extent(key, file, start + begin, end - begin, dtype, tuple(entry["shape"]))
        return extents
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise CheckpointError(f"cannot read the safetensors header of {file} ({_size(file)}): {exc}") from exc


class _Tensor:
    """A tensor being read: its bytes on the device, the pieces not yet handed to the device, the copies' events."""

    def __init__(self, extent: Extent, device: torch.device) -> None:
        self.extent = extent
        self.data = torch.empty(extent.nbytes, dtype=torch.uint8, device=device)
        self.left = max(1, -(-extent.nbytes // PIECE_BYTES))
        self.events: list[torch.cuda.Event] = []
        self.error: BaseException | None = None
        self.issued = threading.Event()
        self.lock = threading.Lock()

    def piece_done(self, event: torch.cuda.Event | None = None, error: BaseException | None = None) -> None:
        with self.lock:
            if event is not None:
                self.events.append(event)
            self.error = self.error or error
            self.left -= 1
            if self.left == 0:
                self.issued.set()

    def result(self, path: Path) -> torch.Tensor:
        self.issued.wait()
        e = self.extent
        if isinstance(self.error, (OSError, EOFError)):
            raise CheckpointError(
                f"cannot read tensor {e.key} (bytes {e.offset}-{e.offset + e.nbytes} of {e.file}) from {path}; the "
                f"file may be truncated or damaged: {self.error}"
            ) from self.error
        if self.error is not None:
            raise RuntimeError(f"reading tensor {e.key} of {path} onto {self.data.device} failed: {self.error}") from (
                self.error
            )
        if self.events:
            stream = torch.cuda.current_stream(self.data.device)
            for event in self.events:
                stream.wait_event(event)
        return self.data.view(self.extent.dtype).view(self.extent.shape)


def _read_into(file: int | io.RawIOBase, view: memoryview, offset: int) -> None:
    """Fill `view` from the file at `offset`; a file that ends first raises EOFError. `file`: a descriptor shared by
    the workers, read with `os.preadv` (no file position involved), or, where the OS has no such read (Windows), a
    file of this worker's own, moved to `offset` before each read."""
    done = 0
    while done < len(view):
        if isinstance(file, int):
            n = os.preadv(file, [view[done:]], offset + done)
        else:
            file.seek(offset + done)
            n = file.readinto(view[done:])
        if not n:
            raise EOFError(f"the file ends at byte {offset + done}, {len(view) - done} bytes short")
        done += n


class _Files:
    """How a worker reaches the files: the descriptors opened for all workers where `os.preadv` reads at an offset
    (Linux, macOS, the BSDs), else unbuffered files of the worker's own, opened on first use (Windows has no
    positioned read in `os`, and one shared file position would mix the workers' reads up)."""

    def __init__(self, fds: dict[Path, int]) -> None:
        self.fds = fds
        self.own: dict[Path, io.RawIOBase] | None = None if hasattr(os, "preadv") else {}

    def __getitem__(self, path: Path) -> int | io.RawIOBase:
        if self.own is None:
            return self.fds[path]
        if path not in self.own:
            self.own[path] = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by `close`
        return self.own[path]

    def close(self) -> None:
        for file in (self.own or {}).values():
            file.close()


def _worker(tasks: queue.SimpleQueue, fds: dict[Path, int], device: torch.device, stop: threading.Event) -> None:
    """Read the pieces handed out on `tasks` (None ends) into their tensors through two buffers of this worker's,
    page-locked and copied from on a stream of its own on a GPU; once `stop` is set the pieces left are skipped.
    Every piece is reported done, with the error that stopped it if any, so the caller never waits forever."""
    on_gpu = device.type == "cuda"
    files = _Files(fds)
    try:
        if on_gpu:
            torch.cuda.set_device(device)
        stream = own_stream(device, threading.current_thread()) if on_gpu else None
        buffers = [torch.empty(PIECE_BYTES, dtype=torch.uint8, pin_memory=on_gpu) for _ in range(2)]
        views = [memoryview(b.numpy()) for b in buffers]
        free = [torch.cuda.Event(), torch.cuda.Event()] if on_gpu else None  # recorded after each buffer's last copy
        failed = None
    except Exception as exc:  # noqa: BLE001 - handed to the caller with each piece
        failed = exc
    turn = 0
    while (task := tasks.get()) is not None:
        tensor, start, n = task
        if failed is not None or tensor.error is not None or stop.is_set():  # lost, or no longer wanted
            tensor.piece_done(error=failed)
            continue
        turn ^= 1
        try:
            if free is not None:
                free[turn].synchronize()
            _read_into(files[tensor.extent.file], views[turn][:n], tensor.extent.offset + start)
            with torch.cuda.stream(stream):  # no stream: on the CPU
                tensor.data[start : start + n].copy_(buffers[turn][:n], non_blocking=on_gpu)
            copied = None
            if free is not None:
                free[turn].record(stream)
                copied = torch.cuda.Event()
                copied.record(stream)
        except Exception as exc:  # noqa: BLE001 - handed to the caller with the tensor
            tensor.piece_done(error=exc)
            continue
        tensor.piece_done(copied)
    files.close()
    if on_gpu and failed is None:
        stream.synchronize()


def read_extents(extents: list[Extent], device: torch.device, path: Path) -> Iterator[torch.Tensor]:
    """The tensors at `extents`, in order, on `device`, read by `READ_WORKERS` threads (see above). A read that fails
    raises `CheckpointError` naming the tensor and the file; the workers always finish before this returns."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    fds: dict[Path, int] = {}
    try:
        for file in {e.file for e in extents}:
            fds[file] = os.open(file, os.O_RDONLY | getattr(os, "O_BINARY", 0))  # Windows: not in text mode
    except OSError as exc:
        for fd in fds.values():
            os.close(fd)
        raise CheckpointError(f"cannot open {exc.filename} of {path}: {exc.strerror}") from exc
    tasks: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()
    workers = [
        threading.Thread(target=_worker, args=(tasks, fds, device, stop), name=f"iamflow-read-{i}", daemon=True)
        for i in range(max(1, min(READ_WORKERS, len(extents), os.cpu_count() or 1)))
    ]
    for worker in workers:
        worker.start()
    pending: list[_Tensor] = []
    ahead = 0
    try:
        for extent in extents:
            while pending and ahead + extent.nbytes > READ_AHEAD_BYTES:
                ahead -= pending[0].extent.nbytes
                yield pending.pop(0).result(path)
            tensor = _Tensor(extent, device)
            for start in range(0, max(1, extent.nbytes), PIECE_BYTES):
                tasks.put((tensor, start, min(PIECE_BYTES, extent.nbytes - start)))
            pending.append(tensor)
            ahead += extent.nbytes
        while pending:
            yield pending.pop(0).result(path)
    finally:
        stop.set()  # nothing is skipped when every tensor was handed out
        for _ in workers:
            tasks.put(None)
        for worker in workers:
            worker.join()
        for fd in fds.values():
            os.close(fd)


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
