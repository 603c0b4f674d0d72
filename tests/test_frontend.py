"""The example workflows as an artist meets them: ComfyUI 0.3.64 with its own web frontend (1.27.10) in Chromium, on
the CPU, with tiny random model files under the workflows' file names and tiny Qwen3 / Qwen3-VL folders.

For each workflow: open it from the template browser (the card shows its thumbnail), no missing node; the saved view
shows every node at a readable zoom in a 1600x1000 window, none hidden under the minimap or the zoom toolbar; no two
node rectangles overlap; the Run button makes the video (the sampler's mp4 and the WEBP, frame by frame); still no
overlap once the nodes show their status; the sampler plays the finished mp4. One run is cancelled with the Cancel
button mid-run and the kept mp4 is checked.

Screenshots (1600x1000) go to docs/screenshots/<workflow>_{load,running,done}.jpg, rewritten on every run.

Needs the vendored ComfyUI source (../shared/vendor/comfyui-0.3.64.tar.gz, or `IAMFLOW_COMFYUI_TARBALL`), Debian's
chromium and the playwright package; `.ci/comfyui_frontend_setup.sh` prepares the rest. Without them the test is
skipped, unless `IAMFLOW_REQUIRE_FRONTEND=1` (CI), which makes that a failure.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from iamflow_core.video import read_video_frame_count
from tests._frontend import (
    CANVAS,
    PACK,
    READABLE_ZOOM,
    REPO,
    Browser,
    Frontend,
    Layout,
    Run,
    Server,
    Unavailable,
    comfyui_dir,
    overlapping_pairs,
    prepare_base,
)
from tests._frontend import WORKFLOWS as WORKFLOW_DIR  # the folder; WORKFLOWS below are the names

pytestmark = pytest.mark.slow

WORKFLOWS = ["iamflow_two_gpu", "iamflow_one_gpu", "memflow_baseline", "streaming_story_plain", "iamflow_pictures"]
SHOTS = REPO / "docs" / "screenshots"
STORY_TEXT = "1.5s | a woman in a red coat reads a notebook\n1.5s | a man in a grey hoodie waves"
FRAMES = 45  # 2 segments x 2 chunks: 9 + 3 x 12 video frames
WIDTH, HEIGHT = 48, 32
TINY = {"IAMFlowStory": {"text": STORY_TEXT}, "IAMFlowStreamingSampler": {"width": WIDTH, "height": HEIGHT}}
# The pictures workflow types its registry: one that fits the tiny story, with the names its Entity References use.
TINY_REGISTRY = {"entities": [{"id": 1, "name": "Nora", "aliases": ["woman"]}, {"id": 2, "name": "Ethan"}],
                 "prompts": [[1], [2]]}  # fmt: skip
TINY_FOR = {"iamflow_pictures": {"IAMFlowEntityExtractor": {"registry_json": json.dumps(TINY_REGISTRY)}}}
RUN_S = 300
SAMPLER, SAVE_WEBP = "IAMFlowStreamingSampler", "SaveAnimatedWEBP"


def _unavailable(reason: str):
    if os.environ.get("IAMFLOW_REQUIRE_FRONTEND") == "1":
        pytest.fail(f"the ComfyUI frontend test is required here (IAMFLOW_REQUIRE_FRONTEND=1) but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    try:
        comfy = comfyui_dir()
    except Unavailable as e:
        _unavailable(str(e))
    server = Server(comfy, prepare_base(tmp_path_factory.mktemp("comfyui")))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser():
    try:
        browser = Browser()
    except Unavailable as e:
        _unavailable(str(e))
    try:
        yield browser
    finally:
        browser.stop()


@dataclass
class Visit:
    """One workflow opened from the template browser and run with the Run button, as recorded for the checks."""

    card: dict
    opened: Layout
    run: Run
    done: Layout
    preview: dict  # how the sampler shows its result after the run
    outputs: dict  # the prompt's history entry: node id -> ui output


def _node_id(layout: Layout, type_: str):
    return next(n["id"] for n in layout.nodes if n["type"] == type_)


def _open_and_run(front: Frontend, name: str) -> Visit:
    front.open()
    card = front.open_template(name)
    opened = front.layout()
    front.screenshot(SHOTS / f"{name}_load.jpg")
    front.set_widgets(TINY | TINY_FOR.get(name, {}))
    sampler = _node_id(opened, SAMPLER)
    run = front.press_run()
    front.wait_for_progress(run, sampler, 1, RUN_S)
    front.screenshot(SHOTS / f"{name}_running.jpg")
    front.wait_for_end(run, RUN_S)
    entry = front.server.get(f"/api/history/{run.prompt_id}").get(run.prompt_id, {})
    assert run.outcome == "execution_success", (run.outcome, entry.get("status"), front.server.log_tail())
    # The finished video replaces the last chunk clip a moment after the run ends: wait for that one.
    final = [i["filename"] for i in entry["outputs"].get(str(sampler), {}).get("images", [])]
    preview = front.wait_for_video(sampler, final[0] if final else "")
    front.wait_for_previews(("IAMFlowStory", "IAMFlowInspectMemory", SAVE_WEBP))
    done = front.layout()
    front.screenshot(SHOTS / f"{name}_done.jpg")
    return Visit(card, opened, run, done, preview, entry["outputs"])


@pytest.fixture(scope="module")
def visits(browser, server):
    """workflow name -> its Visit, made once (on first use) and shared by the checks; a failure is kept and raised
    again for every check of that workflow."""
    made: dict[str, Visit | BaseException] = {}

    def visit(name: str) -> Visit:
        if name not in made:
            page = browser.new_page()
            try:
                made[name] = _open_and_run(Frontend(page, server), name)
            except Exception as e:  # noqa: BLE001 - kept and raised for each check below
                made[name] = e
            finally:
                page.context.close()
        if isinstance(made[name], BaseException):
            raise made[name]
        return made[name]

    return visit


def _saved_mp4(outputs: dict, server: Server) -> Path:
    """The mp4 a node's ui output points at (ComfyUI's `images` entry with animated = True, as `ui.PreviewVideo`
    sends it)."""
    (item,) = [i for i in outputs.get("images", []) + outputs.get("video", []) if i["filename"].endswith(".mp4")]
    assert item["type"] == "output", item
    return server.output / item["subfolder"] / item["filename"]


def test_pack_loads_with_every_node_of_the_workflows(server):
    info = server.get("/api/object_info")
    ours = {name: node for name, node in info.items() if name.startswith("IAMFlow")}
    used = {n["type"] for name in WORKFLOWS for n in json.loads((WORKFLOW_DIR / f"{name}.json").read_text())["nodes"]}
    assert {t for t in used if t.startswith("IAMFlow")} <= set(ours), sorted(ours)
    assert {node["category"] for node in ours.values()} == {"IAMFlow"}
    failed = [line for line in server.log_tail(200_000).splitlines() if "IMPORT FAILED" in line and PACK in line]
    assert not failed, failed


@pytest.mark.parametrize("name", WORKFLOWS)
def test_template_card_shows_a_thumbnail(name, visits):
    assert visits(name).card["thumbnail"] > 0, f"the template card of {name} shows no thumbnail ({name}.jpg)"


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_opens_from_the_template_browser_with_no_missing_node(name, visits):
    visit = visits(name)
    missing = [f"{n['id']} {n['type']}" for n in visit.opened.nodes if not n["registered"]]
    assert not missing, f"node types the frontend does not know: {missing}"
    assert not visit.opened.dialogs, f"dialogs open after loading: {visit.opened.dialogs}"


@pytest.mark.parametrize("name", WORKFLOWS)
def test_opening_view_shows_every_node_at_a_readable_zoom(name, visits):
    opened = visits(name).opened
    assert (opened.canvas.w, opened.canvas.h) == CANVAS, "the static workflow test assumes this canvas size"
    assert opened.scale >= READABLE_ZOOM and not opened.low_quality, f"zoom {opened.scale:.2f}"
    assert not opened.hidden_nodes(), f"not wholly visible when opened: {opened.hidden_nodes()}"


@pytest.mark.parametrize("name", WORKFLOWS)
def test_no_two_nodes_overlap_when_opened(name, visits):
    assert not overlapping_pairs(visits(name).opened.rects())


@pytest.mark.parametrize("name", WORKFLOWS)
def test_run_button_makes_the_video(name, visits, server):
    visit = visits(name)
    mp4 = _saved_mp4(visit.outputs[str(_node_id(visit.done, SAMPLER))], server)
    frames = FRAMES + (4 if name == "iamflow_pictures" else 0)  # its start image leads chunk 0's 12 frames
    assert read_video_frame_count(mp4) == frames
    (webp,) = visit.outputs[str(_node_id(visit.done, SAVE_WEBP))]["images"]
    with Image.open(server.output / webp["subfolder"] / webp["filename"]) as image:
        assert image.n_frames == frames


@pytest.mark.parametrize("name", WORKFLOWS)
def test_no_two_nodes_overlap_after_the_run(name, visits):
    """Status texts and previews make nodes grow; they must not grow into their neighbours."""
    done = visits(name).done
    grown = {
        f"{n['id']} {n['title']}": f"{o['size'][1]:.0f} -> {n['size'][1]:.0f}"
        for o, n in zip(visits(name).opened.nodes, done.nodes)
        if n["size"] != o["size"]
    }
    assert not overlapping_pairs(done.rects()), f"nodes that grew (height): {grown}"


@pytest.mark.parametrize("name", WORKFLOWS)
def test_sampler_shows_the_finished_video(name, visits, server):
    """The frontend's video preview widget plays the mp4 the sampler wrote; a still preview frame is not enough."""
    visit = visits(name)
    mp4 = _saved_mp4(visit.outputs[str(_node_id(visit.done, SAMPLER))], server)
    video, images = visit.preview["video"], visit.preview["images"]
    assert video is not None, f"the sampler shows no <video> but {len(images)} still picture(s): {visit.preview}"
    assert mp4.name in video["src"] and video["readyState"] >= 2, video
    assert (video["width"], video["height"]) == (WIDTH, HEIGHT), video
    assert not images, f"the sampler also draws still pictures over its video: {images}"


