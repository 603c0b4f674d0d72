"""Decoding in turn on a GPU queues the decode and reads the frames back a chunk later: same frames, and a memory
policy that needs a chunk's frames early still gets them at once."""

import logging

import numpy as np
import pytest

from iamflow_core.decode import QueuedDecode
from iamflow_core.pipeline import StreamingPipeline
from iamflow_core.presets import DEFAULT_STORY, tiny_models
from iamflow_core.settings import MemorySettings, build_memory, sampler_config
from tests.test_memory import RETURN_REGISTRY, RETURN_STORY, _RecordingVerifier

pytestmark = pytest.mark.gpu


def test_queued_decode_gives_the_frames_of_the_overlapped_decode():
    dit, text_encoder, vae = tiny_models(device="cuda")
    config = sampler_config(MemorySettings(mode="none"), height=64, width=96)
    runs = []
    for overlap in (True, False):
        pipe = StreamingPipeline(dit, text_encoder, vae, overlap_decode=overlap, compile_kernels=False)
        runs.append([e.frames for e in pipe.run(DEFAULT_STORY, config)])
    assert len(runs[0]) == len(runs[1]) > 4
    for a, b in zip(*runs):
        assert np.array_equal(a, b)


def test_queued_decode_hands_frames_to_the_verifier_when_a_switch_needs_them(caplog, monkeypatch):
    """At a prompt switch the identity memory decides on the chunk just made: it must not wait for the frames the
    loop would read back only after the switch."""
    queued = []
    original = QueuedDecode.__init__

    def record(self, *args):
        queued.append(args[0])
        original(self, *args)

    monkeypatch.setattr(QueuedDecode, "__init__", record)
    dit, text_encoder, vae = tiny_models(device="cuda")
    settings = MemorySettings(visual_weight=1.0)
    verifier = _RecordingVerifier()
    memory = build_memory(settings, RETURN_REGISTRY, verifier)
    memory.pacing.submit_timeout = 5.0  # a missed hand-off would show as a warning after 5 s, not pass silently
    pipe = StreamingPipeline(dit, text_encoder, vae, compile_kernels=False)
    with caplog.at_level(logging.WARNING):
        events = list(pipe.run(RETURN_STORY, sampler_config(settings, 32, 48), memory))
    assert queued == list(range(len(events)))  # every chunk took the queued path
    assert "not decoded" not in caplog.text
    assert sorted(verifier.jobs) == list(range(len(events)))
    assert all(f.frame % 3 == 2 for f in memory.archive)  # chosen on the verifier's scores, as on the CPU


def test_the_first_chunk_comes_out_before_any_kernel_is_compiled():
    """The preparation and the first chunk run eager kernels; compiling waits for the second chunk."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from iamflow_core.models import fused

    torch._dynamo.reset()
    counters.clear()
    dit, text_encoder, vae = tiny_models(device="cuda")
    config = sampler_config(MemorySettings(), height=64, width=96)
    try:
        events = StreamingPipeline(dit, text_encoder, vae, compile_kernels=True).run(DEFAULT_STORY, config)
        first = next(events)
        assert first.index == 0 and first.frames is not None
        assert counters["stats"]["unique_graphs"] == 0
        rest = list(events)
        assert rest and counters["stats"]["unique_graphs"] > 0  # the later chunks run compiled kernels
    finally:
        fused.enable(False)


def test_a_second_process_loads_the_traces_instead_of_tracing(tmp_path):
    """With warm caches a story's second chunk waited for Dynamo to trace every fused function again; the traces are
    now kept in the kernel cache (`fused.save_traces`) and a later process loads them."""
    import json
    import os
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import json
        from torch._dynamo.utils import counters
        from iamflow_core.pipeline import StreamingPipeline
        from iamflow_core.presets import DEFAULT_STORY, tiny_models
        from iamflow_core.settings import MemorySettings, sampler_config
        dit, te, vae = tiny_models(device="cuda")
        config = sampler_config(MemorySettings(mode="none"), height=64, width=96)
        list(StreamingPipeline(dit, te, vae, compile_kernels=True).run(DEFAULT_STORY, config))
        made = {"traced": counters["stats"]["unique_graphs"], "loaded": counters["dynamo_cache"]["dynamo_cache_hit"]}
        print(json.dumps(made))
    """)
    # Earlier tests pointed TorchInductor's and Triton's caches at their folder: the subprocesses get their own.
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    env["IAMFLOW_CACHE_DIR"] = str(tmp_path)
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "is dropped with caching_precompile" not in done.stderr  # no warning flood in the user's terminal
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"first process, second process: {runs}")  # H200: 18 graphs traced, then 0 traced and 8 entries loaded
    assert runs[0]["traced"] > 5 and runs[0]["loaded"] == 0
    assert runs[1]["traced"] == 0 and runs[1]["loaded"] > 0  # one entry per function, with all its shapes' graphs


