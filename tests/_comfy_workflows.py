"""Reading UI-format workflows (what ComfyUI's frontend saves, schema 0.4) against node definitions, and turning
them into the API ("prompt") form that ComfyUI's /prompt takes.

A node definition here is ComfyUI's `INPUT_TYPES()` shape: {"required": {name: (type, options)}, "optional": ...}.
In the UI form, `widgets_values` lists the widget inputs (combos and INT/FLOAT/STRING/BOOLEAN) in definition
order; an INT with `control_after_generate` (or named seed/noise_seed) is followed by one extra slot holding the
control mode. Socket inputs are `inputs` entries, linked through `links` ([id, from, from_slot, to, to_slot, type]).
"""

from __future__ import annotations

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
CONTROL_MODES = ("fixed", "increment", "decrement", "randomize")
# Core nodes the workflows use, as ComfyUI defines them (the same in March 2024 and today).
CORE_NODES = {
    "SaveAnimatedWEBP": {
        "required": {
            "images": ("IMAGE",),
            "filename_prefix": ("STRING", {"default": "ComfyUI"}),
            "fps": ("FLOAT", {"default": 6.0, "min": 0.01, "max": 1000.0, "step": 0.01}),
            "lossless": ("BOOLEAN", {"default": True}),
            "quality": ("INT", {"default": 80, "min": 0, "max": 100}),
            "method": (["default", "fastest", "slowest"],),
        }
    },
}
# LoadImage of ComfyUI 0.3.64 (nodes.py), its choices being the pictures the example workflows name: the files in
# the input folder.
PICTURES = ["iamflow_ethan.png", "iamflow_first_shot.png", "iamflow_nora.png"]
CORE_NODES["LoadImage"] = {"required": {"image": (PICTURES, {"image_upload": True})}}
CORE_OUTPUTS = {"SaveAnimatedWEBP": (), "LoadImage": ("IMAGE", "MASK")}
OUTPUT_NODES = {"SaveAnimatedWEBP"}
FRONTEND_ONLY = {"Note", "MarkdownNote"}  # drawn by the frontend; never sent to the server


def is_widget(spec) -> bool:
    return isinstance(spec[0], (list, tuple)) or spec[0] in WIDGET_TYPES


def combo_options(spec) -> list | None:
    """The choices of a combo input: a V1 list type, or a V3 "COMBO" with `options`; None for other inputs."""
    if isinstance(spec[0], (list, tuple)):
        return list(spec[0])
    if spec[0] == "COMBO":
        return list(spec[1].get("options", []))
    return None


def has_control(name: str, spec) -> bool:
    options = spec[1] if len(spec) > 1 else {}
    return spec[0] == "INT" and bool(options.get("control_after_generate") or name in ("seed", "noise_seed"))


def inputs_of(definition: dict) -> list[tuple[str, tuple, bool]]:
    """(name, spec, required) for every input, in definition order (required first)."""
    return [
        (name, tuple(spec), section == "required")
        for section in ("required", "optional")
        for name, spec in definition.get(section, {}).items()
    ]


def widget_values(node: dict, definition: dict) -> dict:
    """The node's widget values by input name (the control-mode slot dropped). Raises ValueError on a count that
    does not fit the definition."""
    values, named = list(node.get("widgets_values", [])), {}
    for name, spec, _ in inputs_of(definition):
        if not is_widget(spec):
            continue
        if not values:
            raise ValueError(f"node {node['id']} ({node['type']}): no widget value for {name!r}")
        named[name] = values.pop(0)
        if len(spec) > 1 and spec[1].get("image_upload"):  # the frontend's upload button keeps a slot: "image"
            if not values or values[0] != "image":
                raise ValueError(f"node {node['id']} ({node['type']}): {name!r} needs the upload slot after it")
            values.pop(0)
        if has_control(name, spec):
            if not values or values[0] not in CONTROL_MODES:
                raise ValueError(f"node {node['id']} ({node['type']}): {name!r} needs a control mode slot after it")
            values.pop(0)
    if values:
        raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget values too many: {values}")
    return named


def to_api(workflow: dict, definitions: dict) -> dict:
    """UI-format workflow -> API prompt {id: {"class_type", "inputs", "_meta"}} (muted/bypassed nodes dropped)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) in (2, 4):
            continue
        inputs = widget_values(node, definitions[node["type"]])
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                link = links[slot["link"]]
                inputs[slot["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {
            "class_type": node["type"], "inputs": inputs, "_meta": {"title": node.get("title", node["type"])}
        }  # fmt: skip
    return prompt
