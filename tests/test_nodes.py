"""Every IAMFlow node run as ComfyUI's executor runs a V3 node (a class clone with its hidden inputs, then
`execute`), on tiny model files under the names artists have (CPU), with ComfyUI's own node API and stand-ins for
its runtime modules (tests/_comfy_stub.py). Also `render_story`, the library call behind the Streaming Sampler."""

import dataclasses
import inspect
import json
import logging
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests import _comfy_stub

_comfy_stub.install()

import nodes  # noqa: E402
from iamflow_core.config import CacheConfig, SamplerConfig  # noqa: E402
from iamflow_core.memory import NoMemory  # noqa: E402
from iamflow_core.pipeline import StreamingPipeline  # noqa: E402
from iamflow_core.presets import tiny_models  # noqa: E402
from iamflow_core.render import decode_latents, render_story  # noqa: E402
from iamflow_core.story import Segment, Story  # noqa: E402
from iamflow_core.story.entities import EntityRegistry, RegistryError  # noqa: E402
from iamflow_core.video import read_video_frame_count, read_video_frames  # noqa: E402
from nodes import devices, folders  # noqa: E402
from nodes.values import MemoryValue, StateValue, StoryValue  # noqa: E402
from tests._comfy_models import (  # noqa: E402
    DIT_FILE,
    IAMFLOW_FILE,
    LLM_FOLDER,
    TEXT_ENCODER_FILE,
    VAE_FILE,
    VLM_FOLDER,
    spiece_bytes,
    write_tiny_models,
)
from tests._comfy_workflows import combo_options, has_control, inputs_of, is_widget  # noqa: E402

N = _comfy_stub.node_classes()
STORY_TEXT = "1.5s | a woman in a red coat reads a notebook\n1.5s | a man in a grey hoodie waves"  # 2 + 2 chunks
REGISTRY = {
    "entities": [{"id": 1, "name": "Nora", "attributes": ["red coat"]}, {"id": 2, "name": "Ethan"}],
    "prompts": [[{"id": 1, "text": "a woman in a red coat"}], [2]],
}
FRAMES = 45  # 4 chunks: 9 + 3 * 12 video frames


@pytest.fixture
def comfy(tmp_path):
    recorder = _comfy_stub.configure(tmp_path)
    write_tiny_models(tmp_path / "models", fp8_dit=True, hf_folders=True)
    recorder.root = tmp_path
    return recorder


def run(node: str, *args, unique_id: str | None = None, **kwargs):
    """Run a node as ComfyUI does (its id: `unique_id`, else its type); returns (result tuple, ui dict) and leaves
    its status in the recorder."""
    out = _comfy_stub.run_node(N[node], *args, unique_id=unique_id or node, **kwargs)
    ui = out.ui.as_dict() if hasattr(out.ui, "as_dict") else (out.ui or {})
    return out.result or (), ui


def status(comfy, unique_id: str | None = None) -> str:
    """The status text the node with `unique_id` (else the node that ran last) shows last."""
    texts = [text for node, text in comfy.texts if unique_id is None or node == unique_id]
    return texts[-1] if texts else ""


def load_models(device="cpu"):
    dit = run("IAMFlowLoadDiT", DIT_FILE, "None", "fp32", "auto", "auto", device)[0][0]
    te = run("IAMFlowLoadTextEncoder", TEXT_ENCODER_FILE, folders.EMBEDDED, "fp32", device, False)[0][0]
    vae = run("IAMFlowLoadVAE", VAE_FILE, "fp32", device)[0][0]
    return dit, te, vae


def story_value(registry=True) -> StoryValue:
    story = run("IAMFlowStory", STORY_TEXT, 10.0)[0][0]
    if not registry:
        return story
    return run("IAMFlowEntityExtractor", story, "None", "cpu", registry_json=json.dumps(REGISTRY))[0][0]


def memory_value(
    mode="identity", transition="soft", verifier=None, async_verifier=True, reference_weight=0.0
) -> MemoryValue:
    values = (mode, transition, 4, 2, 3, 1, 0, 0.3, 2048, async_verifier, -1.0, reference_weight)  # passed by name
    options = dict(zip(N["IAMFlowIdentityMemory"].OPTIONS, values))
    return run("IAMFlowIdentityMemory", verifier=verifier, **options)[0][0]


