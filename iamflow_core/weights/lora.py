"""LoRA files, read as {DiT weight key: (A, B, factor)} to be merged into the DiT at load.

Accepted: PEFT (`lora_A`/`lora_B`, optionally with an adapter name; a folder with `adapter_model.safetensors` and
`adapter_config.json`), kohya-style `lora_down`/`lora_up` + `alpha` keys, and the `generator_lora` entry of
LongLive/MemFlow `lora.pt`. The key names are those of the `LORA` row of `layouts`. A LoRA is merged as
W += lora_scale * alpha / rank * B @ A, alpha from `adapter_config.json`, else `.alpha` keys, else alpha = rank.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .layouts import LORA, normalize
from .reading import CheckpointError, PathLike, Source, examples, open_source, read_json

# <module>.<kind>[.<adapter name>].weight, kind one of the LORA row's detecting keys
_LORA_PART = re.compile(rf"^(?P<module>.+?)\.(?P<kind>{'|'.join(LORA.detect)})(?:\.[^.]+)?\.weight$")
_DOWN = ("lora_A", "lora_down")  # A [rank, in]; the others are B [out, rank]


@dataclass(frozen=True)
class LoraPair:
    down: torch.Tensor  # A [rank, in]
    up: torch.Tensor  # B [out, rank]
    factor: float  # lora_scale * alpha / rank

    def delta(self) -> torch.Tensor:
        """scale * (alpha / rank) * B @ A [out, in] in float32."""
        return self.factor * (self.up.float() @ self.down.float())


def read_lora(path: PathLike, scale: float, base_shapes: dict[str, tuple[int, ...]]) -> dict[str, LoraPair]:
    """A LoRA file or folder as {our weight key: pair}; base_shapes: the DiT's state dict shapes."""
    path = Path(path).expanduser()
    files = _lora_files(path)
    source = open_source(files, path, prefer=("generator_lora", "lora", "state_dict"))
    config = _adapter_config(files[0].parent)
    parts, alphas = _lora_keys(source, path)
    no_base = sorted(m for m in parts if m + ".weight" not in base_shapes)
    if no_base:
        raise CheckpointError(
            f"{path}: {len(no_base)} LoRA modules match no weight of the DiT, e.g. {', '.join(no_base[:4])}; "
            f"expected module names like blocks.0.self_attn.q"
        )
    pairs = {}
    for module, kinds in parts.items():
        if set(kinds) != {"down", "up"}:
            raise CheckpointError(f"{path}: LoRA module {module} has only its {next(iter(kinds))} matrix")
        down, up = source.read(kinds["down"]), source.read(kinds["up"])
        out_in = base_shapes[module + ".weight"]
        if down.dim() != 2 or up.dim() != 2 or (up.shape[0], down.shape[1]) != out_in or up.shape[1] != down.shape[0]:
            raise CheckpointError(
                f"{path}: LoRA for {module} has A {list(down.shape)} and B {list(up.shape)}, which do not fit the "
                f"weight {list(out_in)} (expected A [rank, {out_in[-1]}], B [{out_in[0]}, rank])"
            )
        rank = down.shape[0]
        alpha = config.get("lora_alpha")
        if alpha is None:
            alpha = float(source.read(alphas[module])) if module in alphas else rank
        ratio = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        pairs[module + ".weight"] = LoraPair(down, up, scale * ratio)
    return pairs


def _lora_files(path: Path) -> list[Path]:
    if not path.exists():
        raise CheckpointError(f"no such LoRA file or folder: {path}")
    if not path.is_dir():
        return [path]
    files = sorted(path.glob("adapter_model.safetensors")) or sorted(path.glob("adapter_model.bin"))
    if not files:
        raise CheckpointError(f"no LoRA found in the folder {path}: expected adapter_model.safetensors")
    return files


def _lora_keys(source: Source, path: Path) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """({module: {"down"|"up": stored key}}, {module: stored key of its alpha}); refuses any other key."""
    parts: dict[str, dict[str, str]] = {}
    alphas: dict[str, str] = {}
    unknown = []
    for raw in source.shapes:
        name = normalize(raw)
        match = _LORA_PART.match(name)
        if match:
            kind = "down" if match["kind"] in _DOWN else "up"
            parts.setdefault(_lora_module_name(match["module"]), {})[kind] = raw
        elif name.endswith(".alpha"):
            alphas[_lora_module_name(name[: -len(".alpha")])] = raw
        else:
            unknown.append(raw)
    if unknown or not parts:
        found = f"keys such as {examples(unknown)}" if unknown else "no lora_A/lora_B (or lora_down/lora_up) keys"
        raise CheckpointError(
            f"{path} is not a LoRA IAMFlow understands: found {found}; expected PEFT keys like "
            f"base_model.model.blocks.0.self_attn.q.lora_A.weight / .lora_B.weight"
        )
    return parts, alphas


def _lora_module_name(name: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in LORA.prefixes:
            if name.startswith(prefix):
                name, stripped = name[len(prefix) :], True
    return LORA.rename.key(name + ".")[:-1]  # the rules match names followed by a dot


def _adapter_config(folder: Path) -> dict:
    """PEFT's adapter_config.json next to the LoRA file (lora_alpha, use_rslora), or {}."""
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        return {}
    config = read_json(config_file)
    if config.get("alpha_pattern") or config.get("rank_pattern"):
        raise CheckpointError(f"{config_file}: per-module alpha_pattern/rank_pattern are not supported")
    return config