def test_traces_kept_by_this_process_load_or_are_traced_again_in_the_next(tmp_path, monkeypatch):
    """Traces saved by a process that also compiled other things (here: the test process, after the tests above) once
    failed to load inside Dynamo (`assert name not in scope`). The next process must render either way."""
    import json
    import os
    import subprocess
    import sys

    from iamflow_core.models import fused

    monkeypatch.setenv("IAMFLOW_CACHE_DIR", str(tmp_path))
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    dit, text_encoder, vae = tiny_models(device="cuda")
    config = sampler_config(MemorySettings(mode="none"), height=64, width=96)
    try:
        list(StreamingPipeline(dit, text_encoder, vae, compile_kernels=True).run(DEFAULT_STORY, config))
    finally:
        fused.enable(False)
    script = (
        "import json\n"
        "from torch._dynamo.utils import counters\n"
        "from iamflow_core.pipeline import StreamingPipeline\n"
        "from iamflow_core.presets import DEFAULT_STORY, tiny_models\n"
        "from iamflow_core.settings import MemorySettings, sampler_config\n"
        "dit, te, vae = tiny_models(device='cuda')\n"
        "config = sampler_config(MemorySettings(mode='none'), height=64, width=96)\n"
        "n = len(list(StreamingPipeline(dit, te, vae, compile_kernels=True).run(DEFAULT_STORY, config)))\n"
        "print(json.dumps({'chunks': n, 'traced': counters['stats']['unique_graphs']}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=dict(os.environ),
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    print(
        "next process:", done.stdout.strip().splitlines()[-1], [ln for ln in done.stderr.splitlines() if "trace" in ln]
    )
    assert json.loads(done.stdout.strip().splitlines()[-1])["chunks"] > 4


def test_the_compiler_warms_up_beside_loading(tmp_path, monkeypatch):
    """`warm_up` loads the compiler's parts on a thread; with an empty kernel cache it compiles nothing (a story's
    first chunk never waits for a compile), with compiled work in the cache it also loads its tiny kernel, and the
    GPU's later compiled work runs as before."""
    import sys

    import torch

    from iamflow_core.models import fused

    cache = tmp_path / "kernels"
    monkeypatch.setenv("IAMFLOW_CACHE_DIR", str(cache))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # set to the folder above by enable()
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.setattr(fused, "_warmed", False)
    try:
        thread = fused.warm_up("cuda:0")
        assert thread is not None and thread.daemon
        thread.join(timeout=300)
        assert not thread.is_alive() and not fused.warmed() and fused.enabled()
        assert "torch._inductor.compile_fx" in sys.modules and "triton.compiler.compiler" in sys.modules
        (cache / "inductor" / "fxgraph" / "entry").mkdir(parents=True)  # compiled work, as a process leaves it
        thread = fused.warm_up("cuda:0")
        thread.join(timeout=300)
        assert not thread.is_alive() and fused.warmed()
        x = torch.randn(2, 8, device="cuda")
        assert torch.equal(fused.residual(x, torch.ones_like(x)), x + 1)
    finally:
        fused.enable(False)


def test_without_a_c_compiler_the_story_renders_as_plain_pytorch(tmp_path):
    """A machine where Triton cannot build its launcher (no C compiler: here CC points nowhere, with empty kernel
    caches): the story renders all its chunks, compiled kernels go off with one warning, and the answer decoder's
    hand-written kernels fall back to the same values."""
    import json
    import os
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import json
        import torch
        from iamflow_core.models import fused, kernels
        from iamflow_core.pipeline import StreamingPipeline
        from iamflow_core.presets import DEFAULT_STORY, tiny_models
        from iamflow_core.settings import MemorySettings, sampler_config
        from iamflow_core.story import greedy_ops
        dit, te, vae = tiny_models(device="cuda")
        config = sampler_config(MemorySettings(mode="none"), height=64, width=96)
        chunks = len(list(StreamingPipeline(dit, te, vae, compile_kernels=True).run(DEFAULT_STORY, config)))
        gate_up = torch.randn(4, 128, device="cuda", dtype=torch.bfloat16)
        plain = torch.nn.functional.silu(gate_up[:, :64]) * gate_up[:, 64:]
        same = torch.equal(greedy_ops.silu_mul(gate_up), plain)
        print(json.dumps({"chunks": chunks, "compiled": fused.enabled(), "why": fused._off,
                          "kernels_off": kernels._off, "same": same}))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    env.update(IAMFLOW_CACHE_DIR=str(tmp_path), CC=str(tmp_path / "no-such-cc"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    print(got)  # H200: 12 chunks, modulate's compile failed on the missing compiler
    assert got["chunks"] == 12 and not got["compiled"] and "no-such-cc" in got["why"]
    assert "no-such-cc" in got["kernels_off"] and got["same"]
    assert done.stderr.count("compiled kernels are off for this process") == 1