def saved_image(comfy, ui: dict) -> Path:
    (image,) = ui["images"]
    return comfy.root / image["type"] / image["subfolder"] / image["filename"]


# --- definitions ------------------------------------------------------------------------------------------------


def test_every_node_is_a_v3_node_for_comfyui(comfy):
    from comfy_api.latest import io

    assert len(N) == 11 and all(issubclass(cls, io.ComfyNode) for cls in N.values())
    for name, cls in N.items():
        schema = cls.GET_SCHEMA()
        assert name.startswith("IAMFlow") and cls.CATEGORY == "IAMFlow" and cls.DESCRIPTION, name
        assert "IAMFlow" not in schema.display_name and len(schema.display_name) <= 24, schema.display_name
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS), name
        for input_name, spec, _ in inputs_of(cls.INPUT_TYPES()):
            options = spec[1] if len(spec) > 1 else {}
            assert options.get("tooltip"), f"{name}.{input_name} has no tooltip"
            if is_widget(spec) and spec[0] in ("INT", "FLOAT"):
                assert "min" in options and "max" in options, f"{name}.{input_name} is unbounded"
            if combo_options(spec) is not None:
                assert combo_options(spec), f"{name}.{input_name} offers nothing"
    assert has_control("seed", N["IAMFlowStreamingSampler"].INPUT_TYPES()["required"]["seed"])


def test_the_pack_registers_through_comfy_entrypoint():
    import asyncio

    extension = asyncio.run(nodes.comfy_entrypoint())
    assert asyncio.run(extension.get_node_list()) == nodes.NODES


def test_dropdowns_list_the_model_folders(comfy):
    required = N["IAMFlowLoadDiT"].INPUT_TYPES()["required"]
    assert combo_options(required["model"]) == sorted([DIT_FILE, IAMFLOW_FILE])
    assert combo_options(required["lora"]) == ["None"]
    llm = N["IAMFlowEntityExtractor"].INPUT_TYPES()["required"]["llm"]
    assert combo_options(llm) == ["None", LLM_FOLDER, VLM_FOLDER]
    assert combo_options(N["IAMFlowVLMVerifier"].INPUT_TYPES()["required"]["vlm"]) == [LLM_FOLDER, VLM_FOLDER]
    llm_dir = str(comfy.root / "models" / "LLM")
    assert llm_dir in sys.modules["folder_paths"].get_folder_paths("LLM")


def test_old_comfyui_folder_names_get_the_new_keys(tmp_path):
    _comfy_stub.configure(tmp_path, legacy_names=True)
    (tmp_path / "models" / "unet").mkdir(parents=True)
    (tmp_path / "models" / "unet" / "old.safetensors").touch()
    (tmp_path / "models" / "diffusion_models").mkdir()
    (tmp_path / "models" / "diffusion_models" / "new.safetensors").touch()
    assert folders.model_files("diffusion_models") == ["new.safetensors", "old.safetensors"]


def test_a_missing_file_is_one_message_naming_the_folder_and_the_file(comfy):
    message = N["IAMFlowLoadDiT"].validate_inputs("nope.safetensors")
    assert "'nope.safetensors'" in message and "diffusion_models" in message and "download" in message
    with pytest.raises(FileNotFoundError, match="nope.safetensors.*diffusion_models"):
        run("IAMFlowLoadDiT", "nope.safetensors", "None", "fp32", "auto", "auto", "cpu")
    message = N["IAMFlowVLMVerifier"].validate_inputs("Qwen9")
    assert "'Qwen9'" in message and "LLM" in message
    assert N["IAMFlowLoadVAE"].validate_inputs(VAE_FILE) is True
    # ComfyUI repeats a failed validation once per input the function takes: each takes exactly one
    for name, cls in N.items():
        if "validate_inputs" in vars(cls):
            assert len(inspect.signature(cls.validate_inputs).parameters) == 1, name


# --- devices ----------------------------------------------------------------------------------------------------


def test_device_widget_lists_gpus_and_cpu():
    widget = devices.device_input(1)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert widget.options == [f"cuda:{i}" for i in range(count)] + ["cpu"]
    assert widget.default == (f"cuda:{min(1, count - 1)}" if count else "cpu") and widget.tooltip


