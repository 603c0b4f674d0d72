"""Model folders: ComfyUI's own (`diffusion_models`, `text_encoders`, `vae`, `loras`) plus `LLM` for the Hugging
Face folders of the entity extractor and the verifier. Dropdowns list what is there; a missing file or folder
gives a message naming the folder, the name and what to do."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import folder_paths

logger = logging.getLogger(__name__)

LLM = "LLM"
NONE = "None"
EMBEDDED = "embedded in the text encoder file"
# ComfyUI before mid-2024 named these folders `unet` and `clip`; newer ComfyUI maps both old names onto these keys.
_ALIASES = {"diffusion_models": "unet", "text_encoders": "clip"}
DOWNLOADS = {
    "diffusion_models": "wan2.1_t2v_1.3B_bf16.safetensors or iamflow_fp8.safetensors",
    "text_encoders": "umt5_xxl_fp16.safetensors",
    "vae": "wan_2.1_vae.safetensors",
    LLM: "a Hugging Face model folder, e.g. Qwen3-4B-Instruct-2507 or Qwen3-VL-2B-Instruct",
}


def register_folders() -> None:
    """Make sure every folder key we read exists, in any ComfyUI version. Cheap and idempotent: called before
    each lookup, so folders configured later (extra_model_paths.yaml) are respected."""
    known = folder_paths.folder_names_and_paths
    for key, legacy in _ALIASES.items():
        if key not in known:
            paths = [os.path.join(folder_paths.models_dir, key)] + list(folder_paths.get_folder_paths(legacy))
            known[key] = (paths, folder_paths.supported_pt_extensions)
    llm_dir = os.path.join(folder_paths.models_dir, LLM)
    if LLM not in known or llm_dir not in folder_paths.get_folder_paths(LLM):
        folder_paths.add_model_folder_path(LLM, llm_dir)


def model_files(key: str) -> list[str]:
    """Files in a ComfyUI model folder, as the dropdown shows them."""
    register_folders()
    return sorted(folder_paths.get_filename_list(key))


def _subfolders(key: str, marker: tuple[str, ...], depth: int = 3) -> list[str]:
    register_folders()
    found = set()
    for base in folder_paths.get_folder_paths(key):
        root = Path(base)
        if not root.is_dir():
            continue
        for folder, dirs, files in os.walk(root, followlinks=True):
            rel = Path(folder).relative_to(root)
            if rel.parts and any(name in files for name in marker):
                found.add(rel.as_posix())
            if len(rel.parts) >= depth:
                dirs.clear()
    return sorted(found)


def hf_folders(key: str = LLM) -> list[str]:
    """Hugging Face model folders (holding a config.json) under a model folder, e.g. `Qwen3-4B-Instruct-2507`."""
    return _subfolders(key, ("config.json",))


def tokenizer_folders() -> list[str]:
    """umT5 tokenizer folders under text_encoders (spiece.model or tokenizer.json), e.g. `google/umt5-xxl`."""
    return _subfolders("text_encoders", ("spiece.model", "tokenizer.json"))


def _where(key: str) -> str:
    return ", ".join(folder_paths.get_folder_paths(key)) or f"models/{key}"


def missing(key: str, name: str | None, *, folder: bool = False) -> str | None:
    """None if `name` is in the model folder `key`, else the message to show (for VALIDATE_INPUTS)."""
    if name is None or name == NONE or (folder and name == EMBEDDED):
        return None
    register_folders()
    if (folder and name in _found_folders(key, name)) or (not folder and folder_paths.get_full_path(key, name)):
        return None
    what = "folder" if folder else "file"
    return (
        f"{what} {name!r} is not in ComfyUI's {key} folder (looked in: {_where(key)}); download it and put it "
        f"there ({DOWNLOADS.get(key, 'the model file')}), then refresh the page or pick one from the list"
    )


def _found_folders(key: str, name: str) -> list[str]:
    return [name] if any((Path(base) / name).is_dir() for base in folder_paths.get_folder_paths(key)) else []


def file_path(key: str, name: str) -> Path:
    """Full path of a model file, or FileNotFoundError naming the folder and the file."""
    problem = missing(key, name)
    if problem:
        raise FileNotFoundError(problem)
    return Path(folder_paths.get_full_path(key, name))


def folder_path(key: str, name: str) -> Path:
    """Full path of a model folder (e.g. a Hugging Face folder under models/LLM), or FileNotFoundError."""
    register_folders()
    for base in folder_paths.get_folder_paths(key):
        if (Path(base) / name).is_dir():
            return Path(base) / name
    raise FileNotFoundError(missing(key, name, folder=True))
