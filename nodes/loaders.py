"""Loader nodes: the Wan DiT, the umT5 text encoder and the Wan VAE, each onto the device its widget names."""

from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from iamflow_core.config import DTYPES

from . import folders
from .common import CATEGORY, precision_input, show_status
from .devices import device_input, resolve_device
from .values import DIT, TEXT_ENCODER, VAE

logger = logging.getLogger(__name__)

QUANTIZATION = ("auto", "off", "fp8")


def _attention_backend(name: str, dit) -> tuple[str, str | None]:
    """The backend for `dit` (auto: FP8 attention for a DiT with FP8 linears). A saved backend this machine lacks
    (e.g. flash3 on a workflow from an H100) falls back to auto."""
    from iamflow_core.models.attention import available_backends, resolve_backend
    from iamflow_core.models.fp8 import fp8_linears

    fp8 = fp8_linears(dit) > 0
    if name in available_backends():
        return resolve_backend(name, fp8), None
    warning = f"{name} attention is not available here; using auto"
    logger.warning("%s (available: %s)", warning, ", ".join(available_backends()))
    return resolve_backend("auto", fp8), warning


def _file_input(key: str, tooltip: str) -> io.Combo.Input:
    return io.Combo.Input("model", options=folders.model_files(key), tooltip=tooltip)


class LoadDiT(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        from iamflow_core.models.attention import BACKENDS, available_backends

        backends = available_backends() + [b for b in BACKENDS if b not in available_backends()]
        return io.Schema(
            node_id="IAMFlowLoadDiT",
            display_name="Load Wan DiT",
            category=CATEGORY,
            description="Loads a streaming Wan2.1-T2V DiT (any layout: ComfyUI, Wan folder, Self-Forcing/LongLive/"
            "MemFlow .pt, IAMFlow FP8), optionally merging a LoRA.",
            inputs=[
                _file_input("diffusion_models", "DiT checkpoint in models/diffusion_models: iamflow_fp8.safetensors, "
                            "wan2.1_t2v_1.3B_bf16.safetensors, a LongLive/MemFlow/Self-Forcing .pt, ..."),
                io.Combo.Input(
                    "lora", options=[folders.NONE, *folders.model_files("loras")], default=folders.NONE,
                    tooltip="Optional PEFT LoRA from models/loras, merged into the DiT at load (e.g. LongLive's "
                    "lora.pt).",
                ),
                precision_input("the DiT weights"),
                io.Combo.Input(
                    "quantization", options=list(QUANTIZATION), default="auto",
                    tooltip="auto: keep the weights the file stores as FP8 in FP8; off: dequantize everything; fp8: "
                    "also quantize self-attention q/k/v, cross-attention q and the FFN's first linear (FP8 matmuls on "
                    "RTX 40xx / H100 and newer).",
                ),
                io.Combo.Input(
                    "attention", options=backends, default="auto",
                    tooltip="Attention kernel. auto: FlashAttention 3 when installed on a Hopper GPU, else PyTorch "
                    "SDPA; for an FP8 DiT (an FP8 file, or quantization fp8) FA3's FP8 kernel where it is installed. "
                    "flash3_fp8: FA3's FP8 kernel for the self-attention (DiT forwards ~9 % faster than flash3, "
                    "~0.3-0.6 % from bf16). A saved choice this machine lacks falls back to auto.",
                ),
                device_input(0, "the DiT"),
            ],
            outputs=[DIT.Output(display_name="dit", tooltip="The loaded streaming DiT.")],
            hidden=[io.Hidden.unique_id],
        )  # fmt: skip

    @classmethod
    def validate_inputs(cls, model):
        return folders.missing("diffusion_models", model) or True

    @classmethod
    def execute(cls, model, lora, precision, quantization, attention, device) -> io.NodeOutput:
        from iamflow_core import weights
        from iamflow_core.models import fused

        dev, warning = resolve_device(device)
        fused.warm_up(dev)  # while the file loads: the sampler's second chunk then only loads its own kernels
        lora_path = None if lora == folders.NONE else folders.file_path("loras", lora)
        dit = weights.load_dit(
            folders.file_path("diffusion_models", model), lora=lora_path, dtype=DTYPES[precision], device=dev,
            quantization=quantization,
        )  # fmt: skip
        backend, attention_warning = _attention_backend(attention, dit)
        dit.attention_backend = backend
        details = f"{backend} · {dit.load_info.layout}, {dit.cfg.num_layers} blocks"
        not_compiled = fused.not_compiled_because(dev)
        slower = f"slower, no compiled kernels: {not_compiled}" if not_compiled else None
        show_status(cls.hidden.unique_id, warning or attention_warning or slower or str(dev), details)
        return io.NodeOutput(dit)


class LoadTextEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IAMFlowLoadTextEncoder",
            display_name="Load umT5 Text Encoder",
            category=CATEGORY,
            description="Loads the umT5-XXL text encoder (ComfyUI's umt5_xxl_*.safetensors or Wan's .pth) and its "
            "tokenizer.",
            inputs=[
                _file_input("text_encoders", "umT5-XXL encoder in models/text_encoders: umt5_xxl_fp16.safetensors "
                            "(the fp8_e4m3fn_scaled file and Wan's models_t5_umt5-xxl-enc-bf16.pth work too)."),
                io.Combo.Input(
                    "tokenizer", options=[folders.EMBEDDED, *folders.tokenizer_folders()], default=folders.EMBEDDED,
                    tooltip="ComfyUI's umT5 files carry their tokenizer. For Wan's .pth, copy its google/umt5-xxl "
                    "folder into models/text_encoders and pick it here.",
                ),
                precision_input("the text encoder"),
                device_input(0, "the text encoder"),
                io.Boolean.Input(
                    "offload", default=False,
                    tooltip="Keep the encoder on the CPU and move it to the device only while it encodes the prompts "
                    "(frees ~11 GB of GPU memory on a one-GPU machine).",
                ),
            ],
            outputs=[TEXT_ENCODER.Output(display_name="text_encoder", tooltip="umT5 encoder + tokenizer.")],
            hidden=[io.Hidden.unique_id],
        )  # fmt: skip

    @classmethod
    def validate_inputs(cls, model):
        return folders.missing("text_encoders", model) or True

    @classmethod
    def execute(cls, model, tokenizer, precision, device, offload) -> io.NodeOutput:
        from iamflow_core import weights
        from iamflow_core.text_encoder import OffloadedTextEncoder, TextEncoder

        dev, warning = resolve_device(device)
        path = folders.file_path("text_encoders", model)
        load_on = torch.device("cpu") if offload else dev
        t5 = weights.load_t5(path, dtype=DTYPES[precision], device=load_on)
        encoder = TextEncoder(t5, _tokenizer(path, model, tokenizer), device=load_on)
        result = OffloadedTextEncoder(encoder, dev) if offload else encoder
        show_status(
            cls.hidden.unique_id, warning or str(dev), f"offloaded: on the cpu, encodes on {dev}" if offload else None
        )
        return io.NodeOutput(result)