def test_a_saved_device_this_machine_lacks_falls_back_with_a_warning(comfy, caplog):
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match="'gpu0' is not a device"):
        devices.resolve_device("gpu0")
    (vae,), _ = run("IAMFlowLoadVAE", VAE_FILE, "fp32", f"cuda:{count + 1}", unique_id="7")
    expected = torch.device(f"cuda:{count - 1}") if count else torch.device("cpu")
    assert vae.device == expected
    assert f"cuda:{count + 1} is not on this machine" in status(comfy, "7")
    assert any("not on this machine" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_status_is_at_most_two_short_lines(comfy):
    from nodes.common import STATUS_WIDTH, show_status

    text = show_status("4", "a" * 200, "second", "third")
    assert text.count("\n") == 1 and all(len(line) <= STATUS_WIDTH for line in text.splitlines())
    assert status(comfy, "4") == text


# --- loaders ----------------------------------------------------------------------------------------------------


def test_loaders_read_the_files_artists_have(comfy):
    (dit,), _ = run("IAMFlowLoadDiT", IAMFLOW_FILE, "None", "bf16", "auto", "auto", "cpu")
    assert dit.load_info.fp8 and dit.cfg.dim == 256 and status(comfy).startswith("cpu\nsdpa · ")
    assert "fp8" in status(comfy)


def test_auto_attention_is_fp8_for_an_fp8_dit_where_fa3_has_its_fp8_kernel(comfy, monkeypatch):
    """An FP8 file (or quantization fp8) gets FA3's FP8 attention from `auto`; a 16-bit DiT, or the FP8 file
    dequantized, keeps 16-bit attention. (The CPU has no FA3: its list of backends is told here.)"""
    from iamflow_core.models import attention

    monkeypatch.setattr(attention, "available_backends", lambda: ["auto", "sdpa", "flash3", "flash3_fp8"])
    for file, quantization, backend in (
        (IAMFLOW_FILE, "auto", "flash3_fp8"), (IAMFLOW_FILE, "off", "flash3"), (DIT_FILE, "auto", "flash3"),
        (DIT_FILE, "fp8", "flash3_fp8"),
    ):  # fmt: skip
        (dit,), _ = run("IAMFlowLoadDiT", file, "None", "fp32", quantization, "auto", "cpu")
        assert dit.attention_backend == backend, (file, quantization)
        assert status(comfy).splitlines()[1].startswith(f"{backend} · ")


def test_the_dit_loader_says_when_its_gpu_runs_without_compiled_kernels(comfy, monkeypatch):
    """Where compiled kernels cannot run on the DiT's device (here told so: a CPU never compiles), the loader's
    status says the render will be slower and why, before the artist presses Run."""
    from iamflow_core.models import fused

    monkeypatch.setattr(fused, "not_compiled_because", lambda device: "Triton is not installed")
    run("IAMFlowLoadDiT", DIT_FILE, "None", "fp32", "auto", "auto", "cpu")
    assert status(comfy).splitlines()[0] == "slower, no compiled kernels: Triton is not installed"
    dit, te, vae = load_models()
    assert dit.attention_backend == "sdpa" and next(dit.parameters()).dtype == torch.float32
    assert te.encode(["a woman reads"]).shape == (1, 512, 64)
    assert vae.device.type == "cpu"


def test_text_encoder_with_a_tokenizer_folder_and_offload(comfy):
    folder = comfy.root / "models" / "text_encoders" / "google" / "umt5-xxl"
    folder.mkdir(parents=True)
    (folder / "spiece.model").write_bytes(spiece_bytes())
    tokenizer = N["IAMFlowLoadTextEncoder"].INPUT_TYPES()["required"]["tokenizer"]
    assert "google/umt5-xxl" in combo_options(tokenizer)
    (embedded,), _ = run("IAMFlowLoadTextEncoder", TEXT_ENCODER_FILE, folders.EMBEDDED, "fp32", "cpu", False)
    (offloaded,), _ = run("IAMFlowLoadTextEncoder", TEXT_ENCODER_FILE, "google/umt5-xxl", "fp32", "cpu", True)
    assert "encodes on cpu" in status(comfy)
    torch.testing.assert_close(offloaded.encode(["a woman reads"]), embedded.encode(["a woman reads"]))
    assert offloaded.encoder.device.type == "cpu"


# --- story and entities -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        STORY_TEXT,
        json.dumps(
            {"segments": [{"prompt": "a woman reads", "seconds": 1.5}, {"prompt": "a man waves", "seconds": 1.5}]}
        ),
        json.dumps({"prompts": ["a woman reads", "a man waves"], "seconds": 1.5}),  # a NarraStream JSONL line
    ],
    ids=["lines", "story-json", "narrastream-line"],
)
def test_story_node_reads_every_form_and_draws_its_plan(comfy, text):
    (value,), ui = run("IAMFlowStory", text, 10.0, unique_id="3")
    assert isinstance(value, StoryValue) and len(value.story.segments) == 2 and value.registry is None
    assert status(comfy, "3") == "2 prompts · 2.8 s · 4 chunks"
    assert Image.open(saved_image(comfy, ui)).size[0] >= 300  # the plan, drawn


