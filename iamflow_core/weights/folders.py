"""Finding model files in folders: the one place that knows where users keep them.

Two levels of search, each a table:

- `COMPONENTS`: which checkpoint of each component to use under a models folder. Users keep Wan2.1 files in a
  ComfyUI `models/` folder (`diffusion_models/`, `text_encoders/`, `vae/`) or as the original Wan2.1-T2V-1.3B
  folder; `find_model_files` looks in both layouts under one directory, and reports anything missing in one
  message listing every file needed, where it was looked for, and what it is.
- `_FOLDER_PATTERNS`: which weight files make up a checkpoint given as a folder (a Wan folder with `config.json`
  and one or sharded safetensors, a diffusers pipeline with one subfolder per component); `resolve` turns a
  checkpoint path into its weight files.

Loading the models found is `bundle.load_models`.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from .reading import CheckpointError, PathLike, read_json

# --- a models folder: one checkpoint per component -----------------------------------------------------------------

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
    models_dir: PathLike | None, *, dit: PathLike | None = None, text_encoder: PathLike | None = None,
    vae: PathLike | None = None, tokenizer: PathLike | None = None, lora: PathLike | None = None,
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


# --- a checkpoint folder: the weight files of one component --------------------------------------------------------

# Where each component lives inside a folder: file name patterns in the folder itself, then a subfolder
# (diffusers pipelines keep each component in its own subfolder).
_FOLDER_PATTERNS = {
    "dit": (("diffusion_pytorch_model*.safetensors", "*.safetensors"), "transformer"),
    "t5": (("*t5*.pth", "*t5*.safetensors", "*.safetensors"), "text_encoder"),
    "vae": (("*vae*.pth", "*vae*.safetensors", "*.safetensors"), "vae"),
}
_EXPECTED_FILES = {
    "dit": "config.json + diffusion_pytorch_model.safetensors (or sharded *.safetensors with an index json)",
    "t5": "models_t5_umt5-xxl-enc-bf16.pth or a umT5 .safetensors file",
    "vae": "Wan2.1_VAE.pth or wan_2.1_vae.safetensors",
}


def resolve(path: PathLike, component: str) -> tuple[Path, list[Path], dict]:
    """(path, the weight files, the folder's config.json or {}) of a checkpoint file or folder.
    component: "dit", "t5" or "vae"."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"no such file or folder: {path}")
    if path.is_file():
        return path, [path], {}
    patterns, subfolder = _FOLDER_PATTERNS[component]
    for folder in (path, path / subfolder):
        files = _folder_files(folder, patterns)
        if files:
            config_file = folder / "config.json"
            return path, files, read_json(config_file) if config_file.is_file() else {}
    raise CheckpointError(
        f"no {component.upper()} weights found in the folder {path}: expected {_EXPECTED_FILES[component]}"
    )


def _folder_files(folder: Path, patterns: tuple[str, ...]) -> list[Path]:
    if not folder.is_dir():
        return []
    for index in sorted(folder.glob("*.safetensors.index.json")):
        weight_map = read_json(index).get("weight_map", {})
        return sorted({folder / name for name in weight_map.values()})
    for pattern in patterns:  # case-insensitive: Wan2.1_VAE.pth
        files = sorted(p for p in folder.iterdir() if p.is_file() and fnmatch(p.name.lower(), pattern))
        if files:
            return files
    return []
