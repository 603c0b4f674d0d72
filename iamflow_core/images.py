"""Pictures a user gives: a start image (the first frame of the video) and entity reference images.

A picture is read as uint8 RGB ``[H, W, 3]`` (`load_image` from a file, `as_rgb` from an array such as ComfyUI's
IMAGE), fitted to the video size by scaling it until it covers the frame and cropping the centre (`fit`: nothing
is stretched, the overhang is cut off evenly on both sides), and encoded by the VAE as one latent frame (`encode`),
the way the causal Wan VAE codes the first frame of a video on its own.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path

import numpy as np
import torch

from .models import fused
from .models.vae import WanVAE

MIN_SIDE = 32  # pixels: a smaller picture holds nothing to keep


class ImageError(ValueError):
    """A picture that cannot be used: the message names it, what is wrong and what to give instead."""


def load_image(path: str | PathLike[str], what: str) -> np.ndarray:
    """The picture at `path` as uint8 RGB [H, W, 3] (grey, palette and alpha images are converted; alpha is
    dropped). `what` names the picture in errors, e.g. "start image" or "reference image of Rosa"."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path).expanduser()
    if not path.is_file():
        where = "is a folder" if path.is_dir() else "does not exist"
        raise ImageError(f"{what} {path} {where}; give the path of a .png, .jpg or .webp file")
    try:
        with Image.open(path) as picture:
            rgb = np.asarray(picture.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise ImageError(f"{what} {path} is not an image PIL can read ({e}); save it as .png or .jpg") from e
    return check_size(rgb, f"{what} {path}")


def as_rgb(image: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
    """An array picture as uint8 RGB [H, W, 3]: uint8 [H, W, 3], or floats in [0, 1] (ComfyUI's IMAGE, [H, W, 3]
    or a batch [1, H, W, 3])."""
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3 or array.shape[-1] != 3:
        shape = "x".join(str(s) for s in array.shape)
        channels = f"{array.shape[-1]} channels" if array.ndim == 3 else f"{array.ndim} dimensions"
        raise ImageError(f"{what} is {shape} ({channels}); give one RGB picture, [height, width, 3]")
    if array.dtype != np.uint8:
        if not np.isfinite(array).all():
            raise ImageError(f"{what} holds NaN or infinite values; give a picture with values in [0, 1]")
        array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return check_size(array, what)


def check_size(rgb: np.ndarray, what: str) -> np.ndarray:
    height, width = rgb.shape[:2]
    if min(height, width) < MIN_SIDE:
        raise ImageError(
            f"{what} is {width}x{height} pixels; give a picture at least {MIN_SIDE} pixels on each side (it is "
            "scaled to the video size)"
        )
    return rgb


def fit(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scale `rgb` until it covers height x width, keeping its shape, then crop the centre to exactly that."""
    from PIL import Image

    h, w = rgb.shape[:2]
    scale = max(height / h, width / w)
    size = (max(width, round(w * scale)), max(height, round(h * scale)))
    scaled = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS)) if size != (w, h) else rgb
    top, left = (scaled.shape[0] - height) // 2, (scaled.shape[1] - width) // 2
    return np.ascontiguousarray(scaled[top : top + height, left : left + width])


def encode(vae: WanVAE, rgb: np.ndarray, height: int, width: int) -> torch.Tensor:
    """The picture, fitted to height x width, as one normalized latent frame [1, C, 1, h, w] (float32, on the
    VAE's device)."""
    pixels = torch.tensor(fit(rgb, height, width), device=vae.device)
    video = pixels.permute(2, 0, 1)[None, :, None].to(vae.dtype) / 127.5 - 1.0  # [1, 3, 1, H, W] in [-1, 1]
    with torch.no_grad(), fused.launch_guard():
        return vae.encode(video).float()