def test_story_node_says_when_it_rounds(comfy):
    run("IAMFlowStory", "1s | a woman reads", 10.0)
    assert "rounded" in status(comfy)


def test_registry_json_overrides_and_the_input_story_is_untouched(comfy):
    story = run("IAMFlowStory", STORY_TEXT, 10.0)[0][0]
    (with_registry, text), ui = run("IAMFlowEntityExtractor", story, "None", "cpu", registry_json=json.dumps(REGISTRY))
    assert story.registry is None and with_registry.story is story.story
    assert [e.name for e in with_registry.registry.entities] == ["Nora", "Ethan"]
    assert status(comfy) == "2 entities: #1 Nora, #2 Ethan" and '"entities"' in text
    assert Image.open(saved_image(comfy, ui)).size[0] >= 300  # the entity sheet
    (none, text), _ = run("IAMFlowEntityExtractor", story, "None", "cpu")
    assert none.registry is None and "no entities" in status(comfy) and text == ""
    with pytest.raises(ValueError, match="registry"):
        run("IAMFlowEntityExtractor", story, "None", "cpu", registry_json='{"entities": [], "prompts": [[]]}')


def test_extractor_runs_the_llm_once_and_unloads_it(comfy, monkeypatch):
    calls = []

    class RecordedExtractor:  # the LLM boundary: a recorded answer
        def __init__(self, model_dir, *, device, dtype=None):
            calls.append(("load", model_dir.name, str(device)))

        def extract(self, prompts):
            calls.append(("extract", tuple(prompts)))
            return EntityRegistry.from_json(REGISTRY, num_segments=len(prompts), source="llm")

        def unload(self):
            calls.append(("unload",))

    monkeypatch.setitem(
        sys.modules, "iamflow_core.story.llm", types.SimpleNamespace(EntityExtractor=RecordedExtractor)
    )
    story = run("IAMFlowStory", STORY_TEXT, 10.0)[0][0]
    (value, _), _ = run("IAMFlowEntityExtractor", story, LLM_FOLDER, "cuda:3", unique_id="5")
    assert calls[0] == ("load", LLM_FOLDER, str(devices.resolve_device("cuda:3")[0]))
    assert calls[1][0] == "extract" and len(calls[1][1]) == 2 and calls[2] == ("unload",)
    assert value.registry.source == "llm"
    assert status(comfy, "5").splitlines() == [
        "cuda:3 is not on this machine: using cpu",
        "2 entities: #1 Nora, #2 Ethan",
    ]


def _link_tiny_qwen(comfy) -> None:
    """The tiny random Qwen3 / Qwen3-VL folders (real tokenizer) under the names artists have."""
    from tests._tiny_qwen import tiny_qwen_folders

    qwen = tiny_qwen_folders()
    for name, folder in ((LLM_FOLDER, qwen.llm), (VLM_FOLDER, qwen.vlm)):
        target = comfy.root / "models" / "LLM" / name
        (target / "config.json").unlink()
        target.rmdir()
        target.symlink_to(folder, target_is_directory=True)


