"""Every workflows/*.json checked statically against the node definitions, the way ComfyUI's frontend loads it
and ComfyUI's /prompt validates it: known node types, widget values that fit their options and bounds, sockets and
links of matching types, every required input linked or set, an output node, and a note naming the model files.
"""

import inspect
import json
import re
from pathlib import Path

import pytest

from tests import _comfy_stub

_comfy_stub.install()

import nodes  # noqa: E402
from tests._comfy_models import write_tiny_models  # noqa: E402
from tests._comfy_workflows import (  # noqa: E402
    CORE_NODES,
    FRONTEND_ONLY,
    OUTPUT_NODES,
    has_control,
    inputs_of,
    is_widget,
    to_api,
    widget_values,
)

WORKFLOWS = sorted((Path(__file__).resolve().parent.parent / "workflows").glob("*.json"))
REQUIRED = {"iamflow_two_gpu.json", "iamflow_one_gpu.json", "streaming_story_plain.json", "memflow_baseline.json"}
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
    return {name: cls.INPUT_TYPES() for name, cls in nodes.NODE_CLASS_MAPPINGS.items()} | CORE_NODES


def _outputs(type_: str) -> tuple[str, ...]:
    return nodes.NODE_CLASS_MAPPINGS[type_].RETURN_TYPES if type_ in nodes.NODE_CLASS_MAPPINGS else ()


def _check_value(where: str, name: str, spec: tuple, value, node_type: str) -> None:
    options = spec[1] if len(spec) > 1 else {}
    cls = nodes.NODE_CLASS_MAPPINGS.get(node_type)
    validated = inspect.signature(cls.VALIDATE_INPUTS).parameters if hasattr(cls, "VALIDATE_INPUTS") else {}
    if isinstance(spec[0], (list, tuple)):
        if name in validated:  # ComfyUI skips the list check for these and asks VALIDATE_INPUTS instead
            assert cls.VALIDATE_INPUTS(**{p: value if p == name else None for p in validated}) is True, where
        else:
            assert value in spec[0], f"{where}: {value!r} not in {spec[0]}"
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
            spec = dict((n, s) for n, s, _ in inputs_of(definition))[name]
            _check_value(f"{where} {name}", name, spec, value, node["type"])
        sockets = [(n, s[0], req) for n, s, req in inputs_of(definition) if not is_widget(s)]
        assert [(i["name"], i["type"]) for i in node["inputs"]] == [(n, t) for n, t, _ in sockets], where
        for slot, (name, _, required) in zip(node["inputs"], sockets):
            assert not required or slot["link"] is not None, f"{where}: required input {name} is not linked"
        assert [o["type"] for o in node.get("outputs", [])] == list(_outputs(node["type"])), where


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
