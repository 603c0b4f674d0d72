"""The image encoders of the eval: DINO (subject consistency, long-range consistency) and CLIP (background
consistency), loaded with transformers from local folders only, never from the hub.

The benchmark uses DINO ViT-B/16 (the CLS token, short side resized to 224, no crop, ImageNet mean/std) and
OpenAI CLIP ViT-B/32 image features (short side 224 bicubic, centre crop 224, CLIP mean/std), both L2-normalised
(models/dino_encoder.py, models/clip_encoder.py, utils/video_primitives.py). The transformers folders
`facebook/dino-vitb16` and `openai/clip-vit-base-patch32` hold those weights; DINOv2 folders work too (a
different model, so different numbers). The resize, crop and normalisation run on the encoder's device, batched;
the mean, std and CLIP's sizes come from the folder's `preprocessor_config.json`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .inputs import EvalError
from .settings import BenchSettings

# model_type of the folder's config.json -> the forward arguments its CLS token needs on non-square frames
DINO_TYPES = {"vit": {"interpolate_pos_encoding": True}, "dinov2": {}, "dinov2_with_registers": {}}
CLIP_TYPES = ("clip", "clip_vision_model")
_EXPECT = {
    "dino": "a DINO model folder saved by transformers (config.json, model weights, preprocessor_config.json), "
    "e.g. a download of facebook/dino-vitb16 (the benchmark's DINO ViT-B/16) or a DINOv2 model",
    "clip": "a CLIP model folder saved by transformers (config.json, model weights, preprocessor_config.json), "
    "e.g. a download of openai/clip-vit-base-patch32 (the benchmark's ViT-B/32)",
}


@dataclass(frozen=True)
class Preprocess:
    """uint8 frames [B, H, W, 3] -> normalised float [B, 3, h, w]: short side to `short_side`, optional centre
    crop (height, width), then (x / 255 - mean) / std."""

    short_side: int
    crop: tuple[int, int] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mode: str  # interpolation: bilinear (DINO, torchvision's default) or bicubic (CLIP)

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames.permute(0, 3, 1, 2).float() / 255.0
        h, w = x.shape[-2:]
        scale = self.short_side / min(h, w)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        x = F.interpolate(x, size=size, mode=self.mode, align_corners=False, antialias=True).clamp(0.0, 1.0)
        if self.crop is not None:
            ch, cw = self.crop
            top, left = max(0, (size[0] - ch) // 2), max(0, (size[1] - cw) // 2)
            x = x[..., top : top + ch, left : left + cw]
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


class ImageEncoder:
    """A frozen image model and its preprocessing: `encode(frames)` gives L2-normalised features [B, D]."""

    def __init__(
        self, model: torch.nn.Module, preprocess: Preprocess, device: torch.device, head: Callable, kwargs: dict
    ):
        """head(model output) -> [B, D] features; kwargs: extra forward arguments."""
        self.model, self.preprocess, self.device = model.eval().to(device), preprocess, device
        self.head, self.kwargs = head, kwargs

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """frames: uint8 [B, H, W, 3] (any device) -> float32 [B, D] on the CPU, unit length."""
        pixels = self.preprocess(frames.to(self.device))
        out = self.model(pixel_values=pixels, **self.kwargs)
        return F.normalize(self.head(out).float(), dim=-1).cpu()


def _folder_config(flag: str, folder: str | Path) -> tuple[Path, dict, dict]:
    """The folder, its config.json and preprocessor_config.json, or one clear error naming the flag."""
    path = Path(folder).expanduser()
    kind = flag.lstrip("-")
    if not path.is_dir():
        raise EvalError(f"{flag} {path}: no such folder; expected {_EXPECT[kind]}")
    texts = {}
    for name in ("config.json", "preprocessor_config.json"):
        if not (path / name).is_file():
            raise EvalError(f"{flag} {path}: no {name} in it; expected {_EXPECT[kind]}")
        try:
            texts[name] = json.loads((path / name).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise EvalError(f"{flag} {path}: {name} is not JSON ({e.msg}); download the folder again") from None
    return path, texts["config.json"], texts["preprocessor_config.json"]


def _stats(flag: str, path: Path, proc: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean, std = proc.get("image_mean"), proc.get("image_std")
    if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == 3):
        raise EvalError(f"{flag} {path}: preprocessor_config.json has no 3-channel image_mean/image_std")
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _load(flag: str, path: Path, load):
    """Call `load()` (a from_pretrained with local_files_only) with its failures turned into one clear error.
    transformers' load report is kept quiet: the text half of a whole CLIP folder is left out on purpose."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return load()
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EvalError(f"{flag} {path}: the model does not load ({first}); expected {_EXPECT[flag[2:]]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def _model_type(flag: str, path: Path, config: dict, types) -> str:
    """The folder's model_type, one of `types`; else one clear error naming the flag, the folder and what fits."""
    kind = config.get("model_type")
    if kind not in types:
        raise EvalError(
            f"{flag} {path}: config.json says model_type {kind!r}, not one of {', '.join(types)}; "
            f"expected {_EXPECT[flag[2:]]}"
        )
    return kind


def load_dino(folder: str | Path, device: torch.device, s: BenchSettings) -> ImageEncoder:
    """The DINO encoder of the folder given by --dino (a ViT DINO or DINOv2 folder)."""
    from transformers import AutoModel

    path, config, proc = _folder_config("--dino", folder)
    kind = _model_type("--dino", path, config, DINO_TYPES)
    model = _load("--dino", path, lambda: AutoModel.from_pretrained(path, local_files_only=True))
    mean, std = _stats("--dino", path, proc)
    preprocess = Preprocess(s.dino_input_size, None, mean, std, "bilinear")
    return ImageEncoder(model, preprocess, device, lambda out: out.last_hidden_state[:, 0], DINO_TYPES[kind])


def _clip_sizes(path: Path, proc: dict) -> tuple[int, tuple[int, int] | None]:
    size, crop = proc.get("size") or {}, proc.get("crop_size") or {}
    short = size.get("shortest_edge") if isinstance(size, dict) else size
    if not isinstance(short, int):
        raise EvalError(f"--clip {path}: preprocessor_config.json has no size.shortest_edge; expected a CLIP one")
    if not proc.get("do_center_crop", True):
        return short, None
    crop = (crop.get("height", short), crop.get("width", short)) if isinstance(crop, dict) else (crop, crop)
    return short, crop


def load_clip(folder: str | Path, device: torch.device, s: BenchSettings) -> ImageEncoder:
    """The CLIP image encoder (with its projection) of the folder given by --clip: a whole CLIP model or its
    vision half."""
    from transformers import CLIPConfig, CLIPVisionConfig, CLIPVisionModelWithProjection

    path, config, proc = _folder_config("--clip", folder)
    kind = _model_type("--clip", path, config, CLIP_TYPES)
    if kind == "clip":  # the vision half of a whole CLIP folder, with the projection size of the whole
        whole = _load("--clip", path, lambda: CLIPConfig.from_pretrained(path, local_files_only=True))
        vision = CLIPVisionConfig(**{**whole.vision_config.to_dict(), "projection_dim": whole.projection_dim})
    else:
        vision = _load("--clip", path, lambda: CLIPVisionConfig.from_pretrained(path, local_files_only=True))
    model = _load(
        "--clip",
        path,
        lambda: CLIPVisionModelWithProjection.from_pretrained(path, config=vision, local_files_only=True),
    )
    short, crop = _clip_sizes(path, proc)
    mean, std = _stats("--clip", path, proc)
    preprocess = Preprocess(short, crop, mean, std, "bicubic")
    return ImageEncoder(model, preprocess, device, lambda out: out.image_embeds, {})
