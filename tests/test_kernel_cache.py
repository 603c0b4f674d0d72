"""Compiled kernels are kept in one folder between runs (`IAMFLOW_CACHE_DIR`, default the user's cache folder)."""

import contextlib
import logging
import os
import threading

import pytest
import torch

from iamflow_core.models import fused


@pytest.fixture
def clean_env(monkeypatch):
    import torch._dynamo

    for name in ("IAMFLOW_CACHE_DIR", "XDG_CACHE_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR",
                 "IAMFLOW_COMPILE", "IAMFLOW_SAVE_TRACES"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(fused, "_off", None)  # compiled kernels turned off by a test come back after it
    with torch._dynamo.config.patch(caching_precompile=False):  # what enable() turns on goes back
        yield monkeypatch
    fused.enable(False)


def test_compiling_points_both_kernel_caches_into_iamflow_cache_dir(clean_env, tmp_path):
    clean_env.setenv("IAMFLOW_CACHE_DIR", str(tmp_path / "kernels"))
    fused.enable(True)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "kernels" / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "kernels" / "triton")
    assert (tmp_path / "kernels").is_dir()


def test_the_default_is_the_users_cache_folder_and_a_users_own_setting_stands(clean_env, tmp_path):
    clean_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    clean_env.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert fused.use_cache_dir() == tmp_path / "xdg" / "iamflow"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "xdg" / "iamflow" / "triton")


def test_torchs_own_temp_default_is_replaced(clean_env, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    clean_env.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what TorchInductor writes once it compiled
    clean_env.setenv("IAMFLOW_CACHE_DIR", str(tmp_path / "kernels"))
    fused.use_cache_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "kernels" / "inductor")


def test_a_folder_that_cannot_be_written_is_a_warning_not_a_failure(clean_env, tmp_path, caplog):
    (tmp_path / "file").write_text("not a folder")
    clean_env.setenv("IAMFLOW_CACHE_DIR", str(tmp_path / "file" / "kernels"))
    with caplog.at_level(logging.WARNING, logger="iamflow_core.models.fused"):
        assert fused.use_cache_dir() is None
    assert "cannot be written" in caplog.text and "IAMFLOW_CACHE_DIR" in caplog.text
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ


def test_compile_off_touches_nothing(clean_env, tmp_path):
    clean_env.setenv("IAMFLOW_CACHE_DIR", str(tmp_path / "kernels"))
    clean_env.setenv("IAMFLOW_COMPILE", "0")
    fused.enable(True)
    assert not fused.enabled() and not (tmp_path / "kernels").exists()


def test_dynamo_traces_are_kept_for_our_compiles_only_unless_turned_off(clean_env, tmp_path):
    import torch._dynamo

    clean_env.setenv("IAMFLOW_CACHE_DIR", str(tmp_path / "kernels"))
    seen = []

    def compile_(fn, **options):  # what PyTorch's setting is while our function is compiled and then runs
        seen.append(("compile", torch._dynamo.config.caching_precompile, options["options"] is not None))
        return lambda x: seen.append(("call", torch._dynamo.config.caching_precompile)) or fn(x)

    clean_env.setattr(torch, "compile", compile_)
    clean_env.setattr(fused, "compiles", lambda x: True)  # a CPU tensor takes the compiled path here
    fused.enable(True)
    assert fused._traces_kept() and not torch._dynamo.config.caching_precompile  # other code compiles as before
    assert torch.equal(fused._fusable(lambda x: x * 2)(torch.ones(2)), torch.full((2,), 2.0))
    assert seen == [("compile", True, True), ("call", True)] and not torch._dynamo.config.caching_precompile
    clean_env.setenv("IAMFLOW_SAVE_TRACES", "0")
    fused.enable(True)
    seen.clear()
    fused._fusable(lambda x: x * 2)(torch.ones(2))
    assert not fused._traces_kept() and seen == [("compile", False, False), ("call", False)]


