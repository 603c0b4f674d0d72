"""From a checkpoint path to a read plan: which layout the file holds and which stored tensor becomes each of our
keys, checked against the model's shapes before any tensor data is read; then reading every tensor once.

`make_plan` resolves the path (`folders.resolve`), opens the file (`reading`), recognises the layout from the
table in `layouts` and maps every key to its Wan name. `check_keys` compares the plan with a model's state dict
shapes; `materialize` reads, dequantizes or keeps FP8, merges a LoRA, casts and moves each tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.fp8 import quantize_rows_fp8
from .folders import resolve
from .layouts import DROPPED_KEYS, DROPPED_SUFFIXES, EXPECTED, LABELS, LAYOUTS, LORA, SCALE_SUFFIXES, Layout, normalize
from .lora import LoraPair
from .reading import FP8_DTYPES, CheckpointError, PathLike, Source, examples, open_source


@dataclass(frozen=True)
class CheckpointInfo:
    """What was read and how it was recognised.

    layout: "wan" (original Wan key names: ComfyUI repackaged files, Wan folders and `.pth` files, training
    checkpoints), "diffusers", "hf-umt5" (Hugging Face T5 names, as ComfyUI's text-encoder files), each with
    "-fp8" appended when float8 weights were found.
    """

    path: str
    component: str  # "dit" | "t5" | "vae"
    layout: str
    files: tuple[str, ...]
    key_prefix: str = ""  # stripped from every key, e.g. "model." or "model.diffusion_model."
    state_key: str | None = None  # the sub-dictionary of a training checkpoint, e.g. "generator_ema"
    fp8: bool = False  # float8 weights in the file
    fp8_modules: int = 0  # linears kept in FP8 (FP8Linear) after loading
    lora: str | None = None
    lora_modules: int = 0


# --- recognising what a file holds ---------------------------------------------------------------------------------


def survey(names: list[str]) -> list[tuple[Layout, str]]:
    """Every (layout, prefix) of a model layout whose detecting key appears among `names`, in table order."""
    found: list[tuple[Layout, str]] = []
    for layout in LAYOUTS:
        if layout is LORA:  # LoRA keys end module names; a LoRA is never the model asked for
            continue
        for key in layout.detect:
            for name in names:
                prefix = layout.prefix(name, key)
                if prefix is not None and not any(f.component == layout.component and p == prefix for f, p in found):
                    found.append((layout, prefix))
    return found


def locate(source: Source, names: dict[str, str], component: str) -> tuple[Layout, str]:
    """(layout, prefix) of `component` in the source, or a CheckpointError saying what the file is."""
    surveyed = survey(list(names))
    for layout, prefix in surveyed:
        if layout.component == component:
            return layout, prefix
    path = source.path
    where = f" (from its '{source.state_key}' entry)" if source.state_key else ""
    lora_keys = [n for n in names if LORA.detects(n)]
    if lora_keys:
        raise CheckpointError(
            f"{path}{where} is a LoRA, not a full model: found {len(lora_keys)} LoRA keys such as "
            f"{examples(lora_keys, 2)}; pass it as `lora=` together with the base DiT. {EXPECTED[component]}"
        )
    if surveyed:
        other, prefix = surveyed[0][0].component, surveyed[0][1]
        keys = [n for n in names if n.startswith(prefix)]
        raise CheckpointError(
            f"{path}{where} is a {LABELS[other]} file, not a {LABELS[component]} file: found {len(keys)} "
            f"{LABELS[other]} keys such as {examples(k[len(prefix) :] for k in keys)}; {EXPECTED[component]}"
        )
    raise CheckpointError(
        f"{path}{where} is not a model IAMFlow knows: found {len(names)} keys such as {examples(names)}; "
        f"{EXPECTED[component]}"
    )


# --- a read plan: our key -> source tensor, checked before data is read --------------------------------------------


@dataclass
class Plan:
    source: Source
    layout: Layout
    prefix: str
    refs: dict[str, str]  # our key -> source key
    scales: dict[str, str]  # our weight key -> source key of its FP8 scale

    @property
    def path(self) -> Path:
        return self.source.path

    def shape(self, key: str) -> tuple[int, ...]:
        return self.source.shapes[self.refs[key]]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Our key -> its stored shape, for every key of the plan."""
        return {key: self.shape(key) for key in self.refs}

    def is_fp8(self, key: str) -> bool:
        return self.source.dtypes[self.refs[key]] in FP8_DTYPES

    def refuse(self) -> None:
        """Run the layout's refusals on the plan's shapes (raises for models IAMFlow cannot stream)."""
        shapes = self.shapes()
        for refusal in self.layout.refusals:
            refusal(self.path, shapes)

    def read(self, key: str) -> torch.Tensor:
        """The tensor as stored, FP8 weights dequantized to float32."""
        return self.dequantized(key, self.source.read(self.refs[key]))

    def dequantized(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` (the stored `key`, on any device) as float32 if it is an FP8 weight, else as it is."""
        if tensor.dtype not in FP8_DTYPES:
            return tensor
        scale = self._scale(key)
        if scale is None:
            return tensor.float()
        return tensor.float() * _broadcast_scale(scale, tensor.shape).to(tensor.device)

    def read_fp8(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """An FP8 weight as stored with its per-output-channel scale [out, 1] float32."""
        tensor = self.source.read(self.refs[key])
        scale = self._scale(key)
        out = tensor.shape[0]
        scale = torch.ones(out, 1) if scale is None else _broadcast_scale(scale, (out, 1)).expand(out, 1)
        return tensor, scale.float().contiguous()

    def _scale(self, key: str) -> torch.Tensor | None:
        return self.source.read(self.scales[key]).float() if key in self.scales else None


def _broadcast_scale(scale: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if scale.numel() == 1:
        return scale.reshape(())
    return scale.reshape(shape[0], *([1] * (len(shape) - 1)))


def _normalized_names(source: Source, path: Path) -> dict[str, str]:
    """Key names without training wrappers -> the names stored in the file."""
    names: dict[str, str] = {}
    for raw in source.shapes:
        name = normalize(raw)
        if name in names:
            raise CheckpointError(f"{path}: keys {names[name]} and {raw} name the same tensor")
        names[name] = raw
    return names


def make_plan(path: PathLike, component: str, prefer: tuple[str, ...] = ()) -> tuple[Plan, dict]:
    """Open a checkpoint, find `component` in it and map its keys to our names. Returns (plan, folder config)."""
    path, files, config = resolve(path, component)
    source = open_source(files, path, prefer)
    names = _normalized_names(source, path)
    layout, prefix = locate(source, names, component)
    rename = layout.rename.for_file([name[len(prefix) :] for name in names if name.startswith(prefix)])
    plan = Plan(source, layout, prefix, {}, {})
    for name, raw in names.items():
        if not name.startswith(prefix) or name.endswith(DROPPED_SUFFIXES) or name[len(prefix) :] in DROPPED_KEYS:
            continue
        key = rename(name[len(prefix) :])
        scale_suffix = next((s for s in SCALE_SUFFIXES if key.endswith(s)), None)
        if scale_suffix:
            plan.scales[key[: -len(scale_suffix)] + ".weight"] = raw
        elif key in plan.refs:  # HF T5 files may hold the tied embedding twice
            if source.shapes[plan.refs[key]] != source.shapes[raw]:
                raise CheckpointError(f"{path}: {plan.refs[key]} and {raw} both map to {key} with different shapes")
        else:
            plan.refs[key] = raw
    for key in plan.scales:
        if key not in plan.refs or not plan.is_fp8(key):
            raise CheckpointError(f"{path}: {plan.scales[key]} is a scale for {key}, which is not a float8 weight")
    return plan, config


def block_indices(plan: Plan) -> list[int]:
    """The indices of the `blocks.<i>.` found among our keys, sorted."""
    return sorted({int(k.split(".")[1]) for k in plan.refs if re.match(r"blocks\.\d+\.", k)})


def check_keys(plan: Plan, expected: dict[str, tuple[int, ...]], extra: dict[str, tuple[int, ...]], what: str) -> None:
    """Compare the plan (plus derived keys `extra`) with a model's state dict shapes; raise listing differences."""
    present = plan.shapes() | extra
    missing = sorted(set(expected) - set(present))
    unexpected = sorted(set(present) - set(expected))
    wrong = sorted(k for k in set(expected) & set(present) if tuple(expected[k]) != tuple(present[k]))
    if not (missing or unexpected or wrong):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys, e.g. {', '.join(missing[:4])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys, e.g. {', '.join(unexpected[:4])}")
    if wrong:
        shown = "; ".join(f"{k}: file {list(present[k])}, model {list(expected[k])}" for k in wrong[:3])
        problems.append(f"{len(wrong)} tensors with wrong shapes, e.g. {shown}")
    raise CheckpointError(f"{plan.path} does not match {what}: {'; '.join(problems)}")


def checkpoint_info(plan: Plan, **extra: object) -> CheckpointInfo:
    """What was read: the plan's file, layout (with "-fp8" when float8 weights were found) and prefix."""
    fp8 = any(plan.is_fp8(k) for k in plan.refs)
    return CheckpointInfo(
        path=str(plan.path), component=plan.layout.component, layout=plan.layout.name + ("-fp8" if fp8 else ""),
        files=tuple(map(str, plan.source.files)), key_prefix=plan.prefix, state_key=plan.source.state_key, fp8=fp8,
        **extra,
    )  # fmt: skip


# --- reading every tensor once -------------------------------------------------------------------------------------


def materialize(
    plan: Plan, fp8_modules: set[str], lora: dict[str, LoraPair], dtype: torch.dtype | None, device: torch.device
) -> dict[str, torch.Tensor]:
    """Read every tensor once: dequantize or keep FP8, merge the LoRA in float32, cast, move. The tensors taken as
    stored are streamed onto the device (`Source.stream`); those kept in FP8 or given a LoRA are read one by one."""
    state = {}
    kept_fp8 = {k for k in plan.refs if k.rsplit(".", 1)[0] in fp8_modules and k.endswith(".weight")}
    streamed = [k for k in plan.refs if k not in kept_fp8 and k not in lora]
    for key, tensor in zip(streamed, plan.source.stream([plan.refs[k] for k in streamed], device), strict=True):
        state[key] = _cast(plan.dequantized(key, tensor), _target(plan, key, dtype), device)
    for key in plan.refs:
        pair = lora.get(key)
        if key in kept_fp8:
            if plan.is_fp8(key) and pair is None:
                weight, scale = plan.read_fp8(key)
            else:  # a high-precision weight to quantize, or an FP8 weight that takes a LoRA first
                weight, scale = quantize_rows_fp8(_merged(plan, key, pair))
            state[key], state[key.rsplit(".", 1)[0] + ".weight_scale"] = weight.to(device), scale.to(device)
        elif pair is not None:
            state[key] = _cast(_merged(plan, key, pair), _target(plan, key, dtype), device)
    return state


def _target(plan: Plan, key: str, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype `key` is loaded in: `dtype`, else as stored (bfloat16 for FP8 weights dequantized)."""
    stored = plan.source.dtypes[plan.refs[key]]
    return dtype or (torch.bfloat16 if stored in FP8_DTYPES else stored)


def _merged(plan: Plan, key: str, pair: LoraPair | None) -> torch.Tensor:
    weight = plan.read(key)
    return weight.float() + pair.delta() if pair is not None else weight


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    if dtype is None or not tensor.is_floating_point() or tensor.dtype in FP8_DTYPES or tensor.dtype == dtype:
        return tensor.to(device=device)
    if device.type == "cuda":
        # Moved first, converted there: a blocking `.to(cuda, dtype)` converts on the CPU (umT5's 11 GB of fp16 to
        # bf16). The same rounding either way; the GPU holds one tensor twice for a moment.
        return tensor.to(device=device).to(dtype)
    return tensor.to(device=device, dtype=dtype)
