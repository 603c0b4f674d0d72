"""Loading the models of a run together, from the `ModelFiles` that `folders.find_model_files` found: the DiT
(with its LoRA), the text encoder with its tokenizer, and the VAE, each on its device."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, TypeVar

import torch

from ..models import fused
from ..models.attention import resolve_backend
from ..models.dit import CausalWanDiT
from ..models.fp8 import fp8_linears
from ..models.vae import WanVAE
from .compat import check_compatible
from .dit import load_dit
from .folders import MissingModelFiles, ModelFiles
from .t5 import load_t5, read_embedded_tokenizer
from .vae import load_vae

if TYPE_CHECKING:
    from ..text_encoder import TextEncoder

T = TypeVar("T")


def load_text_encoder(files: ModelFiles, device: str | torch.device, dtype: torch.dtype) -> TextEncoder:
    """The umT5 encoder with the tokenizer given in `files`, else the one embedded in the text-encoder file."""
    # imported here: text_encoder imports transformers, which `iamflow_core.weights` does not need
    from ..text_encoder import TextEncoder, load_umt5_tokenizer, umt5_tokenizer_from_spiece

    encoder = load_t5(files.text_encoder, dtype=dtype, device=device)
    if files.tokenizer is not None:
        tokenizer = load_umt5_tokenizer(files.tokenizer)
    else:
        embedded = read_embedded_tokenizer(files.text_encoder)
        if embedded is None:
            raise MissingModelFiles(
                f"no tokenizer: {files.text_encoder} has none embedded; pass --tokenizer with the google/umt5-xxl "
                "folder of the Wan2.1-T2V-1.3B download (spiece.model or tokenizer.json)"
            )
        tokenizer = umt5_tokenizer_from_spiece(embedded, source=str(files.text_encoder))
    return TextEncoder(encoder, tokenizer, device=device)


def _in_background(fn: Callable[..., T], *args, name: str) -> Future[T]:
    """fn(*args) on a daemon thread with the caller's current GPU, its result or error in the future: the loads run
    side by side, and a failing one is reported at once, without waiting for the others to finish reading."""
    future: Future[T] = Future()
    gpu = torch.cuda.current_device() if torch.cuda.is_initialized() else None

    def work() -> None:
        if gpu is not None:
            torch.cuda.set_device(gpu)
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
            future.set_exception(e)

    threading.Thread(target=work, name=name, daemon=True).start()
    return future


def load_models(
    files: ModelFiles, *, device: str = "cuda:0", vae_device: str | None = None, text_device: str | None = None,
    dtype: torch.dtype = torch.bfloat16, quantization: str = "auto", attention: str = "auto",
) -> tuple[CausalWanDiT, TextEncoder, WanVAE | None]:  # fmt: skip
    """Load the DiT (with LoRA), the text encoder and the VAE onto their devices; files that load but do not fit each
    other (another text width, other latent channels) are one `CheckpointError` naming both. umT5 (11 GB, the
    longest read) loads on a thread while the DiT and the VAE load here, and on a GPU the compiler's one-time parts
    load on another (`fused.warm_up`)."""
    fused.warm_up(device)
    text_encoder = _in_background(load_text_encoder, files, text_device or device, dtype, name="iamflow-load-umt5")
    dit = load_dit(files.dit, lora=files.lora, dtype=dtype, device=device, quantization=quantization)
    dit.attention_backend = resolve_backend(attention, fp8=fp8_linears(dit) > 0)
    vae = load_vae(files.vae, dtype=dtype, device=vae_device or device) if files.vae else None
    text_encoder = text_encoder.result()
    check_compatible(dit, text_encoder, vae)
    return dit, text_encoder, vae