@pytest.mark.slow
def test_extractor_node_with_a_tiny_qwen(comfy):
    _link_tiny_qwen(comfy)
    story = run("IAMFlowStory", STORY_TEXT, 10.0)[0][0]
    (value, text), _ = run("IAMFlowEntityExtractor", story, LLM_FOLDER, "cpu", unique_id="5")
    value.registry.check_story(2)  # random weights answer garbage: a valid (maybe empty) registry, never a crash
    assert value.registry.source == "llm" and '"prompts"' in text


# --- memory -----------------------------------------------------------------------------------------------------


def test_memory_node_exposes_every_memory_option_as_declared(comfy):
    """The node's widgets are the library's options: the same names, defaults, bounds and help as the CLI's flags."""
    from iamflow_core.config import option_spec
    from iamflow_core.settings import MemorySettings

    types = N["IAMFlowIdentityMemory"].INPUT_TYPES()
    widgets = {**types["required"], **{k: v for k, v in types["optional"].items() if k != "verifier"}}
    assert set(types["optional"]) - {"verifier"} == set(N["IAMFlowIdentityMemory"].ADDED)  # later options: optional
    assert set(widgets) == {f.name for f in dataclasses.fields(MemorySettings)}
    for name, spec in widgets.items():
        options = spec[1]
        default, declared = option_spec(MemorySettings, name)
        assert options["tooltip"] == declared.help
        assert options["default"] == (declared.auto if default is None else default)
        if declared.choices:
            assert combo_options(spec) == list(declared.choices)
        elif spec[0] != "BOOLEAN":
            low = declared.auto if declared.auto is not None else declared.min
            assert options["max"] == declared.max and options["min"] == low
    defaults = {name: spec[1]["default"] for name, spec in types["required"].items()}
    assert run("IAMFlowIdentityMemory", **defaults)[0][0].settings == MemorySettings()  # as a prompt saved before


def test_memory_node_makes_settings_not_a_policy(comfy):
    value = memory_value("memflow", "recache")
    assert value.settings.mode == "memflow" and value.settings.transition == "recache" and value.verifier is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        value.settings.mode = "none"
    with pytest.raises(ValueError, match="min_frames_multi_entity"):
        values = ("identity", "soft", 2, 3, 3, 3, 0, 0.3, 2048, True, -1.0)
        run("IAMFlowIdentityMemory", **dict(zip(N["IAMFlowIdentityMemory"].OPTIONS, values)))


# --- sampler ----------------------------------------------------------------------------------------------------


def test_streaming_sampler_end_to_end(comfy, monkeypatch):
    monkeypatch.setattr(nodes.sampler, "PREVIEW_LEAD_S", 0.0)  # tiny chunks: the video is due at once
    dit, te, vae = load_models()
    story = story_value()
    (images, latent, state, video), ui = run(
        "IAMFlowStreamingSampler", dit, te, story, 48, 32, 7, "IAMFlow/test", memory=memory_value(), vae=vae,
        unique_id="9",
    )  # fmt: skip
    assert images.shape == (FRAMES, 32, 48, 3) and images.dtype == torch.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert latent["samples"].shape == (1, 16, 12, 4, 6)
    # the finished mp4 plays on the node (ComfyUI's video preview) and goes out as VIDEO for Save Video
    saved = saved_image(comfy, ui)
    assert ui["images"][0]["type"] == "output" and ui["animated"] == (True,) and saved.suffix == ".mp4"
    assert read_video_frame_count(saved) == FRAMES and video.get_dimensions() == (48, 32)
    # per chunk: progress, the newest frame shown on the node (a mid-run "executed" with a JPEG from the temp folder,
    # never a progress-bar preview, which the frontend would keep over the video), and a two-line status
    assert [(v, t, p) for v, t, p in comfy.progress] == [(1, 4, None), (2, 4, None), (3, 4, None), (4, 4, None)]
    shown = [data for event, data in comfy.messages if event == "executed" and data["node"] == "9"]
    assert 1 <= len(shown) <= 3 and all(data["display_node"] == "9" for data in shown)  # never the last chunk's
    assert all(data["output"]["animated"] == (True,) for data in shown)  # a clip: the node stays a video node
    assert read_video_frame_count(saved_image(comfy, shown[0]["output"])) == 9  # the first chunk
    texts = [text for node, text in comfy.texts if node == "9"]
    assert texts[0].startswith("chunk 1/4 · prompt 1/2 · memory:") and "chunk 4/4 · prompt 2/2" in texts[-2]
    assert texts[-1] == f"{FRAMES} frames · 2.8 s → {saved.name}"
    # the state: the registry and a story map, frozen, without frames
    assert isinstance(state, StateValue) and state.registry is story.registry and state.render.frames is None
    assert [c.segment for c in state.render.chunks] == [0, 0, 1, 1] and not state.render.cancelled
    assert story.story.seed is None  # the input was not changed; the run used the sampler's seed
    (text, picture), ui = run("IAMFlowInspectMemory", state, unique_id="11")
    assert "Nora" in text and not set("{}[]'=") & set(text)
    assert picture.ndim == 4 and picture.shape[0] == 1 and picture.shape[-1] == 3
    assert Image.open(saved_image(comfy, ui)).size == (picture.shape[2], picture.shape[1])