def test_cancel_mid_run_keeps_the_mp4(browser, server):
    """The Cancel button while the sampler works: it stops after the chunk in progress, the prompt ends as
    interrupted, and the mp4 in the output folder holds every chunk made, which the sampler's status names."""
    long_story = "\n".join(f"10s | a woman reads a notebook, page {i}" for i in range(30))  # 400 chunks
    page = browser.new_page()
    try:
        front = Frontend(page, server)
        front.open()
        front.open_template("streaming_story_plain")
        sampler = _node_id(front.layout(), SAMPLER)
        prefix = "IAMFlow/cancel"
        front.set_widgets({**TINY, "IAMFlowStory": {"text": long_story}, SAMPLER: {**TINY[SAMPLER],
                          "filename_prefix": prefix}})  # fmt: skip
        run = front.press_run()
        front.wait_for_progress(run, sampler, 3, RUN_S)
        front.screenshot(SHOTS / "streaming_story_plain_cancelling.jpg")
        front.press_cancel()
        front.wait_for_end(run, RUN_S)
        page.wait_for_timeout(500)
        front.screenshot(SHOTS / "streaming_story_plain_cancelled.jpg")
    finally:
        page.context.close()
    assert run.outcome == "execution_interrupted", run.outcome
    (video,) = server.output.glob(f"{prefix}_*.mp4")
    frames = read_video_frame_count(video)
    assert 9 + 2 * 12 <= frames < 9 + 399 * 12 and (frames - 9) % 12 == 0, frames  # whole chunks, not all 400
    assert video.name in run.texts(sampler)[-1], run.texts(sampler)[-3:]


