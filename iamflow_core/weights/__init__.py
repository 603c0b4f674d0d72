"""Reading checkpoint files and finding them in folders: the only package of the library that does.

Every layout users already have is accepted, and recognised from its keys and tensor shapes, never from its name:

- DiT: ComfyUI repackaged safetensors (bare keys or `model.diffusion_model.`, bf16/fp16, also ComfyUI
  `fp8_scaled`), the original Wan2.1 folder (`config.json` + one or sharded safetensors), diffusers
  `WanTransformer3DModel` weights, Self-Forcing / LongLive / MemFlow training checkpoints (`.pt` holding
  `generator_ema` / `generator`, keys prefixed `model.`, FSDP wrappers anywhere) and IAMFlow's
  `iamflow_fp8.safetensors` (attention projections in float8_e4m3fn with per-output-channel `weight_scale`).
  PEFT LoRA files are merged at load.
- umT5 encoder: Wan's `models_t5_umt5-xxl-enc-bf16.pth` and the Hugging Face-named files of ComfyUI
  (`umt5_xxl_fp16.safetensors`, `umt5_xxl_fp8_e4m3fn_scaled.safetensors`, dequantized at load).
- VAE: Wan's `Wan2.1_VAE.pth`, ComfyUI's `wan_2.1_vae.safetensors`, diffusers `AutoencoderKLWan` weights.

Model dimensions come from the shapes (configs in `config.py`), so tiny test checkpoints take the same path as
full-size ones. Files are read lazily: shapes are checked before any tensor data is read, each tensor is converted
and cast on its own, and models are built without memory (parameters on the meta device) and then take the loaded
tensors as they are (`assign=True`). `.pt`/`.pth` files are only read with `torch.load(weights_only=True)`.
Every problem with a file raises `CheckpointError`, naming the file, what was found and what was expected: weights
holding NaN or inf, and components that do not fit each other (`check_compatible`), included.

The modules, in the order a file passes through them:

- `folders`: finding model files under a models folder, and the weight files of a checkpoint folder;
- `reading`: opening files lazily and safely (`CheckpointError`);
- `layouts`: the table of checkpoint layouts: detecting keys, prefixes, rename rules, refusals;
- `plan`: recognising a file's layout and mapping its keys to ours, checked before reading; `CheckpointInfo`;
- `lora`: LoRA files, merged into the DiT;
- `finite`: refusing loaded weights that hold NaN or inf (a damaged file);
- `build`: building models without memory and assigning the loaded tensors;
- `dit`, `t5`, `vae`: the component loaders;
- `compat`: checking that the loaded DiT, text encoder and VAE fit each other;
- `bundle`: loading the models of a run together.
"""

from .bundle import load_models, load_text_encoder
from .compat import check_compatible
from .dit import WAN_HEAD_DIM, Quantization, load_dit, quantize_dit, read_dit_state_dict
from .folders import COMPONENTS, TOKENIZER_FOLDERS, MissingModelFiles, ModelFiles, find_model_files
from .layouts import WAN_1_3B
from .plan import CheckpointInfo
from .reading import FP8_DTYPES, CheckpointError, PathLike
from .t5 import load_t5, read_embedded_tokenizer, read_t5_state_dict
from .vae import load_vae, read_vae_state_dict

__all__ = [
    "COMPONENTS",
    "FP8_DTYPES",
    "TOKENIZER_FOLDERS",
    "WAN_1_3B",
    "WAN_HEAD_DIM",
    "CheckpointError",
    "CheckpointInfo",
    "MissingModelFiles",
    "ModelFiles",
    "PathLike",
    "Quantization",
    "check_compatible",
    "find_model_files",
    "load_dit",
    "quantize_dit",
    "load_models",
    "load_t5",
    "load_text_encoder",
    "load_vae",
    "read_dit_state_dict",
    "read_embedded_tokenizer",
    "read_t5_state_dict",
    "read_vae_state_dict",
]