def test_no_chunk_clip_when_the_video_is_due_first(comfy, monkeypatch):
    """The frontend shows whichever video loads last: a clip sent just before the finished video could stay on the
    node in its place, so no clip goes out when the video is due within PREVIEW_LEAD_S at the pace so far."""
    monkeypatch.setattr(nodes.sampler, "PREVIEW_LEAD_S", 3600.0)
    dit, te, vae = load_models()
    _, ui = run(
        "IAMFlowStreamingSampler", dit, te, story_value(), 48, 32, 7, "IAMFlow/lead", memory=memory_value(), vae=vae,
        unique_id="9",
    )  # fmt: skip
    assert not [data for event, data in comfy.messages if event == "executed" and data["node"] == "9"]
    assert saved_image(comfy, ui).suffix == ".mp4"


def _picture(seed: int, height: int = 40, width: int = 60) -> torch.Tensor:
    """A ComfyUI IMAGE: float32 [1, H, W, 3] in [0, 1]."""
    return torch.from_numpy(np.random.default_rng(seed).random((1, height, width, 3), dtype=np.float32))


def test_entity_pictures_and_a_start_image_from_nodes(comfy):
    """Two Entity Reference nodes in a chain give Nora and Ethan their pictures; the sampler starts from a third."""
    dit, te, vae = load_models()
    story = run("IAMFlowEntityReference", story_value(), _picture(1), "Nora", unique_id="5")[0][0]
    assert status(comfy, "5") == "#1 Nora: 1 picture"
    story = run("IAMFlowEntityReference", story, torch.cat([_picture(2), _picture(3)]), "2", unique_id="6")[0][0]
    assert status(comfy, "6") == "#2 Ethan: 2 pictures"
    assert [r.entity for r in story.registry.references] == [1, 2, 2]
    (images, _, state, _), ui = run(
        "IAMFlowStreamingSampler", dit, te, story, 48, 32, 7, "IAMFlow/pictures", memory=memory_value(), vae=vae,
        start_image=_picture(4, 64, 64), unique_id="9",
    )  # fmt: skip
    assert images.shape[0] == FRAMES + 4  # the start image's frame leads the first chunk's 12
    archive = state.render.memory_map["archive"]
    assert [f["image"] for f in archive if f.get("reference")] == [
        "Entity Reference 5", "Entity Reference 6 #1", "Entity Reference 6 #2",
    ]  # fmt: skip
    retrieved = state.render.chunks[0].memory["retrieved"]["frames"]
    assert [f["image"] for f in retrieved] == ["Entity Reference 5"]  # Nora from her picture at the first frame


