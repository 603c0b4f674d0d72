"""Finding the model files a user has, and loading them onto devices.

Users keep Wan2.1 files in a ComfyUI `models/` folder (`diffusion_models/`, `text_encoders/`, `vae/`) or as the
original Wan2.1-T2V-1.3B folder. `find_model_files` looks in both layouts under one directory; anything missing is
reported in one message listing every file needed, where it was looked for, and what it is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .models.dit import CausalWanDiT
from .models.vae import WanVAE
from .text_encoder import TextEncoder, load_umt5_tokenizer, umt5_tokenizer_from_spiece

logger = logging.getLogger(__name__)

# name -> (what it is, sub-folders to search, candidate file names in order of preference)
COMPONENTS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "dit": (
        "the streaming Wan2.1-T2V-1.3B DiT (IAMFlow/MemFlow/LongLive/Self-Forcing weights, or the Wan2.1 base)",
        ("diffusion_models", "unet", "iamflow_models", "Wan2.1-T2V-1.3B", "."),
        ("iamflow_fp8.safetensors", "memflow_base.pt", "base.pt", "longlive_base.pt", "self_forcing_dmd.pt",
         "wan2.1_t2v_1.3B_bf16.safetensors", "wan2.1_t2v_1.3B_fp16.safetensors",
         "diffusion_pytorch_model.safetensors"),
    ),
    "text_encoder": (
        "the umT5-XXL text encoder",
        ("text_encoders", "clip", "Wan2.1-T2V-1.3B", "."),
        ("umt5_xxl_fp16.safetensors", "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "models_t5_umt5-xxl-enc-bf16.pth"),
    ),
    "vae": (
        "the Wan2.1 VAE",
        ("vae", "Wan2.1-T2V-1.3B", "."),
        ("wan_2.1_vae.safetensors", "Wan2.1_VAE.pth"),
    ),
}  # fmt: skip
TOKENIZER_FOLDERS = ("google/umt5-xxl", "Wan2.1-T2V-1.3B/google/umt5-xxl", "text_encoders/umt5-xxl", "umt5-xxl")


class MissingModelFiles(FileNotFoundError):
    pass


@dataclass(frozen=True)
class ModelFiles:
    dit: Path
    text_encoder: Path
    vae: Path | None
    tokenizer: Path | None = None  # None: the tokenizer embedded in the text-encoder file
    lora: Path | None = None


def _search(root: Path, component: str) -> Path | None:
    _, folders, names = COMPONENTS[component]
    for name in names:
        for folder in folders:
            candidate = root / folder / name
            if candidate.is_file():
                # the original Wan folder is loaded as a folder: its config.json confirms the dimensions
                return candidate.parent if name == "diffusion_pytorch_model.safetensors" else candidate
    return None


def find_model_files(
    models_dir: str | Path | None, *, dit=None, text_encoder=None, vae=None, tokenizer=None, lora=None,
    need_vae: bool = True,
) -> ModelFiles:  # fmt: skip
    """Resolve each file: an explicit path wins, else the first known name found under `models_dir`."""
    root = Path(models_dir).expanduser() if models_dir else None
    given = {"dit": dit, "text_encoder": text_encoder, "vae": vae}
    found: dict[str, Path | None] = {}
    problems = []
    for component, path in given.items():
        if component == "vae" and not need_vae and path is None:
            found[component] = None
            continue
        if path is not None:
            found[component] = Path(path).expanduser()
            if not found[component].exists():
                problems.append(f"  {component}: {found[component]} does not exist ({COMPONENTS[component][0]})")
            continue
        found[component] = _search(root, component) if root else None
        if found[component] is None:
            what, folders, names = COMPONENTS[component]
            where = f"{root}/{{{','.join(folders)}}}" if root else "(no --models folder given)"
            problems.append(f"  {component}: {what}\n      one of: {', '.join(names)}\n      looked in: {where}")
    if problems:
        raise MissingModelFiles(
            "model files are missing:\n" + "\n".join(problems) + "\nPoint --models at the folder that holds them "
            "(ComfyUI's models/ folder works), or pass each file with --dit / --text-encoder / --vae."
        )
    tok = Path(tokenizer).expanduser() if tokenizer else None
    if tok is None and root is not None:
        tok = next((root / f for f in TOKENIZER_FOLDERS if (root / f).is_dir()), None)
    return ModelFiles(found["dit"], found["text_encoder"], found["vae"], tok, Path(lora) if lora else None)


def load_text_encoder(files: ModelFiles, device: str | torch.device, dtype: torch.dtype) -> TextEncoder:
    from . import weights

    encoder = weights.load_t5(files.text_encoder, dtype=dtype, device=device)
    if files.tokenizer is not None:
        tokenizer = load_umt5_tokenizer(files.tokenizer)
    else:
        embedded = weights.read_embedded_tokenizer(files.text_encoder)
        if embedded is None:
            raise MissingModelFiles(
                f"no tokenizer: {files.text_encoder} has none embedded; pass --tokenizer with the google/umt5-xxl "
                "folder of the Wan2.1-T2V-1.3B download (spiece.model or tokenizer.json)"
            )
        tokenizer = umt5_tokenizer_from_spiece(embedded, source=str(files.text_encoder))
    return TextEncoder(encoder, tokenizer, device=device)


def load_models(
    files: ModelFiles, *, device: str = "cuda:0", vae_device: str | None = None, text_device: str | None = None,
    dtype: torch.dtype = torch.bfloat16, quantization: str = "auto", attention: str = "auto",
) -> tuple[CausalWanDiT, TextEncoder, WanVAE | None]:  # fmt: skip
    """Load the DiT (with LoRA), the text encoder and the VAE onto their devices."""
    from . import weights
    from .models.attention import resolve_backend

    dit = weights.load_dit(files.dit, lora=files.lora, dtype=dtype, device=device, quantization=quantization)
    dit.attention_backend = resolve_backend(attention)
    text_encoder = load_text_encoder(files, text_device or device, dtype)
    vae = weights.load_vae(files.vae, dtype=dtype, device=vae_device or device) if files.vae else None
    return dit, text_encoder, vae