def _tokenizer(path, model: str, tokenizer: str):
    from iamflow_core import weights
    from iamflow_core.text_encoder import load_umt5_tokenizer, umt5_tokenizer_from_spiece

    if tokenizer != folders.EMBEDDED:
        return load_umt5_tokenizer(folders.folder_path("text_encoders", tokenizer))
    embedded = weights.read_embedded_tokenizer(path)
    if embedded is None:
        raise FileNotFoundError(
            f"{model} has no tokenizer inside; copy the google/umt5-xxl folder of the Wan2.1 download into "
            "models/text_encoders and pick it in the tokenizer widget"
        )
    return umt5_tokenizer_from_spiece(embedded, source=str(path))


class LoadVAE(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IAMFlowLoadVAE",
            display_name="Load Wan VAE",
            category=CATEGORY,
            description="Loads the Wan2.1 VAE (ComfyUI's wan_2.1_vae.safetensors or Wan's Wan2.1_VAE.pth).",
            inputs=[
                _file_input("vae", "Wan2.1 VAE in models/vae: wan_2.1_vae.safetensors."),
                precision_input("the VAE"),
                device_input(1, "the VAE decode (a second GPU overlaps decoding with sampling)"),
            ],
            outputs=[VAE.Output(display_name="vae", tooltip="The Wan2.1 VAE (streaming decode).")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, model):
        return folders.missing("vae", model) or True

    @classmethod
    def execute(cls, model, precision, device) -> io.NodeOutput:
        from iamflow_core import weights

        dev, warning = resolve_device(device)
        vae = weights.load_vae(folders.file_path("vae", model), dtype=DTYPES[precision], device=dev)
        show_status(cls.hidden.unique_id, warning or str(dev))
        return io.NodeOutput(vae)