def test_pictures_that_cannot_be_used_are_one_clear_error_each(comfy):
    dit, te, vae = load_models()
    with pytest.raises(RegistryError, match=r"no entity 'Mia' in the registry \(entities: 1 Nora, 2 Ethan\)"):
        run("IAMFlowEntityReference", story_value(), _picture(1), "Mia")
    with pytest.raises(ValueError, match="the story has no entity registry"):
        run("IAMFlowEntityReference", story_value(registry=False), _picture(1), "Nora")
    with pytest.raises(ValueError, match=r"picture 1 of Nora is 1x1 pixels"):
        run("IAMFlowEntityReference", story_value(), _picture(1, 1, 1), "Nora")
    story = run("IAMFlowEntityReference", story_value(), _picture(1), "Nora")[0][0]
    with pytest.raises(ValueError, match="reference pictures of Nora .* only identity memory uses"):
        run("IAMFlowStreamingSampler", dit, te, story, 48, 32, 7, "x", memory=memory_value("none"), vae=vae)
    with pytest.raises(ValueError, match="start_image needs the VAE"):
        run("IAMFlowStreamingSampler", dit, te, story_value(), 48, 32, 7, "x", start_image=_picture(4))
    with pytest.raises(ValueError, match="start_image is a batch of 2 pictures"):
        run("IAMFlowStreamingSampler", dit, te, story_value(), 48, 32, 7, "x", vae=vae,
            start_image=torch.cat([_picture(4), _picture(5)]))  # fmt: skip


def test_same_seed_same_video_and_decode_node_matches(comfy):
    dit, te, vae = load_models()
    story = story_value(registry=False)
    (a, latent, _, _), _ = run("IAMFlowStreamingSampler", dit, te, story, 48, 32, 3, "x", vae=vae)
    (b, _, _, _), _ = run("IAMFlowStreamingSampler", dit, te, story, 48, 32, 3, "x", vae=vae)
    torch.testing.assert_close(a, b)
    (decoded,) = run("IAMFlowDecodeVAE", vae, latent)[0]
    assert decoded.shape == a.shape and (decoded - a).abs().max() <= 1.5 / 255  # latent round trip rounding


def test_sampler_without_vae_or_memory(comfy):
    dit, te, _ = load_models()
    (images, latent, state, video), ui = run("IAMFlowStreamingSampler", dit, te, story_value(False), 48, 32, 0, "x")
    assert images.shape == (1, 32, 48, 3) and latent["samples"].shape == (1, 16, 12, 4, 6) and ui == {}
    assert video is None and not list((comfy.root / "output").rglob("*.mp4"))
    assert state.render.memory_map is None and len(state.render.chunks) == 4


@pytest.mark.parametrize("mode", ["memflow", "none"])
def test_sampler_with_every_memory_mode(comfy, mode):
    dit, te, vae = load_models()
    (images, _, state, _), _ = run(
        "IAMFlowStreamingSampler", dit, te, story_value(), 48, 32, 1, "x", memory=memory_value(mode, "hard"), vae=vae
    )
    assert images.shape[0] == FRAMES and len(state.render.chunks) == 4
    (text, _), _ = run("IAMFlowInspectMemory", state)
    assert text


def test_cancel_stops_after_the_chunk_and_keeps_the_video(comfy):
    import comfy.model_management as mm

    dit, te, vae = load_models()
    # Cancel pressed as chunk 2 comes out (chunk 1 comes out as soon as it is made, chunk 3 is made before chunk 2
    # is handed out)
    comfy.interrupt_after = 2
    with pytest.raises(mm.InterruptProcessingException):
        run("IAMFlowStreamingSampler", dit, te, story_value(), 48, 32, 0, "IAMFlow/cut", vae=vae, unique_id="9")
    (saved,) = (comfy.root / "output" / "IAMFlow").glob("cut_*.mp4")
    assert read_video_frame_count(saved) == 9 + 12 + 12  # chunks 1 to 3 (3 already made): nothing finished is lost
    assert status(comfy) == f"cancelled after 3 of 4 chunks\n33 frames kept in {saved.name}"
    assert not mm.processing_interrupted()  # the flag is consumed, so the next run starts clean


@pytest.mark.slow
@pytest.mark.parametrize("async_verifier", [True, False])
def test_verifier_node_feeds_identity_memory(comfy, async_verifier):
    _link_tiny_qwen(comfy)
    (verifier,), _ = run("IAMFlowVLMVerifier", VLM_FOLDER, "cuda:5", unique_id="6")
    assert "not on this machine" in status(comfy, "6")
    dit, te, vae = load_models()
    memory = memory_value(verifier=verifier, async_verifier=async_verifier)
    (images, _, state, _), _ = run(
        "IAMFlowStreamingSampler", dit, te, story_value(), 48, 32, 2, "v", memory=memory, vae=vae
    )
    assert images.shape[0] == FRAMES and state.render.memory_map["archive"]
    assert all(0.0 <= f["visual_score"] <= 1.0 for f in state.render.memory_map["archive"])