def test_traces_are_saved_when_new_ones_were_made_and_a_failure_is_only_logged(clean_env, tmp_path, caplog):
    from torch._dynamo.utils import counters

    clean_env.setenv("IAMFLOW_CACHE_DIR", str(tmp_path / "kernels"))
    saves = []
    clean_env.setattr(torch.compiler, "save_cache_artifacts", lambda: saves.append(1))
    fused.enable(True)
    traced = counters["stats"]["unique_graphs"]
    clean_env.setattr(fused, "_saved_graphs", traced)
    try:
        fused.save_traces()
        assert saves == []  # nothing new traced
        counters["stats"]["unique_graphs"] = traced + 1
        fused.save_traces()
        fused.save_traces()
        assert saves == [1]

        def fails():
            raise RuntimeError("disk full")

        clean_env.setattr(torch.compiler, "save_cache_artifacts", fails)
        counters["stats"]["unique_graphs"] = traced + 2
        with caplog.at_level(logging.WARNING, logger="iamflow_core.models.fused"):
            fused.save_traces()
        assert "not saved to the kernel cache (disk full)" in caplog.text
    finally:
        counters["stats"]["unique_graphs"] = traced


def test_a_kept_trace_that_fails_is_traced_again_and_the_kept_ones_cleared(clean_env, tmp_path, caplog):
    import torch._dynamo
    from torch._dynamo.package import DynamoCache

    clean_env.setenv("IAMFLOW_CACHE_DIR", str(tmp_path / "kernels"))
    fused.enable(True)
    kept = DynamoCache.path_prefix()
    os.makedirs(kept)
    made = []

    def compile_(fn, **options):
        made.append(options["options"])

        def broken(*args):
            raise AssertionError("")  # what a stale entry raised inside Dynamo

        return broken if len(made) == 1 else fn

    clean_env.setattr(torch, "compile", compile_)
    clean_env.setattr(fused, "compiles", lambda x: True)  # a CPU tensor takes the compiled path here
    add_one = fused._fusable(lambda x: x + 1)
    with caplog.at_level(logging.WARNING, logger="iamflow_core.models.fused"):
        assert torch.equal(add_one(torch.zeros(2)), torch.ones(2))
    assert "with a trace from the kernel cache failed (AssertionError" in caplog.text
    assert made[0] is not None and made[1] is None  # traced afresh, without keeping traces
    assert not fused._traces_kept() and not torch._dynamo.config.caching_precompile and not os.path.exists(kept)
    with pytest.raises(ValueError):  # with no kept trace to blame, a failure is the function's own
        fused._fusable(lambda x: (_ for _ in ()).throw(ValueError("own")))(torch.zeros(2))
    assert fused.enabled() and fused._off is None  # the call's own error leaves the compiler on


def test_a_compiler_that_cannot_build_turns_compiled_kernels_off_and_the_call_goes_on(clean_env, tmp_path, caplog):
    """A machine where TorchInductor cannot build (here for real: its C++ compiler missing, as Triton's launcher
    misses a C compiler on some machines): the call returns the plain function's values, compiled kernels go off for
    the process with one warning naming the error and the fix, and later calls and `enable` leave them off."""
    from torch._inductor import config as inductor_config

    clean_env.setenv("IAMFLOW_CACHE_DIR", str(tmp_path / "kernels"))
    clean_env.setenv("IAMFLOW_SAVE_TRACES", "0")
    clean_env.setattr(fused, "compiles", lambda x: fused.enabled())  # a CPU tensor takes the compiled path here
    fused.enable(True)

    @fused._fusable
    def times_three(x, y):
        return x * 3 + y

    x, y = torch.arange(4.0), torch.ones(4)
    no_compiler = {"cpp.cxx": (None, str(tmp_path / "no-such-g++"))}
    with inductor_config.patch(no_compiler), caplog.at_level(logging.WARNING, logger=fused.__name__):
        assert torch.equal(times_three(x, y), x * 3 + y)
        clean_env.setattr(torch, "compile", lambda *a, **k: pytest.fail("compiled after the compiler failed"))
        assert torch.equal(times_three(x, y), x * 3 + y)
        fused.enable(True)
    assert not fused.enabled() and fused._off.startswith("times_three did not compile")
    (record,) = caplog.records
    message = record.getMessage()
    assert "compiled kernels are off for this process" in message and "InvalidCxxCompiler" in message
    assert "plain PyTorch" in message and "pip install triton" in message and "IAMFLOW_COMPILE=0" in message


