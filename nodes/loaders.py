"""Loader nodes: the Wan DiT, the umT5 text encoder and the Wan VAE, each onto the device its widget names."""

from __future__ import annotations

import logging

import torch

from . import folders
from .common import CATEGORY, DTYPES, HIDDEN, precision_input, widget, with_text
from .devices import check_device, device_input, resolve_device
from .values import DIT, TEXT_ENCODER, VAE

logger = logging.getLogger(__name__)

QUANTIZATION = ("auto", "off", "fp8")


def _attention_backend(name: str) -> tuple[str, str | None]:
    """A saved backend this machine lacks (e.g. flash3 on a workflow from an H100) falls back to auto."""
    from iamflow_core.models.attention import available_backends, resolve_backend

    if name in available_backends():
        return resolve_backend(name), None
    warning = f"attention backend {name} is not available here ({', '.join(available_backends())}); using auto"
    logger.warning(warning)
    return resolve_backend("auto"), warning


class IAMFlowLoadDiT:
    DESCRIPTION = (
        "Loads a streaming Wan2.1-T2V DiT (any layout: ComfyUI, Wan folder, Self-Forcing/LongLive/MemFlow .pt, "
        "IAMFlow FP8), optionally merging a LoRA."
    )

    @classmethod
    def INPUT_TYPES(cls):
        from iamflow_core.models.attention import BACKENDS, available_backends

        backends = available_backends() + [b for b in BACKENDS if b not in available_backends()]
        return {
            "required": {
                "model": widget(
                    folders.model_files("diffusion_models"),
                    "DiT checkpoint in models/diffusion_models: iamflow_fp8.safetensors, "
                    "wan2.1_t2v_1.3B_bf16.safetensors, a LongLive/MemFlow/Self-Forcing .pt, ...",
                ),
                "lora": widget(
                    [folders.NONE] + folders.model_files("loras"),
                    "Optional PEFT LoRA from models/loras, merged into the DiT at load (e.g. LongLive's lora.pt).",
                    default=folders.NONE,
                ),
                "precision": precision_input("the DiT weights"),
                "quantization": widget(
                    list(QUANTIZATION),
                    "auto: keep the weights the file stores as FP8 in FP8; off: dequantize everything; "
                    "fp8: quantize the attention and FFN linears to FP8 (less memory).",
                    default="auto",
                ),
                "attention": widget(
                    backends,
                    "Attention kernel. auto: FlashAttention 3 when installed on a Hopper GPU, else PyTorch SDPA. "
                    "A saved choice this machine lacks falls back to auto.",
                    default="auto",
                ),
                "device": device_input(0, "the DiT"),
            },
            "hidden": HIDDEN,
        }

    RETURN_TYPES = (DIT,)
    RETURN_NAMES = ("dit",)
    OUTPUT_TOOLTIPS = ("The loaded streaming DiT.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, model, lora, attention, device):
        from iamflow_core.models.attention import BACKENDS

        if attention is not None and attention not in BACKENDS:
            return f"attention backend {attention!r} is unknown; choose one of {', '.join(BACKENDS)}"
        return folders.missing("diffusion_models", model) or folders.missing("loras", lora) or check_device(device)

    def load(self, model, lora, precision, quantization, attention, device, unique_id=None):
        from iamflow_core import weights

        dev, warning = resolve_device(device)
        backend, attention_warning = _attention_backend(attention)
        lora_path = None if lora == folders.NONE else folders.file_path("loras", lora)
        dit = weights.load_dit(
            folders.file_path("diffusion_models", model), lora=lora_path, dtype=DTYPES[precision], device=dev,
            quantization=quantization,
        )  # fmt: skip
        dit.attention_backend = backend
        info = f"{model}: {dit.load_info.layout}, {dit.cfg.num_layers} blocks, dim {dit.cfg.dim} on {dev} ({backend})"
        return with_text((dit,), [warning, attention_warning, info], unique_id)


class IAMFlowLoadTextEncoder:
    DESCRIPTION = "Loads the umT5-XXL text encoder (ComfyUI's umt5_xxl_*.safetensors or Wan's .pth) and its tokenizer."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": widget(
                    folders.model_files("text_encoders"),
                    "umT5-XXL encoder in models/text_encoders: umt5_xxl_fp16.safetensors (the fp8_e4m3fn_scaled "
                    "file and Wan's models_t5_umt5-xxl-enc-bf16.pth work too).",
                ),
                "tokenizer": widget(
                    [folders.EMBEDDED] + folders.tokenizer_folders(),
                    "ComfyUI's umT5 files carry their tokenizer. For Wan's .pth, copy its google/umt5-xxl folder "
                    "into models/text_encoders and pick it here.",
                    default=folders.EMBEDDED,
                ),
                "precision": precision_input("the text encoder"),
                "device": device_input(0, "the text encoder"),
                "offload": widget(
                    "BOOLEAN",
                    "Keep the encoder on the CPU and move it to the device only while it encodes the prompts "
                    "(frees ~11 GB of GPU memory on a one-GPU machine).",
                    default=False,
                ),
            },
            "hidden": HIDDEN,
        }

    RETURN_TYPES = (TEXT_ENCODER,)
    RETURN_NAMES = ("text_encoder",)
    OUTPUT_TOOLTIPS = ("umT5 encoder + tokenizer.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, model, tokenizer, device):
        return (
            folders.missing("text_encoders", model)
            or folders.missing("text_encoders", tokenizer, folder=True)
            or check_device(device)
        )

    def load(self, model, tokenizer, precision, device, offload, unique_id=None):
        from iamflow_core import weights
        from iamflow_core.text_encoder import (
            OffloadedTextEncoder,
            TextEncoder,
            load_umt5_tokenizer,
            umt5_tokenizer_from_spiece,
        )

        dev, warning = resolve_device(device)
        path = folders.file_path("text_encoders", model)
        if tokenizer == folders.EMBEDDED:
            embedded = weights.read_embedded_tokenizer(path)
            if embedded is None:
                raise FileNotFoundError(
                    f"{model} has no tokenizer inside; copy the google/umt5-xxl folder of the Wan2.1 download into "
                    "models/text_encoders and pick it in the tokenizer widget"
                )
            tok = umt5_tokenizer_from_spiece(embedded, source=str(path))
        else:
            tok = load_umt5_tokenizer(folders.folder_path("text_encoders", tokenizer))
        load_on = torch.device("cpu") if offload else dev
        encoder = TextEncoder(weights.load_t5(path, dtype=DTYPES[precision], device=load_on), tok, device=load_on)
        result = OffloadedTextEncoder(encoder, dev) if offload else encoder
        where = f"cpu, encodes on {dev}" if offload else str(dev)
        return with_text((result,), [warning, f"{model} on {where}"], unique_id)


class IAMFlowLoadVAE:
    DESCRIPTION = "Loads the Wan2.1 VAE (ComfyUI's wan_2.1_vae.safetensors or Wan's Wan2.1_VAE.pth)."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": widget(folders.model_files("vae"), "Wan2.1 VAE in models/vae: wan_2.1_vae.safetensors."),
                "precision": precision_input("the VAE"),
                "device": device_input(1, "the VAE decode (a second GPU overlaps decoding with sampling)"),
            },
            "hidden": HIDDEN,
        }

    RETURN_TYPES = (VAE,)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The Wan2.1 VAE (streaming decode).",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, model, device):
        return folders.missing("vae", model) or check_device(device)

    def load(self, model, precision, device, unique_id=None):
        from iamflow_core import weights

        dev, warning = resolve_device(device)
        vae = weights.load_vae(folders.file_path("vae", model), dtype=DTYPES[precision], device=dev)
        return with_text((vae,), [warning, f"{model} on {dev}"], unique_id)