# --- render_story (library) -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe():
    return StreamingPipeline(*tiny_models())


STORY = Story((Segment("a woman reads", 1.5), Segment("a man waves", 1.5)), seed=0)
CONFIG = SamplerConfig(height=32, width=48, cache=CacheConfig(memory_frames=0))


def test_render_story_writes_and_returns_exact_frames(pipe, tmp_path):
    seen = []
    result = render_story(
        pipe, STORY, CONFIG, NoMemory(), out_path=tmp_path / "v.mp4", on_chunk=lambda e, r: seen.append((e, r))
    )
    assert result.frames.dtype == np.uint8 and result.frames.shape == (FRAMES, 32, 48, 3) and result.complete
    np.testing.assert_array_equal(result.frames, np.concatenate([e.frames for e, _ in seen]))
    assert read_video_frames(tmp_path / "v.mp4").shape == result.frames.shape and result.frames_written == FRAMES
    assert [r.frames_done for _, r in seen] == [9, 21, 33, 45] and result.latents.shape == (1, 16, 12, 4, 6)
    assert result.latents.device.type == "cpu" and result.timings["wall"] > 0 and "dit" in result.timings
    np.testing.assert_array_equal(decode_latents(pipe.vae, result.latents), result.frames)


def test_render_story_cancel_and_no_frames_kept(pipe, tmp_path):
    cancel = threading.Event()
    result = render_story(
        pipe, STORY, CONFIG, NoMemory(), out_path=tmp_path / "c.mp4", keep_frames=False, cancel=cancel,
        on_chunk=lambda e, r: cancel.set(),
    )  # fmt: skip
    # the first chunk comes out before the second is made: the cancel stops there
    assert result.cancelled and len(result.chunks) == 1 and result.frames is None
    assert read_video_frame_count(tmp_path / "c.mp4") == 9 and result.frames_written == 9


def test_render_story_keeps_the_file_when_a_chunk_fails(pipe, tmp_path):
    def boom(event, record):
        if record.index == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        render_story(pipe, STORY, CONFIG, NoMemory(), out_path=tmp_path / "k.mp4", on_chunk=boom)
    assert read_video_frame_count(tmp_path / "k.mp4") == 33


def test_requirements_agree_with_pyproject():
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    declared = {d.replace(" ", "") for d in project["dependencies"] if not d.startswith(("torch", "numpy"))}
    lines = (root / "requirements.txt").read_text().splitlines()
    required = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    assert required == declared, "requirements.txt (the node pack's) and pyproject.toml dependencies differ"


def test_clean_pass_on_the_vae_gpu_falls_back_to_the_dit_gpu_with_a_note(comfy, caplog):
    """A two-GPU workflow (clean_pass vae_gpu) on a machine whose VAE shares the DiT's device still runs, as the
    device widgets fall back: the clean pass stays on the DiT's device and the sampler says so."""
    from nodes.sampler import _clean_pass_device

    dit, te, vae = load_models()
    story = story_value(registry=False)
    with caplog.at_level(logging.WARNING):
        (images, _, _, _), _ = run("IAMFlowStreamingSampler", dit, te, story, 48, 32, 3, "x", vae=vae,
                                   clean_pass="vae_gpu", unique_id="4")  # fmt: skip
    (plain, _, _, _), _ = run("IAMFlowStreamingSampler", dit, te, story, 48, 32, 3, "x", vae=vae)
    torch.testing.assert_close(images, plain)
    assert status(comfy, "4").endswith("\nclean pass on the DiT's GPU: VAE on cpu with the DiT")
    assert "clean_pass vae_gpu" in caplog.text
    assert _clean_pass_device("dit_gpu", dit, vae) == (None, None)
    assert _clean_pass_device("vae_gpu", dit, None)[1] == "clean pass on the DiT's GPU: no VAE connected"
    with pytest.raises(ValueError, match="clean_pass 'both' is not one of dit_gpu, vae_gpu"):
        _clean_pass_device("both", dit, vae)
