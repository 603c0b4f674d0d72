"""Every example_workflows/*.json checked statically against the node definitions, the way ComfyUI's frontend loads
it and ComfyUI's /prompt validates it: known node types, widget values that fit their options and bounds, sockets
and links of matching types, every required input linked or set, an output node, and a note naming the model files.
And what the artist sees: the note at the top left, every other node in one titled group of its device, no two
nodes on top of each other, a saved view that shows the whole graph at a readable zoom, and a thumbnail for the
template browser. (tests/test_frontend.py checks the same in the real frontend, before and after a run.)
"""

import inspect
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from tests import _comfy_stub

_comfy_stub.install()

from tests._comfy_models import write_tiny_models  # noqa: E402
from tests._comfy_workflows import (  # noqa: E402
    CORE_NODES,
    CORE_OUTPUTS,
    FRONTEND_ONLY,
    OUTPUT_NODES,
    combo_options,
    has_control,
    inputs_of,
    is_widget,
    to_api,
    widget_values,
)
from tests._frontend import CANVAS, READABLE_ZOOM, Rect, node_label, node_rect, overlapping_pairs  # noqa: E402

CLASSES = _comfy_stub.node_classes()
WORKFLOWS = sorted((Path(__file__).resolve().parent.parent / "example_workflows").glob("*.json"))
REQUIRED = {
    "iamflow_two_gpu.json",
    "iamflow_one_gpu.json",
    "streaming_story_plain.json",
    "memflow_baseline.json",
    "iamflow_pictures.json",
}
USER_FILES = (
    "wan2.1_t2v_1.3B_bf16.safetensors", "iamflow_fp8.safetensors", "umt5_xxl_fp16.safetensors",
    "wan_2.1_vae.safetensors", "Qwen3-4B-Instruct-2507", "Qwen3-VL-2B-Instruct",
)  # fmt: skip


@pytest.fixture(scope="module")
def definitions(tmp_path_factory):
    """Node definitions as a ComfyUI with the files artists download would show them."""
    root = tmp_path_factory.mktemp("comfy")
    _comfy_stub.configure(root)
    write_tiny_models(root / "models", fp8_dit=True, hf_folders=True)
    return {name: cls.INPUT_TYPES() for name, cls in CLASSES.items()} | CORE_NODES


def _outputs(type_: str) -> tuple[str, ...]:
    return CLASSES[type_].RETURN_TYPES if type_ in CLASSES else CORE_OUTPUTS[type_]


def _check_value(where: str, name: str, spec: tuple, value, node_type: str) -> None:
    options = spec[1] if len(spec) > 1 else {}
    validate = vars(CLASSES[node_type]).get("validate_inputs") if node_type in CLASSES else None  # its own only
    validated = inspect.signature(validate.__get__(None, CLASSES[node_type])).parameters if validate else {}
    choices = combo_options(spec)
    if choices is not None:
        if name in validated:  # ComfyUI skips the list check for these and asks validate_inputs instead
            check = CLASSES[node_type].validate_inputs(**{p: value if p == name else None for p in validated})
            assert check is True, f"{where}: {check}"
        else:
            assert value in choices, f"{where}: {value!r} not in {choices}"
        return
    kind = spec[0]
    python_type = {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool}[kind]
    assert isinstance(value, python_type) and (kind == "BOOLEAN" or not isinstance(value, bool)), (where, value)
    if kind in ("INT", "FLOAT"):
        assert options.get("min", -float("inf")) <= value <= options.get("max", float("inf")), (where, value)