def test_a_compiled_call_refused_beside_another_threads_fx_trace_runs_plain_and_the_compiler_stays_on(
    clean_env, caplog
):
    """Dynamo refuses a compiled call while an FX trace is under way anywhere in the process (its flag is
    process-wide). That call runs as plain PyTorch, compiled kernels stay on, and once the trace ends calls run
    compiled again; before, the refusal turned compiled kernels off for the rest of the render."""
    import threading

    import torch.fx

    clean_env.setattr(fused, "use_cache_dir", lambda: None)  # no cache folder: no kept traces
    clean_env.setattr(fused, "compiles", lambda x: fused.enabled())
    compiled_runs: list[int] = []

    def eager_backend(gm, example_inputs):
        def run(*args):
            compiled_runs.append(1)
            return gm(*args)

        return run

    clean_env.setattr(fused, "_compile", lambda fn, dynamic: torch.compile(fn, backend=eager_backend, fullgraph=True))
    fused.enable(True)
    inside, release = threading.Event(), threading.Event()

    class Waits(torch.nn.Module):
        def forward(self, x):
            inside.set()
            release.wait(10)
            return x + 1

    tracer = threading.Thread(target=lambda: torch.fx.symbolic_trace(Waits()))
    tracer.start()
    assert inside.wait(10)
    add_two = fused._fusable(lambda x: x + 2)
    try:
        with caplog.at_level(logging.WARNING, logger=fused.__name__):
            assert torch.equal(add_two(torch.zeros(3)), torch.full((3,), 2.0))
    finally:
        release.set()
        tracer.join(10)
    assert compiled_runs == [] and fused.enabled() and fused._off is None
    assert "FX trace was under way in another thread" in caplog.text
    assert torch.equal(add_two(torch.ones(3)), torch.full((3,), 3.0)) and compiled_runs == [1]


def test_out_of_memory_in_a_compiled_call_stands_and_leaves_the_compiler_on(clean_env, monkeypatch):
    """Running out of GPU memory is not the compiler's fault: the error reaches the caller (the render reports it)
    and compiled kernels stay on; the plain function, which needs more memory, is not tried."""

    def compile_(fn, **options):
        def oom(*args):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        return oom

    monkeypatch.setattr(fused, "use_cache_dir", lambda: None)  # no cache folder: no kept traces to blame
    monkeypatch.setattr(torch, "compile", compile_)
    monkeypatch.setattr(fused, "compiles", lambda x: True)
    fused.enable(True)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        fused._fusable(lambda x: x + 1)(torch.zeros(2))
    assert fused.enabled() and fused._off is None


def test_without_triton_or_on_an_old_gpu_compiled_kernels_stay_off_with_one_warning(clean_env, tmp_path, caplog):
    """A CUDA machine where TorchInductor cannot compile at all (ComfyUI's portable Windows build ships no Triton;
    GPUs before compute capability 7.0): `enable` says so once, and the models run as plain PyTorch."""
    from types import SimpleNamespace

    from iamflow_core.models import kernels

    clean_env.setenv("IAMFLOW_CACHE_DIR", str(tmp_path / "kernels"))
    clean_env.setattr(torch.cuda, "is_available", lambda: True)
    clean_env.setattr(kernels, "triton", None)
    with caplog.at_level(logging.WARNING, logger=fused.__name__):
        fused.enable(True)
        fused.enable(True)
    assert not fused.enabled() and fused._off == "Triton is not installed"
    (record,) = caplog.records
    assert "Triton is not installed" in record.getMessage() and "triton-windows" in record.getMessage()
    assert not (tmp_path / "kernels").exists()  # nothing was set up for compiling

    caplog.clear()
    clean_env.setattr(fused, "_off", None)
    clean_env.setattr(kernels, "triton", SimpleNamespace())
    clean_env.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 1))
    clean_env.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce GTX 1080 Ti")
    with caplog.at_level(logging.WARNING, logger=fused.__name__):
        fused.enable(True)
    assert not fused.enabled() and "GTX 1080 Ti has compute capability 6.1" in caplog.text


def test_a_loader_can_say_why_a_gpu_will_run_without_compiled_kernels(clean_env):
    """What the DiT loader node shows before a render: why compiled kernels will not run on its GPU (no Triton, or
    turned off earlier in the process), nothing for a CPU, nor where the user turned them off."""
    from types import SimpleNamespace

    from iamflow_core.models import kernels

    gpu = torch.device("cuda", 0)
    clean_env.setattr(torch.cuda, "is_available", lambda: True)
    clean_env.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    clean_env.setattr(kernels, "triton", SimpleNamespace())
    assert fused.not_compiled_because(gpu) is None
    clean_env.setattr(kernels, "triton", None)
    assert fused.not_compiled_because(gpu) == "Triton is not installed"
    assert fused.not_compiled_because(torch.device("cpu")) is None
    clean_env.setenv("IAMFLOW_COMPILE", "0")
    assert fused.not_compiled_because(gpu) is None
    clean_env.delenv("IAMFLOW_COMPILE")
    clean_env.setattr(kernels, "triton", SimpleNamespace())
    clean_env.setattr(fused, "_off", "modulate did not compile or run compiled (InvalidCxxCompiler: ...)")
    assert fused.not_compiled_because(gpu).startswith("modulate did not compile")


