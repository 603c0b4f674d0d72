"""Elementwise glue of the DiT and VAE as small pure functions, fused by `torch.compile` on CUDA.

In eager PyTorch each of these is several kernels over large activations (float32 norms, modulation, casts, RoPE),
which cost more than the attention itself at Wan's streaming shapes. Compiled, each becomes one kernel. On CPU, or
with `enable(False)` / `IAMFLOW_COMPILE=0`, the same functions run eagerly: identical math.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import wraps
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels

logger = logging.getLogger(__name__)
_enabled = False
# torch.compile traces by patching nn.Module.__call__ for the whole process, so no other thread may run modules
# while it compiles. Threads that run models (the DiT loop, the VAE decode worker) launch their kernels under this
# lock when compiled kernels are on; the GPU work itself still overlaps, only the host-side launching is serialised.
_launch_lock = threading.RLock()
# Per thread: run the fusable functions as plain PyTorch for now (`eager`).
_local = threading.local()


def cache_dir() -> Path:
    """Where compiled kernels are kept between runs: `IAMFLOW_CACHE_DIR`, else the user's cache folder
    (`$XDG_CACHE_HOME/iamflow`, `~/.cache/iamflow`)."""
    given = os.environ.get("IAMFLOW_CACHE_DIR")
    if given:
        return Path(given).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "iamflow"


def use_cache_dir() -> Path | None:
    """Point TorchInductor's and Triton's on-disk caches into `cache_dir()` (unless the user set their own), so a
    second process, or the same machine after a reboot or a new container with that folder kept, loads the
    kernels instead of compiling them. Returns the folder, or None when it cannot be written (the defaults stay)."""
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        logger.warning("kernel cache folder %s cannot be written (%s); set IAMFLOW_CACHE_DIR to one that can", folder,
                       e)  # fmt: skip
        return None
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # TorchInductor writes its temp-folder default into the environment once it has compiled: that one is not the
    # user's choice and is replaced.
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, os.path.abspath(default_cache_dir())):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")
    os.environ.setdefault("TRITON_CACHE_DIR", str(folder / "triton"))
    return folder


def _compile_allowed() -> bool:
    """Compiled kernels are allowed unless IAMFLOW_COMPILE=0."""
    return os.environ.get("IAMFLOW_COMPILE", "1") != "0"


def enable(flag: bool = True) -> None:
    """Turn compiled kernels on (for CUDA tensors). The first calls of each shape compile (seconds), or load them
    from the kernel cache folder (`use_cache_dir`), together with Dynamo's traces of them (`save_traces`). They stay
    off, with one warning, where they cannot work (`turn_off`): no Triton, a GPU older than it supports, or a
    compile that failed earlier in this process."""
    global _enabled, _keep_traces
    _enabled = flag and _compile_allowed() and _off is None
    missing = _enabled and _triton_missing()
    if missing:
        turn_off(missing)
    if _enabled:
        import torch._dynamo

        folder = use_cache_dir()
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        # Traces go to the kernel cache unless IAMFLOW_SAVE_TRACES=0, where this torch has PyTorch's (experimental)
        # caching precompile.
        _keep_traces = (
            folder is not None and os.environ.get("IAMFLOW_SAVE_TRACES", "1") != "0"
            and hasattr(torch._dynamo.config, "caching_precompile")
        )  # fmt: skip


def _triton_missing(device: torch.device | None = None) -> str | None:
    """Why TorchInductor cannot compile for `device` (default: the current GPU), where that shows before a compile:
    no Triton, or a GPU older than Triton supports. None otherwise (a missing C compiler shows at the first
    compile), and without CUDA (CPU tensors never take the compiled path)."""
    if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        return None
    if kernels.triton is None:
        return "Triton is not installed"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 7:
        name = torch.cuda.get_device_name(device)
        return f"{name} has compute capability {major}.{minor}, older than Triton supports"
    return None


def not_compiled_because(device: torch.device) -> str | None:
    """Why the models on `device` will run without compiled kernels, for a user to see (a loader node's status):
    they were turned off in this process (`turn_off`), or cannot work there (`_triton_missing`); None when they
    will be used, or were turned off on purpose (`IAMFLOW_COMPILE=0`), and off the GPU (never compiled there)."""
    if not _compile_allowed() or device.type != "cuda":
        return None
    return _off or _triton_missing(device)


# Whether this module's compiled functions keep their Dynamo traces in the kernel cache (`enable`, `_keeping_traces`).
_keep_traces = False


def _traces_kept() -> bool:
    return _enabled and _keep_traces


@contextmanager
def _keeping_traces() -> Iterator[None]:
    """PyTorch's caching precompile on for this module's own compiles, loads and saves only. It is a process-wide
    setting that also drops guards on object identity from whatever compiles meanwhile, so in a shared process
    (ComfyUI, other nodes compiling their models) it stays off otherwise: on while any of our threads is inside,
    back to what it was after the last one leaves."""
    global _keeping, _keeping_before
    if not _traces_kept():
        yield
        return
    import torch._dynamo

    config = torch._dynamo.config
    with _keeping_lock:  # on while any of our threads is inside; the value before comes back after the last
        if _keeping == 0:
            _keeping_before, config.caching_precompile = config.caching_precompile, True
        _keeping += 1
    try:
        yield
    finally:
        with _keeping_lock:
            _keeping -= 1
            if _keeping == 0:
                config.caching_precompile = _keeping_before


_keeping_lock = threading.Lock()
_keeping = 0  # threads inside `_keeping_traces`
_keeping_before = False  # caching_precompile as it was before the first of them entered


def _tensor_guards_only(entries) -> list[bool]:  # noqa: ANN001 - torch's GuardFilterEntry list
    """Keep a trace's guards on its arguments, drop those on globals (`F`, `torch`, the helpers below): they never
    change in this module, and a trace kept on disk cannot carry them (PyTorch would drop each with a warning)."""
    return [not getattr(entry, "is_global", False) for entry in entries]


_saved_graphs = 0  # Dynamo graphs this process had traced when it last saved them (`save_traces`)


def save_traces() -> None:
    """Write the Dynamo traces this process made since the last call into the kernel cache folder, so the next
    process loads them instead of tracing the fused functions again: with warm caches, a story's second chunk waited
    about 5 s for tracing, ~1 s for loading (H200). Cheap when nothing new was traced; the pipeline calls it once
    a story's second chunk is out and when the story ends. A failure is logged and changes nothing else."""
    global _saved_graphs
    if not _traces_kept():
        return
    from torch._dynamo.utils import counters

    traced = counters["stats"]["unique_graphs"]
    if traced == _saved_graphs:
        return
    _saved_graphs = traced
    try:
        with _launch_lock, _keeping_traces():
            torch.compiler.save_cache_artifacts()
    except Exception as e:  # noqa: BLE001 - an experimental PyTorch feature: the next process traces again
        logger.warning("Dynamo traces not saved to the kernel cache (%s); the next run traces them again", e)


def enabled() -> bool:
    return _enabled


@contextmanager
def eager() -> Iterator[None]:
    """In this thread, run the fusable functions as plain PyTorch (the same math, other rounding) and let no CUDA
    graph be captured. For work done once or with shapes of its own (a story's first chunk, its text encoding,
    reference pictures, the recache at a prompt switch), whose kernels would cost a compile or a cache load before
    they run once: the pipeline makes its first chunk so, and a user sees frames before any kernel is compiled."""
    before = getattr(_local, "eager", False)
    _local.eager = True
    try:
        yield
    finally:
        _local.eager = before


def eager_now() -> bool:
    """Whether this thread is inside `eager()`."""
    return getattr(_local, "eager", False)


def compiles(x: torch.Tensor) -> bool:
    """Whether a fusable function called on `x` here runs a compiled kernel (else it runs as plain PyTorch)."""
    return _enabled and x.is_cuda and not eager_now()


def release_compile_workers() -> threading.Thread | None:
    """Stop TorchInductor's compile worker processes once a one-story process has its kernels (compiled or loaded
    from the cache): a thread shuts them down while the story renders, instead of the process waiting for them at
    exit (~0.7 s measured on an H200 host). Compiles after this run in this process. Returns the thread, or None
    when no pool runs (or this torch keeps it elsewhere)."""
    if not _enabled:
        return None
    try:
        from torch._inductor import async_compile
        from torch._inductor import config as inductor_config

        with _launch_lock:  # models launch (and compile) under this lock: no compile is in flight now
            pools = list(async_compile._pool_set)
            if not pools:
                return None
            inductor_config.compile_threads = 1
            async_compile.after_fork()  # forget the pools without waiting for them
    except (ImportError, AttributeError):  # a torch whose internals moved: the pool stays until exit
        logger.debug("compile workers not released", exc_info=True)
        return None

    def shutdown() -> None:
        for pool in pools:
            pool.shutdown()

    thread = threading.Thread(target=shutdown, name="iamflow-compile-workers")
    thread.start()
    return thread


def launch_guard() -> AbstractContextManager:
    """Hold while launching model work from a thread when compiled kernels are on (see `_launch_lock`)."""
    return _launch_lock if _enabled else nullcontext()


@contextmanager
def launch_turn() -> Iterator[None]:
    """`launch_guard` for one step of a long run of launches (a layer of a decode): held for the step, then this
    thread gives way, so a thread waiting to launch goes next instead of after the whole run."""
    with launch_guard():
        yield
    if _enabled:
        time.sleep(0)  # lets the OS run a thread the release woke before this one takes the lock again


def _fusable(fn: Callable | None = None, *, dynamic: bool | None = False) -> Callable:
    """Compile `fn` on first use with CUDA tensors. dynamic=False (most functions: the steady chunks repeat their
    shapes) compiles one kernel set per shape: with warm caches a static graph is traced in about half the time of a
    symbolic one, and its kernels are specialised. dynamic=None lets Dynamo go symbolic once shapes vary (functions
    called on varying numbers of frames).

    A compiled call that fails is told apart: out of memory, or inside a CUDA-graph capture, it stands; refused
    because an FX trace was under way in the process, that call runs as plain PyTorch (`_beside_a_trace`); with a
    kept trace, the function is traced afresh; otherwise the plain function runs on the same arguments, and if that
    succeeds the compiler is what failed (no C compiler, a Triton that cannot build a kernel), so compiled kernels
    go off for the process (`turn_off`) and the render goes on; if it fails too, its error is the call's own."""
    if fn is None:
        return lambda f: _fusable(f, dynamic=dynamic)
    compiled: list[Callable] = []

    @wraps(fn)
    def run(x: torch.Tensor, *args, **kwargs):
        if not compiles(x):
            return fn(x, *args, **kwargs)
        if not compiled:
            compiled.append(_compile(fn, dynamic))
        try:
            with _keeping_traces():
                return compiled[0](x, *args, **kwargs)
        except Exception as error:  # noqa: BLE001 - a kept trace, the compiler or the call itself: told apart below
            if kernels.error_stands(error):
                raise
            if _beside_a_trace(error):
                return fn(x, *args, **kwargs)
            if _traces_kept():  # a kept trace may be the cause: trace afresh, without keeping traces
                _drop_kept_traces(fn, error)
                compiled[0] = _compile(fn, dynamic)
                return run(x, *args, **kwargs)
            result = fn(x, *args, **kwargs)  # an error here is the call's own (its inputs): raised as it is
            turn_off(f"{fn.__name__} did not compile or run compiled ({kernels.first_line(error)})")
            return result

    return run


_beside_trace_noted = False


def _beside_a_trace(error: Exception) -> bool:
    """Whether Dynamo refused a compiled call because an FX trace was under way somewhere in the process. The flag it
    reads is process-wide, so a trace in another thread (a compile outside the launch lock: another node pack's, or
    a model run by a thread of ours that does not take the lock) refuses our calls until it ends. Seen in the first
    renders of three of four fresh 2x H200 machines (iamflow, empty kernel cache), where it used to turn compiled
    kernels off for the rest of the render (31.5 FPS against 42). Not the compiler's fault: the call runs as plain
    PyTorch, the next one compiled again; noted once a process."""
    global _beside_trace_noted
    if "symbolically trace a dynamo-optimized function" not in str(error):
        return False
    if not _beside_trace_noted:
        _beside_trace_noted = True
        logger.warning("a compiled kernel ran as plain PyTorch once: an FX trace was under way in another thread "
                       "(%s); the next calls run compiled again", kernels.first_line(error))  # fmt: skip
    return True


_off: str | None = None  # why compiled kernels are off for the rest of this process (`turn_off`)


def turn_off(why: str) -> None:
    """Compiled kernels off for the rest of the process, with one warning naming `why` and what they need: the
    fused functions run as plain PyTorch (the same math, slower). For a machine where they cannot work (no Triton,
    an old GPU, no C compiler): a render goes on instead of failing at its second chunk."""
    global _enabled, _off
    if _off is None:
        logger.warning("compiled kernels are off for this process: %s. The DiT and VAE run their fused steps as "
                       "plain PyTorch (the same math, slower). TorchInductor needs %s; IAMFLOW_COMPILE=0 skips "
                       "compiling without this warning", why, kernels.NEEDS)  # fmt: skip
        _off = why
    _enabled = False


def in_effect() -> str:
    """Whether compiled kernels are in effect now, in words for a benchmark's row: "on", or "off: " and why."""
    if _enabled:
        return "on"
    if _off is not None:
        return f"off: {_off}"
    return "off: IAMFLOW_COMPILE=0" if not _compile_allowed() else "off"


def _compile(fn: Callable, dynamic: bool | None) -> Callable:
    options = {"guard_filter_fn": _tensor_guards_only} if _traces_kept() else None
    with _keeping_traces():  # the compiled function gets the package its traces are kept in
        return torch.compile(fn, fullgraph=True, dynamic=dynamic, options=options)


def _drop_kept_traces(fn: Callable, error: Exception) -> None:
    """A kept trace failed to load or run (PyTorch's caching precompile is experimental: one stale entry failed
    inside Dynamo on an H200): this process traces afresh, and the kept traces go, so the next one saves new ones."""
    import shutil

    global _keep_traces
    logger.warning("compiling %s with a trace from the kernel cache failed (%s); tracing it again and clearing the "
                   "kept traces", fn.__name__, kernels.first_line(error))  # fmt: skip
    _keep_traces = False
    try:
        from torch._dynamo.package import DynamoCache

        shutil.rmtree(DynamoCache.path_prefix(), ignore_errors=True)
    except (ImportError, AttributeError):  # a torch whose internals moved: the entries stay
        logger.debug("kept traces not cleared", exc_info=True)


def warm_up(device: torch.device | str) -> threading.Thread | None:
    """Turn compiled kernels on and load the compiler's one-time parts on a thread, for a caller that is about to
    load models onto `device` (a GPU) and render with them. The first compiled function a process calls pays for
    importing TorchInductor and Triton and hashing their sources before its own kernels load: 1.6 s of a warm
    story's 3.8-s wait for its second chunk (H200 host, in-process profile), while the models' loading leaves the
    interpreter idle for seconds (tensor copies run without the GIL).

    The thread first loads what traces nothing (`_load_compiler_parts`), without the launch lock. Then, where the
    kernel cache already holds compiled kernels, it loads one tiny fused function from that cache under the launch
    lock (tracing patches `nn.Module.__call__` for the whole process, so no model thread may run meanwhile).
    With an empty cache that function would compile for a second or more while a story's first chunk, run eagerly,
    waited for the lock (1.2 s in a profile of a fresh-cache run on an H200): there the story's second chunk compiles
    it with its own kernels. Returns the thread (a daemon; a failure is logged and the second chunk pays as before),
    or None on a CPU or with `IAMFLOW_COMPILE=0`."""
    device = torch.device(device)
    if device.type != "cuda" or not _compile_allowed():
        return None
    thread = threading.Thread(target=_warm_up, args=(device,), name="iamflow-warm-compiler", daemon=True)
    thread.start()
    return thread


def _warm_up(device: torch.device) -> None:
    global _warmed
    try:
        enable()
        if not _enabled:  # turned off where it cannot work (`turn_off`): nothing to load
            return
        with torch.cuda.device(device):
            _load_compiler_parts()
            if not _kernels_cached():
                return
            with _launch_lock:
                _first_kernel(torch.zeros(8, device=device))
        _warmed = True
    except Exception:  # noqa: BLE001 - only a head start: the real functions compile (and report) as they would
        logger.warning("warming the compiler up failed; the second chunk loads it", exc_info=True)


# Modules a first compile imports (Dynamo's tracer, AOTAutograd, TorchInductor's lowering and code cache, Triton's
# compiler), imported ahead by `_load_compiler_parts`.
_COMPILER_MODULES = (
    "torch._dynamo.convert_frame", "torch._dynamo.symbolic_convert", "torch._functorch.aot_autograd",
    "torch._inductor.compile_fx", "torch._inductor.lowering", "torch._inductor.codecache",
    "torch._inductor.select_algorithm", "triton.compiler.compiler",
)  # fmt: skip


def _import_compiler_modules() -> None:
    import importlib

    for name in _COMPILER_MODULES:
        importlib.import_module(name)


def _hash_sources() -> None:
    from torch._inductor.codecache import CacheBase, torch_key

    CacheBase.get_system()  # holds Triton's key: a hash of its sources and libraries (0.5 s)
    torch_key()


def _build_triton_helpers() -> None:
    from triton.runtime import driver

    driver.active.utils  # noqa: B018 - built (or loaded from Triton's cache) on first access


def _start_compile_workers() -> None:
    from torch._inductor.async_compile import AsyncCompile

    AsyncCompile.warm_pool()


# What `_load_compiler_parts` does, in order.
_COMPILER_PARTS = {
    "the compiler's modules": _import_compiler_modules,
    "the source hashes": _hash_sources,
    "Triton's CUDA helpers": _build_triton_helpers,
    "the compile workers": _start_compile_workers,
}


def _load_compiler_parts() -> None:
    """What a first compile loads that traces nothing, so no lock is needed: the compiler's modules, the hashes of
    torch's and Triton's sources that key the kernel cache, Triton's CUDA helpers (built with the host's C compiler
    on a fresh machine) and TorchInductor's compile workers. Each step is a head start only (they reach into
    PyTorch's and Triton's internals): one that fails is logged and left to the first compile."""
    for what, step in _COMPILER_PARTS.items():
        try:
            step()
        except Exception:  # noqa: BLE001 - the first compile loads it instead
            logger.debug("compiler warm-up: %s not loaded ahead", what, exc_info=True)


def _kernels_cached() -> bool:
    """Whether TorchInductor's cache folder already holds compiled work (a process has compiled with it before)."""
    folder = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not folder:
        return True  # PyTorch's own default folder: no way to tell cheaply, so load as before
    try:
        return any(entry.is_dir() and any(entry.iterdir()) for entry in Path(folder).iterdir())
    except OSError:
        return False


_warmed = False  # `warm_up` has compiled (or loaded) its kernel in this process


def warmed() -> bool:
    """Whether a `warm_up` thread has finished its kernel in this process."""
    return _warmed


@_fusable
def _first_kernel(x: torch.Tensor) -> torch.Tensor:
    """The smallest fused function (`warm_up`): compiling or loading it loads what every compiled function needs."""
    return x + 1


# --- DiT -------------------------------------------------------------------------------------------------------
@_fusable
def modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, frames: int, eps: float, dtype: torch.dtype
) -> torch.Tensor:
    """LayerNorm (no affine) of x: [B, L, dim] in float32, then per-frame (1 + scale) * h + shift, cast to dtype.
    shift, scale: [B, F, 1, dim] float32."""
    h = F.layer_norm(x.float(), x.shape[-1:], eps=eps).unflatten(1, (frames, -1))
    return (h * (1 + scale) + shift).flatten(1, 2).to(dtype)