def test_the_four_workflows_exist():
    assert {p.name for p in WORKFLOWS} >= REQUIRED


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_matches_the_node_definitions(path, definitions):
    wf = json.loads(path.read_text())
    assert wf["version"] == 0.4 and isinstance(wf["links"], list) and isinstance(wf["nodes"], list)
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", wf["id"])
    by_id = {n["id"]: n for n in wf["nodes"]}
    assert len(by_id) == len(wf["nodes"]) and wf["last_node_id"] >= max(by_id)
    assert not wf["links"] or wf["last_link_id"] >= max(link[0] for link in wf["links"])
    for node in wf["nodes"]:
        where = f"{path.name} node {node['id']} ({node['type']})"
        assert {"id", "type", "pos", "size", "flags", "order", "mode", "properties"} <= set(node), where
        if node["type"] in FRONTEND_ONLY:
            continue
        assert node["type"] in definitions, f"{where}: unknown node type"
        definition = definitions[node["type"]]
        for name, value in widget_values(node, definition).items():
            if name == "device":  # test_saved_devices_pass_validation_on_any_machine
                continue
            spec = dict((n, s) for n, s, _ in inputs_of(definition))[name]
            _check_value(f"{where} {name}", name, spec, value, node["type"])
        sockets = [(n, s[0], req) for n, s, req in inputs_of(definition) if not is_widget(s)]
        assert [(i["name"], i["type"]) for i in node["inputs"]] == [(n, t) for n, t, _ in sockets], where
        for slot, (name, _, required) in zip(node["inputs"], sockets):
            assert not required or slot["link"] is not None, f"{where}: required input {name} is not linked"
        assert [o["type"] for o in node.get("outputs", [])] == list(_outputs(node["type"])), where


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_saved_devices_run_on_any_machine(path, definitions):
    """A workflow saved on two GPUs must run on one GPU or none: a saved device is a device name the nodes resolve
    at run time (falling back to the last GPU or the CPU), and nothing rejects it before: ComfyUI does not check a
    V3 combo's value against its options (test_frontend runs the two-GPU workflow on a CPU-only machine)."""
    from nodes.devices import resolve_device

    wf = json.loads(path.read_text())
    for node in wf["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        definition = definitions[node["type"]]
        device = widget_values(node, definition).get("device")
        if device is not None:
            assert dict((n, s) for n, s, _ in inputs_of(definition))["device"][0] == "COMBO", node_label(node)
            resolve_device(device)  # raises on a malformed name


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_links_connect_matching_types(path):
    wf = json.loads(path.read_text())
    by_id = {n["id"]: n for n in wf["nodes"]}
    for link_id, src, src_slot, dst, dst_slot, type_ in wf["links"]:
        output, target = by_id[src]["outputs"][src_slot], by_id[dst]["inputs"][dst_slot]
        assert output["type"] == target["type"] == type_, f"link {link_id}: {output['type']} -> {target['type']}"
        assert link_id in (output["links"] or []) and target["link"] == link_id, f"link {link_id} is one-sided"
    linked = {i["link"] for n in wf["nodes"] for i in n.get("inputs", []) if i.get("link") is not None}
    assert linked == {link[0] for link in wf["links"]}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_has_an_output_and_a_note_naming_its_files(path, definitions):
    wf = json.loads(path.read_text())
    prompt = to_api(wf, definitions)
    outputs = [n for n in prompt.values() if n["class_type"] in OUTPUT_NODES]
    assert outputs, "ComfyUI refuses a prompt without an output node"
    notes = " ".join(n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "Note")
    used = {v for n in prompt.values() for v in n["inputs"].values() if isinstance(v, str) and v in USER_FILES}
    assert used, "the workflow should name the model files artists have"
    for name in used:
        assert name in notes, f"the note of {path.name} does not say where {name} goes"
    assert "models/" in notes


def test_seed_widgets_carry_the_control_slot(definitions):
    spec = definitions["IAMFlowStreamingSampler"]["required"]["seed"]
    assert has_control("seed", spec)
    wf = json.loads((WORKFLOWS[0].parent / "iamflow_two_gpu.json").read_text())
    sampler = next(n for n in wf["nodes"] if n["type"] == "IAMFlowStreamingSampler")
    assert sampler["widgets_values"][2:4] == [42, "fixed"]


def test_two_gpu_placement():
    wf = json.loads((WORKFLOWS[0].parent / "iamflow_two_gpu.json").read_text())
    devices = {n["type"]: n["widgets_values"] for n in wf["nodes"]}
    assert devices["IAMFlowLoadDiT"][-1] == "cuda:0" and devices["IAMFlowLoadTextEncoder"][3] == "cuda:0"
    assert devices["IAMFlowEntityExtractor"][1] == "cuda:0"
    assert devices["IAMFlowLoadVAE"][-1] == "cuda:1" and devices["IAMFlowVLMVerifier"][-1] == "cuda:1"


# what the artist sees


def _groups_holding(wf: dict, node: dict) -> list[str]:
    rect = node_rect(node["pos"], node["size"])
    return [g["title"] for g in wf["groups"] if rect.inside(Rect(*g["bounding"]))]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_nodes_sit_in_titled_groups_of_their_device(path, definitions):
    """The note at the top left and in no group; every other node in exactly one titled, coloured group; a node
    with a device widget in the group of that GPU ("GPU 0 — …" for cuda:0)."""
    wf = json.loads(path.read_text())
    assert len(wf["groups"]) >= 2 and all(g["title"].strip() and g.get("color") for g in wf["groups"]), wf["groups"]
    (note,) = [n for n in wf["nodes"] if n["type"] == "Note"]
    assert note["pos"] == [min(n["pos"][0] for n in wf["nodes"]), min(n["pos"][1] for n in wf["nodes"])]
    assert not _groups_holding(wf, note), "the note should stand outside the groups"
    for node in wf["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        holding = _groups_holding(wf, node)
        assert len(holding) == 1, f"{path.name}: {node_label(node)} is in {len(holding)} groups: {holding}"
        device = widget_values(node, definitions[node["type"]]).get("device")
        if device is not None:
            gpu = f"GPU {device.removeprefix('cuda:')} — "
            assert holding[0].startswith(gpu), f"{path.name}: {node_label(node)} on {device} is in {holding[0]!r}"


def test_two_gpu_groups_name_what_runs_on_each_gpu():
    wf = json.loads((WORKFLOWS[0].parent / "iamflow_two_gpu.json").read_text())
    titles = {g["title"] for g in wf["groups"]}
    assert {"GPU 0 — DiT · text encoder · LLM", "GPU 1 — VAE · VLM"} <= titles, titles


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_no_two_nodes_overlap(path):
    """Node rectangles as the frontend draws them, title bar included (the frontend test checks again after a run,
    when status texts and previews have made nodes grow)."""
    wf = json.loads(path.read_text())
    assert not overlapping_pairs({node_label(n): node_rect(n["pos"], n["size"]) for n in wf["nodes"]})


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_saved_view_shows_the_whole_graph_at_a_readable_zoom(path):
    """`extra.ds` (LiteGraph: screen = (graph + offset) * scale) puts every node and group inside the canvas of a
    1600x1000 window at a zoom where the frontend's text is readable."""
    wf = json.loads(path.read_text())
    scale, (ox, oy) = wf["extra"]["ds"]["scale"], wf["extra"]["ds"]["offset"]
    assert scale >= READABLE_ZOOM, f"saved zoom {scale}"
    view = Rect(-ox, -oy, CANVAS[0] / scale, CANVAS[1] / scale)  # the visible canvas in graph units
    things = {node_label(n): node_rect(n["pos"], n["size"]) for n in wf["nodes"]}
    things |= {g["title"]: Rect(*g["bounding"]) for g in wf["groups"]}
    assert not [name for name, rect in things.items() if not rect.inside(view)]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_each_workflow_has_a_thumbnail(path):
    """NAME.jpg beside NAME.json is the template browser's card picture (`python -m tests._frontend thumbnails`)."""
    thumbnail = path.with_suffix(".jpg")
    assert thumbnail.is_file(), f"no {thumbnail.name}: run python -m tests._frontend thumbnails"
    with Image.open(thumbnail) as image:
        assert image.format == "JPEG" and image.width >= 256, (image.format, image.size)
        image.verify()