def test_kept_traces_guard_their_arguments_not_the_modules_globals():
    from types import SimpleNamespace

    entries = [SimpleNamespace(is_global=False), SimpleNamespace(is_global=True)]
    assert fused._tensor_guards_only(entries) == [True, False]


def test_vae_conv_plans_are_timed_once_and_read_back_by_a_later_process(clean_env, tmp_path):
    import json

    import torch

    from iamflow_core.models import vae

    clean_env.setenv("IAMFLOW_CACHE_DIR", str(tmp_path / "kernels"))
    timed = []

    def time_plans(conv, x):
        timed.append(tuple(x.shape))
        return {"conv3d": 2.0, "taps": 1.0, "choice": "taps"}

    clean_env.setattr(vae, "_time_plans", time_plans)
    conv = vae.CausalConv3d(4, 4, 3, padding=1)
    x = torch.zeros(1, 4, 5, 8, 8)

    def new_process():
        clean_env.setattr(vae, "CONV_PLANS", {})
        clean_env.setattr(vae, "_saved_plans", None)

    new_process()
    assert vae._conv_plan(conv, x) == "taps" and len(timed) == 1
    saved = json.loads((tmp_path / "kernels" / vae.PLANS_FILE).read_text())
    assert list(saved.values()) == [{"conv3d": 2.0, "taps": 1.0, "choice": "taps"}]
    new_process()
    assert vae._conv_plan(conv, x) == "taps" and len(timed) == 1  # read from the file, not timed again
    assert vae._conv_plan(conv, torch.zeros(1, 4, 6, 8, 8)) == "taps" and len(timed) == 2  # a new shape is timed

    (tmp_path / "kernels" / vae.PLANS_FILE).write_text("{not json")  # a damaged file: timed again, then rewritten
    new_process()
    assert vae._conv_plan(conv, x) == "taps" and len(timed) == 3
    assert len(json.loads((tmp_path / "kernels" / vae.PLANS_FILE).read_text())) == 1


def test_eager_is_per_thread_and_nests():
    assert not fused.eager_now()
    seen = []
    with fused.eager():
        with fused.eager():
            seen.append(fused.eager_now())
        seen.append(fused.eager_now())
        other = threading.Thread(target=lambda: seen.append(fused.eager_now()))
        other.start()
        other.join()
    seen.append(fused.eager_now())
    assert seen == [True, True, False, False]


def test_eager_runs_a_fusable_function_without_compiling(monkeypatch):
    """With compiled kernels on, `eager()` calls the plain function: torch.compile is never reached."""

    class CudaLike(torch.Tensor):
        @property
        def is_cuda(self):
            return True

    monkeypatch.setattr(fused, "_enabled", True)
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("compiled inside eager()"))
    x = torch.randn(2, 8).as_subclass(CudaLike)
    with fused.eager():
        out = fused.residual(x, torch.ones(2, 8))
    assert torch.allclose(out, x + 1)


def test_compile_workers_are_released_in_the_background(monkeypatch):
    """A one-story process stops TorchInductor's worker pool once its kernels exist (no wait for it at exit); the
    pool is forgotten at once, shut down on a thread, and later compiles run in the process."""
    from torch._inductor import async_compile
    from torch._inductor import config as inductor_config

    stopped = threading.Event()

    class Pool:
        def shutdown(self) -> None:
            stopped.set()

    monkeypatch.setattr(inductor_config, "compile_threads", 8)
    monkeypatch.setattr(fused, "_enabled", False)
    assert fused.release_compile_workers() is None  # compiled kernels off: nothing to release
    monkeypatch.setattr(fused, "_enabled", True)
    assert fused.release_compile_workers() is None  # no pool started yet
    pool = Pool()
    async_compile._pool_set.add(pool)
    try:
        thread = fused.release_compile_workers()
        assert pool not in async_compile._pool_set and inductor_config.compile_threads == 1
        thread.join(timeout=10)
        assert stopped.is_set()
    finally:
        async_compile._pool_set.discard(pool)