@_fusable
def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, frames: int) -> torch.Tensor:
    """x + gate * y per frame, in float32. x: [B, L, dim] float32, y: [B, L, dim], gate: [B, F, 1, dim]."""
    return x + (y.float().unflatten(1, (frames, -1)) * gate).flatten(1, 2)


@_fusable
def residual(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x + y.float()


@_fusable
def affine_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, dtype: torch.dtype
) -> torch.Tensor:
    """Affine LayerNorm in float32, cast to dtype."""
    return F.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps).to(dtype)


@_fusable
def gated_residual_norm(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, frames: int, weight: torch.Tensor, bias: torch.Tensor,
    eps: float, dtype: torch.dtype, fp8: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """`gated_residual` and the `affine_norm` of its sum in one compiled function (one pass over the rows). Returns
    (x + gate * y in float32, its norm in dtype, or as FP8 rows (x_fp8, scale) when fp8)."""
    x = gated_residual.__wrapped__(x, y, gate, frames)
    h = affine_norm.__wrapped__(x, weight, bias, eps, torch.float32 if fp8 else dtype)
    return x, rows_fp8(h) if fp8 else h


@_fusable
def residual_modulate(
    x: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, frames: int, eps: float,
    dtype: torch.dtype, fp8: bool = False, gate: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """`residual` (or with `gate`, `gated_residual`: a block's FFN output joining the next block's first norm) and
    the `modulate` of its sum in one compiled function (one pass over the rows). Returns (the sum in float32, the
    modulated norm in dtype, or as FP8 rows (x_fp8, scale) when fp8)."""
    x = residual.__wrapped__(x, y) if gate is None else gated_residual.__wrapped__(x, y, gate, frames)
    h = modulate.__wrapped__(x, shift, scale, frames, eps, torch.float32 if fp8 else dtype)
    return x, rows_fp8(h) if fp8 else h


def _plain_linear(x: torch.Tensor | object, linear: nn.Module) -> bool:
    """Whether `linear` is a plain `nn.Linear` with a bias and x a tensor of its weight's dtype: one the fused GEMM
    calls below may run themselves (not an FP8 linear, nor its `Rows`)."""
    return (
        type(linear) is nn.Linear and isinstance(x, torch.Tensor) and linear.bias is not None
        and x.dtype == linear.weight.dtype
    )  # fmt: skip


def linear_gelu(x: torch.Tensor | object, linear: nn.Module, gelu: nn.GELU) -> torch.Tensor:
    """`gelu(linear(x))`. On a GPU, for a plain 16-bit linear and the tanh GELU (Wan's FFN), one cuBLASLt GEMM with
    the GELU in its epilogue, applied to the float32 accumulator before rounding: it saves a pass over the 8960-wide
    FFN activations (H200, 4680 rows: 188 against 225 us with the separate kernel) and rounds once instead of twice.
    Elsewhere (the CPU's fused op computes the exact GELU; FP8 linears and their `Rows`) the two steps."""
    if (
        _plain_linear(x, linear) and gelu.approximate == "tanh" and x.is_cuda
        and x.dtype in (torch.bfloat16, torch.float16)
    ):  # fmt: skip
        return torch._addmm_activation(linear.bias, x.flatten(0, -2), linear.weight.t(), use_gelu=True).unflatten(
            0, x.shape[:-1]
        )
    return gelu(linear(x))


@_fusable
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in float32 (Wan's WanRMSNorm), result in x.dtype times weight."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


class RMSNorm(nn.Module):
    """RMS norm over the last dim with a weight, statistics in float32 (Wan's WanRMSNorm, T5's layer norm): the
    input is taken in the weight's dtype, the result comes out in it."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x.to(self.weight.dtype), self.weight, self.eps)


def rms_norm_rope(
    x: torch.Tensor, weight: torch.Tensor, eps: float, heads: int, cos: torch.Tensor, sin: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """RMSNorm over the full dim, split into heads, rotate. x: [B, L, dim] -> [B, L, H, D]; cos, sin: [L, D/2].
    With `out` (the KV cache's query slot for the keys) the result is written there and returned: on a GPU by the
    kernel that computes it (`kernels.rms_norm_rope`, hand-written: TorchInductor's took three times the memory
    time), elsewhere, inside `eager()` and once that kernel failed to build (`kernels.launched`) by a copy after
    plain PyTorch."""
    if compiles(x) and kernels.available(x) and weight.dtype == x.dtype:
        done = kernels.rms_norm_rope(x, weight, eps, heads, cos, sin, out)
        if done is not None:
            return done
    h = apply_rope.__wrapped__(rms_norm.__wrapped__(x, weight, eps).unflatten(-1, (heads, -1)), cos, sin)
    return h if out is None else out.copy_(h)


def linear_into(x: torch.Tensor | object, linear: nn.Module, out: torch.Tensor) -> bool:
    """`linear(x)` written into `out` [..., N] by the GEMM itself (cuBLAS with its bias epilogue, as `F.linear`
    runs it) instead of a fresh tensor and a copy after it: for a plain linear, x a tensor of its dtype, both
    contiguous, without autograd. Returns whether it was written (False: nothing was done; FP8 linears and their
    `Rows` among others)."""
    if not (
        _plain_linear(x, linear) and not torch.is_grad_enabled() and out.dtype == x.dtype and x.is_contiguous()
        and out.is_contiguous() and not linear._forward_hooks and not linear._forward_pre_hooks
    ):  # fmt: skip
        return False
    torch.addmm(linear.bias, x.view(-1, x.shape[-1]), linear.weight.t(), out=out.view(-1, out.shape[-1]))
    return True


@_fusable(dynamic=None)  # stored keys of any number of frames (the cache's moves, the memory's recalls)
def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x: [..., L, H, D] by cos/sin: [L, D/2] (float32), pairs (2i, 2i+1). Float32 math, x.dtype result."""
    # (even, odd) * cos + (-odd, even) * sin: the same numbers as writing out both products per half, and at the
    # DiT's q/k shapes (4680 x 12 x 128) the fused norm-and-rotate kernel ran 21.2 instead of 26.3 us (H200).
    pairs = x.float().unflatten(-1, (-1, 2))
    swapped = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1)
    cos, sin = cos[:, None, :, None], sin[:, None, :, None]
    return (pairs * cos + swapped * sin).flatten(-2).to(x.dtype)


# --- FP8 inputs of the DiT's linears ------------------------------------------------------------------------------
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0
_MIN_AMAX = 1e-12  # keeps all-zero rows from dividing by zero


def rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of x [..., K] to e4m3 with the scale amax / 448, in float32 math (plain PyTorch; the fused
    functions below end in it). Returns (x_fp8 [..., K], scale [..., 1] float32), x ≈ x_fp8 * scale."""
    x32 = x.float()
    scale = x32.abs().amax(dim=-1, keepdim=True).clamp(min=_MIN_AMAX) / FP8_MAX
    return (x32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


@_fusable
def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`rows_fp8` as one kernel: the input of an FP8 linear whose producer does not quantize (attention outputs)."""
    return rows_fp8(x)


@_fusable
def modulate_fp8(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, frames: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`modulate` whose result goes straight to FP8 rows (x_fp8, scale) for the FP8 linears it feeds."""
    return rows_fp8(modulate.__wrapped__(x, shift, scale, frames, eps, torch.float32))


@_fusable
def heads_fp8(x: torch.Tensor, centre: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, L, H, D] to e4m3 with one scale per batch row and head, amax / 448 over the head's tokens and channels
    (the scales FA3's FP8 kernel takes). centre=True first subtracts the head's mean over the tokens, for keys: every
    score of a query then moves by the same q·mean, so softmax is unchanged, and an offset the keys share no longer
    takes the FP8 range (SageAttention's smoothing of K). Returns (x_fp8 [B, L, H, D], scale [B, H] float32)."""
    x32 = x.float()
    if centre:
        x32 = x32 - x32.mean(dim=1, keepdim=True)
    scale = x32.abs().amax(dim=(1, 3)).clamp(min=_MIN_AMAX) / FP8_MAX
    return (x32 / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def rms_norm_bound(norm_weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The largest |element| per head [H] of a tensor made by an RMSNorm over all H*D channels with weight
    `norm_weight`, then rotated in pairs (RoPE), as the DiT's q and k are: the normalised channels' squares sum to at
    most H*D, so a rotated pair is at most sqrt(H*D) long, times the largest |weight| of its head. Keys blended
    (the sink's EMA) or moved in time stay within it too."""
    return norm_weight.float().abs().view(heads, -1).amax(dim=1).clamp(min=_MIN_AMAX) * norm_weight.numel() ** 0.5


@_fusable
def heads_fp8_bounded(x: torch.Tensor, norm_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`heads_fp8` for x [B, L, H, D] from `rms_norm_bound`'s RMSNorm + RoPE: each head's scale is its bound / 448,
    known from the weights, so no pass measures x first (one pass instead of two, or three with the keys centred).
    E4M3 keeps its 3 mantissa bits from 2^-6 to 448, so values ~40x below the bound lose no precision to the wider
    scale: a 10-chunk stream of the full-size DiT stayed within 0.23-0.57 % of bf16, as with scales measured per
    forward (H200). Returns (x_fp8 [B, L, H, D], scale [B, H] float32)."""
    scale = (rms_norm_bound(norm_weight, x.shape[2]) / FP8_MAX).expand(x.shape[0], -1).contiguous()
    return (x.float() / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


# --- VAE -------------------------------------------------------------------------------------------------------
@_fusable
def channel_rms(x: torch.Tensor, gamma: torch.Tensor, scale: float) -> torch.Tensor:
    """F.normalize over channels (dim 1) in float32, times sqrt(C) * gamma, in x.dtype."""
    return F.normalize(x.float(), dim=1).type_as(x) * scale * gamma


@_fusable
def tap_sum(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """a + b + c + bias per channel (dim 1) (+ residual), summed in float32: the three time taps of a conv computed
    as 2D convs, and a residual block's shortcut. One pass over the outputs, which at the decoder's full resolution
    are about a GB each."""
    return bias_add.__wrapped__(a.float() + b.float() + c.float(), bias, residual).to(a.dtype)


@_fusable
def bias_add(y: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """y + bias per channel (dim 1) (+ residual), in float32, one pass: a conv run without its bias, whose bias
    PyTorch would add in a pass of its own after cuDNN, and a residual add in another."""
    out = y.float() + bias.float().view(1, -1, *(1,) * (y.ndim - 2))
    return (out if residual is None else out + residual.float()).to(y.dtype)


@_fusable
def channel_rms_silu(
    x: torch.Tensor, gamma: torch.Tensor, scale: float, past: torch.Tensor | None = None
) -> torch.Tensor:
    """SiLU of `channel_rms`; with `past` ([B, C, P, H, W], a causal conv's cached input frames), those frames come
    first along time (dim 2), written in the same pass instead of a concatenation afterwards."""
    h = F.silu(channel_rms.__wrapped__(x, gamma, scale))
    return h if past is None else torch.cat([past, h], dim=2)


@_fusable
def phase_interleave(y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The output of a 2x nearest upsampling and a 3x3 conv, from the conv's four phase kernels run on the small
    frames (`vae.Resample`). y: [N, 4 * O, H + 1, W + 1], phase (a, b) in channel block 2a + b -> [N, O, 2H, 2W];
    output pixel (2i + a, 2j + b) is phase (a, b) at (i + a, j + b), plus the bias. Built in channels-last order
    (the layout of the convs around it) in one pass."""
    n, o4, h1, w1 = y.shape
    o, h, w = o4 // 4, h1 - 1, w1 - 1
    phases = y.permute(0, 2, 3, 1).unflatten(3, (2, 2, o))  # [N, H + 1, W + 1, a, b, O]
    rows = [torch.stack([phases[:, a : a + h, b : b + w, a, b] for b in (0, 1)], dim=3) for a in (0, 1)]
    out = torch.stack(rows, dim=2).reshape(n, 2 * h, 2 * w, o)  # [N, H, a, W, b, O] -> [N, 2H, 2W, O]
    return (out.float() + bias.float()).to(y.dtype).permute(0, 3, 1, 2)