def test_decode_after_sampling_with_a_typed_registry_through_the_server(server):
    """A graph none of the examples has, sent to the server as an API prompt: the text encoder offloaded, the registry
    typed as JSON (no LLM), identity memory, a sampler without a VAE, then Streaming VAE Decode into Save Animated
    WEBP, and Inspect Memory drawing the story map."""
    from tests._comfy_models import DIT_FILE, TEXT_ENCODER_FILE, VAE_FILE

    EMBEDDED = "embedded in the text encoder file"  # nodes/folders.py's choice, as the widget sends it
    registry = {"entities": [{"id": 1, "name": "Nora"}, {"id": 2, "name": "Ethan"}], "prompts": [[1], [2]]}
    memory = {"mode": "identity", "transition": "soft", "max_frames": 4, "min_frames_multi_entity": 2, "bank_size": 3,
              "record_interval": 3, "sparse_topk": 0, "visual_weight": 0.3, "archive_limit_mb": 2048,
              "async_verifier": True, "verifier_wait": -1.0}  # fmt: skip
    prompt = {
        "1": {"class_type": "IAMFlowLoadDiT", "inputs": {"model": DIT_FILE, "lora": "None", "precision": "fp32",
              "quantization": "auto", "attention": "auto", "device": "cpu"}},
        "2": {"class_type": "IAMFlowLoadTextEncoder", "inputs": {"model": TEXT_ENCODER_FILE, "tokenizer": EMBEDDED,
              "precision": "fp32", "device": "cpu", "offload": True}},
        "3": {"class_type": "IAMFlowLoadVAE", "inputs": {"model": VAE_FILE, "precision": "fp32", "device": "cpu"}},
        "4": {"class_type": "IAMFlowStory", "inputs": {"text": STORY_TEXT, "default_seconds": 10.0}},
        "5": {"class_type": "IAMFlowEntityExtractor", "inputs": {"story": ["4", 0], "llm": "None", "device": "cpu",
              "registry_json": json.dumps(registry)}},
        "6": {"class_type": "IAMFlowIdentityMemory", "inputs": memory},
        "7": {"class_type": SAMPLER, "inputs": {"dit": ["1", 0], "text_encoder": ["2", 0], "story": ["5", 0],
              "width": WIDTH, "height": HEIGHT, "seed": 3, "filename_prefix": "IAMFlow/decode", "memory": ["6", 0]}},
        "8": {"class_type": "IAMFlowDecodeVAE", "inputs": {"vae": ["3", 0], "latent": ["7", 1]}},
        "9": {"class_type": SAVE_WEBP, "inputs": {"images": ["8", 0], "filename_prefix": "IAMFlow/decoded",
              "fps": 16.0, "lossless": False, "quality": 80, "method": "default"}},
        "10": {"class_type": "IAMFlowInspectMemory", "inputs": {"state": ["7", 2]}},
    }  # fmt: skip
    entry = server.run_prompt(prompt, RUN_S)
    assert entry["status"]["status_str"] == "success", (entry["status"], server.log_tail())
    (webp,) = entry["outputs"]["9"]["images"]
    with Image.open(server.output / webp["subfolder"] / webp["filename"]) as image:
        assert image.n_frames == FRAMES and image.size == (WIDTH, HEIGHT)
    (story_map,) = entry["outputs"]["10"]["images"]
    assert story_map["filename"].endswith(".png") and story_map["type"] == "temp"
    assert not list(server.output.glob("IAMFlow/decode_*.mp4"))  # no VAE on the sampler: no mp4 from it