def test_the_compiler_warms_up_on_a_thread_its_trace_under_the_launch_lock(clean_env, monkeypatch, caplog):
    """`warm_up` (called as models start loading) turns compiled kernels on, loads the compiler's parts that trace
    nothing without the launch lock, then runs one tiny fused function holding it, so no model thread runs beside
    its trace; a failure is a warning, nothing more. On a CPU, or with IAMFLOW_COMPILE=0, no thread starts."""
    assert fused.warm_up("cpu") is None
    clean_env.setenv("IAMFLOW_COMPILE", "0")
    assert fused.warm_up("cuda:0") is None  # never touches the GPU
    clean_env.delenv("IAMFLOW_COMPILE")

    seen = []

    def first_kernel(x):
        seen.append(("kernel", fused._launch_lock._is_owned(), fused.enabled(), x.shape))
        return x + 1

    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())  # a CPU stands in
    monkeypatch.setattr(fused, "_first_kernel", first_kernel)
    monkeypatch.setattr(fused, "_load_compiler_parts", lambda: seen.append(("parts", fused._launch_lock._is_owned())))
    monkeypatch.setattr(fused, "_kernels_cached", lambda: True)
    monkeypatch.setattr(fused, "_warmed", False)
    thread = threading.Thread(target=fused._warm_up, args=(torch.device("cpu"),))
    thread.start()
    thread.join(timeout=30)
    assert seen == [("parts", False), ("kernel", True, True, (8,))] and fused.warmed()
    assert fused._launch_lock.acquire(blocking=False)  # released
    fused._launch_lock.release()

    def broken(x):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(fused, "_first_kernel", broken)
    monkeypatch.setattr(fused, "_warmed", False)
    with caplog.at_level(logging.WARNING):
        fused._warm_up(torch.device("cpu"))
    assert not fused.warmed() and "warming the compiler up failed" in caplog.text


def test_with_an_empty_kernel_cache_the_warm_up_compiles_nothing(clean_env, monkeypatch, caplog):
    """A fresh cache: the tiny function would compile under the launch lock for a second or more while a story's
    first chunk waited; the warm-up loads the compiler's parts only and the second chunk compiles."""
    seen = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(fused, "_first_kernel", lambda x: seen.append("kernel"))
    monkeypatch.setattr(fused, "_load_compiler_parts", lambda: seen.append("parts"))
    monkeypatch.setattr(fused, "_kernels_cached", lambda: False)
    monkeypatch.setattr(fused, "_warmed", False)
    with caplog.at_level(logging.WARNING):
        fused._warm_up(torch.device("cpu"))
    assert seen == ["parts"] and not fused.warmed() and fused.enabled() and caplog.text == ""


def test_the_kernel_cache_counts_as_warm_once_it_holds_compiled_work(clean_env, tmp_path):
    cache = tmp_path / "inductor"
    clean_env.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    assert not fused._kernels_cached()  # no folder yet: a fresh machine
    (cache / "fxgraph").mkdir(parents=True)
    assert not fused._kernels_cached()  # folders, nothing in them
    (cache / "fxgraph" / "ab").mkdir()
    assert fused._kernels_cached()
    clean_env.delenv("TORCHINDUCTOR_CACHE_DIR")
    assert fused._kernels_cached()  # PyTorch's own folder: not looked into, loaded as before


def test_a_compiler_part_that_fails_is_left_to_the_first_compile(monkeypatch, caplog):
    ran = []

    def broken():
        raise ImportError("no triton here")

    parts = {"the broken part": broken, "the next part": lambda: ran.append("next")}
    monkeypatch.setattr(fused, "_COMPILER_PARTS", parts)
    with caplog.at_level(logging.DEBUG, logger=fused.__name__):
        fused._load_compiler_parts()
    assert ran == ["next"] and "compiler warm-up: the broken part not loaded ahead" in caplog.text


def test_a_benchmark_row_says_whether_compiled_kernels_were_in_effect(clean_env):
    """`bench speed` rows carry it, so a number made without compiled kernels is never read as one made with them."""
    clean_env.setattr(fused, "_enabled", True)
    assert fused.in_effect() == "on"
    clean_env.setattr(fused, "_enabled", False)
    assert fused.in_effect() == "off"
    clean_env.setenv("IAMFLOW_COMPILE", "0")
    assert fused.in_effect() == "off: IAMFLOW_COMPILE=0"
    fused.turn_off("Triton is not installed")
    assert fused.in_effect() == "off: Triton is not installed"
