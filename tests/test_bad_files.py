"""Unusable checkpoint files: each gets one CheckpointError naming the file, what was found and what was expected."""

from __future__ import annotations

import os
import pickle
import traceback

import pytest
import torch
from safetensors.torch import save_file

from iamflow_core.config import DiTConfig, T5Config
from iamflow_core.models.dit import CausalWanDiT
from iamflow_core.presets import tiny_models, tiny_tokenizer
from iamflow_core.text_encoder import OffloadedTextEncoder, TextEncoder
from iamflow_core.weights import (
    CheckpointError,
    check_compatible,
    load_dit,
    load_t5,
    load_vae,
    read_dit_state_dict,
)

from . import _checkpoints as ck
from ._tiny_t5 import tiny_encoder


@pytest.fixture(scope="module")
def dit() -> dict[str, torch.Tensor]:
    return ck.dit_state()


def raises(fn, path, *words: str) -> str:
    """Call fn(path); assert a CheckpointError whose message names `path` and contains every word."""
    with pytest.raises(CheckpointError) as info:
        fn(path)
    message = str(info.value)
    assert str(path) in message, message
    for word in words:
        assert word in message, f"{word!r} not in: {message}"
    return message


# --- files that cannot be read -------------------------------------------------------------------------------------


def test_truncated_safetensors(tmp_path, dit):
    path = ck.write_comfyui_dit(tmp_path / "dit.safetensors", dit)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    raises(load_dit, path, "truncated", f"{len(data) // 2} bytes")


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"<html>404 Not Found</html>")
    raises(load_vae, path, "not a safetensors file")


def test_truncated_torch_checkpoint(tmp_path, dit):
    path = ck.write_training_checkpoint(tmp_path / "model.pt", dit)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    raises(load_dit, path, "truncated or is not a PyTorch checkpoint")


class _RunsCode:
    """Unpickling this would call os.system: the attack a weights_only load must refuse."""

    def __init__(self, sentinel: str) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_pickle_that_runs_code_is_refused(tmp_path, writer):
    sentinel = tmp_path / "pwned"
    payload = {"generator": {"model.patch_embedding.weight": torch.zeros(1)}, "hook": _RunsCode(str(sentinel))}
    path = tmp_path / "self_forcing_dmd.pt"
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    message = raises(load_dit, path, "refused for safety", "not plain tensors")
    assert not sentinel.exists()  # the code never ran
    for word in ("holds code that would run when it is loaded", "(it imports ", ".safetensors version"):
        assert word in message, f"{word!r} not in: {message}"
    assert writer == "pickle" or "system" in message, message  # pickle.dumps'd tensors are refused first
    with pytest.raises(CheckpointError) as info:
        load_dit(path)
    traceback_text = "".join(traceback.format_exception(info.value))
    for advice in ("weights_only", "WeightsUnpickler", "Weights only load failed"):  # torch's "weights_only=False"
        assert advice not in traceback_text, traceback_text


def test_missing_path_and_empty_folder(tmp_path):
    raises(load_dit, tmp_path / "nope.safetensors", "no such file or folder")
    (tmp_path / "empty").mkdir()
    raises(load_dit, tmp_path / "empty", "no DIT weights found", "diffusion_pytorch_model.safetensors")
    raises(load_vae, tmp_path / "empty", "no VAE weights found", "Wan2.1_VAE.pth")


def test_torch_file_without_a_state_dict(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    raises(load_dit, tmp_path / "list.pt", "holds a list", "dictionary of tensors")
    torch.save({"optimizer": {"lr": 1e-4}, "step": 3}, tmp_path / "opt.pt")
    raises(load_dit, tmp_path / "opt.pt", "generator_ema", "optimizer")


# --- the wrong model -----------------------------------------------------------------------------------------------


def test_vae_given_as_dit(tmp_path):
    torch.save(ck.vae_state(), tmp_path / "Wan2.1_VAE.pth")
    message = raises(load_dit, tmp_path / "Wan2.1_VAE.pth", "Wan VAE file, not a Wan DiT file", "blocks.0.self_attn.q")
    assert "found 194 Wan VAE keys such as " in message


def test_dit_given_as_vae(tmp_path, dit):
    path = ck.write_comfyui_dit(tmp_path / "wan2.1_t2v_1.3B_bf16.safetensors", dit, prefix="model.diffusion_model.")
    raises(load_vae, path, "Wan DiT file, not a Wan VAE file", "decoder.middle.0.residual.0.gamma")


def test_t5_given_as_dit_and_dit_as_t5(tmp_path, dit):
    path = ck.write_comfyui_t5(tmp_path / "umt5_xxl_fp16.safetensors", ck.t5_state())
    raises(load_dit, path, "umT5 text-encoder file, not a Wan DiT file", "encoder.block.0.layer.0.SelfAttention")
    dit_path = ck.write_comfyui_dit(tmp_path / "dit.safetensors", dit)
    raises(load_t5, dit_path, "Wan DiT file, not a umT5 text-encoder file", "blocks.0.attn.q.weight")


def test_lora_given_as_dit(tmp_path):
    lora = ck.write_kohya_lora(tmp_path / "lora.safetensors", {"blocks.0.self_attn.q": (torch.zeros(4, 256),) * 2}, 4)
    raises(load_dit, lora, "is a LoRA, not a full model", "lora=")


def test_unknown_file(tmp_path):
    save_file({"linear.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    raises(load_dit, tmp_path / "other.safetensors", "not a model IAMFlow knows", "linear.weight")


def test_14b_dit_is_refused_before_allocation(tmp_path):
    """Only the shapes are read: the fake 14B file holds a few small tensors with the 14B dims."""
    state = {
        "patch_embedding.weight": torch.zeros(5120, 16, 1, 2, 2, dtype=torch.bfloat16),
        "head.modulation": torch.zeros(1, 2, 5120, dtype=torch.bfloat16),
        "head.head.weight": torch.zeros(64, 5120, dtype=torch.bfloat16),
    } | {f"blocks.{i}.norm3.weight": torch.zeros(5120, dtype=torch.bfloat16) for i in range(40)}
    save_file(state, str(tmp_path / "wan2.1_t2v_14B_bf16.safetensors"))
    raises(
        load_dit, tmp_path / "wan2.1_t2v_14B_bf16.safetensors",
        "this is a Wan2.1 14B DiT (dim 5120, 40 layers); IAMFlow streams the 1.3B model (dim 1536, 30 layers)",
    )  # fmt: skip


def test_image_to_video_dit_is_refused(tmp_path, dit):
    state = dit | {"blocks.0.cross_attn.k_img.weight": torch.zeros(256, 256)}
    path = ck.write_comfyui_dit(tmp_path / "i2v.safetensors", state)
    raises(load_dit, path, "image-to-video", "k_img")


def test_wan22_5b_dit_is_refused(tmp_path, dit):
    state = dit | {"patch_embedding.weight": torch.zeros(256, 48, 1, 2, 2), "head.head.weight": torch.zeros(192, 256)}
    path = ck.write_comfyui_dit(tmp_path / "wan2.2_ti2v_5B.safetensors", state)
    raises(load_dit, path, "Wan2.2 5B", "48 latent channels")


def test_heads_cannot_be_told(tmp_path):
    from iamflow_core.config import DiTConfig
    from iamflow_core.models.dit import CausalWanDiT

    state = CausalWanDiT(DiTConfig(dim=96, ffn_dim=128, num_heads=2, num_layers=1, text_dim=32)).state_dict()
    path = ck.write_comfyui_dit(tmp_path / "dit.safetensors", state)
    raises(load_dit, path, "number of attention heads", "iamflow.num_heads")


def test_config_json_disagrees_with_weights(tmp_path, dit):
    folder = ck.write_wan_folder(tmp_path / "wan", dit)
    (folder / "config.json").write_text('{"model_type": "t2v", "dim": 1536, "num_layers": 30}')
    raises(load_dit, folder, "config.json disagrees", "num_layers=30 (weights: 2)")


# --- the right model, damaged -----------------------------------------------------------------------------------


def test_wrong_shape(tmp_path, dit):
    state = dit | {"blocks.1.cross_attn.v.weight": torch.zeros(256, 128)}
    path = ck.write_comfyui_dit(tmp_path / "dit.safetensors", state)
    raises(
        load_dit,
        path,
        "1 tensors with wrong shapes",
        "blocks.1.cross_attn.v.weight: file [256, 128], model [256, 256]",
    )


def test_missing_and_unexpected_keys(tmp_path, dit):
    state = {k: v for k, v in dit.items() if k not in ("blocks.1.ffn.2.weight", "blocks.0.norm3.bias")}
    state["blocks.0.extra.weight"] = torch.zeros(3)
    path = ck.write_comfyui_dit(tmp_path / "dit.safetensors", state)
    message = raises(load_dit, path, "2 missing keys", "blocks.0.norm3.bias", "blocks.1.ffn.2.weight")
    assert "1 unexpected keys, e.g. blocks.0.extra.weight" in message


def test_missing_block(tmp_path, dit):
    state = {k: v for k, v in dit.items() if not k.startswith("blocks.0.")}
    path = ck.write_comfyui_dit(tmp_path / "dit.safetensors", state)
    raises(load_dit, path, "lacks blocks.0.ffn.0.weight")


def test_vae_with_another_structure(tmp_path):
    state = {k: v for k, v in ck.vae_state().items() if not k.startswith("decoder.upsamples.14.")}
    torch.save(state, tmp_path / "vae.pth")
    raises(load_vae, tmp_path / "vae.pth", "does not match the Wan2.1 VAE structure", "decoder.upsamples.14.")


def test_umt5_without_per_layer_position_bias(tmp_path):
    state = {k: v for k, v in ck.t5_state().items() if "pos_embedding" not in k}
    torch.save(state, tmp_path / "t5.pth")
    raises(load_t5, tmp_path / "t5.pth", "not a umT5 encoder")


# --- LoRA problems -------------------------------------------------------------------------------------------------


def test_lora_that_matches_no_weight(tmp_path, dit):
    base = ck.write_comfyui_dit(tmp_path / "dit.safetensors", dit)
    pair = (torch.zeros(4, 256), torch.zeros(256, 4))
    lora = ck.write_kohya_lora(tmp_path / "lora.safetensors", {"blocks.7.self_attn.q": pair, "vace.x": pair}, 4)
    with pytest.raises(CheckpointError) as info:
        load_dit(base, lora=lora)
    assert str(lora) in str(info.value) and "2 LoRA modules match no weight" in str(info.value)
    assert "blocks.7.self_attn.q" in str(info.value)


def test_lora_with_wrong_shapes_or_half_a_pair(tmp_path, dit):
    base = ck.write_comfyui_dit(tmp_path / "dit.safetensors", dit)
    lora = ck.write_kohya_lora(
        tmp_path / "a.safetensors", {"blocks.0.ffn.0": (torch.zeros(4, 256), torch.zeros(256, 4))}, 4
    )
    with pytest.raises(CheckpointError, match=r"do not fit the weight \[512, 256\]"):
        load_dit(base, lora=lora)
    save_file(
        {"diffusion_model.blocks.0.ffn.0.lora_down.weight": torch.zeros(4, 256)}, str(tmp_path / "b.safetensors")
    )
    with pytest.raises(CheckpointError, match="has only its down matrix"):
        load_dit(base, lora=tmp_path / "b.safetensors")
    save_file({"blocks.0.ffn.0.lora_magnitude_vector": torch.zeros(4)}, str(tmp_path / "dora.safetensors"))
    with pytest.raises(CheckpointError, match="not a LoRA IAMFlow understands"):
        load_dit(base, lora=tmp_path / "dora.safetensors")


def test_bad_quantization_argument(tmp_path, dit):
    with pytest.raises(ValueError, match="quantization must be"):
        read_dit_state_dict(tmp_path / "x.safetensors", quantization="int4")


# --- weights that hold NaN or inf ----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["comfyui", "training"])
def test_dit_with_a_nan_weight_is_damaged(tmp_path, dit, layout):
    state = {k: v.clone() for k, v in dit.items()}
    state["blocks.1.ffn.0.weight"][3, 7] = float("nan")
    if layout == "comfyui":
        path = ck.write_comfyui_dit(tmp_path / "dit.safetensors", state, prefix="model.diffusion_model.")
    else:
        path = ck.write_training_checkpoint(tmp_path / "model.pt", state)
    message = raises(load_dit, path, "is damaged", "download the file again")
    assert "tensor blocks.1.ffn.0.weight holds 1 NaN values (of 131072)" in message  # the Wan key name


def test_vae_with_an_inf_weight_is_damaged(tmp_path):
    state = ck.vae_state()
    state["decoder.middle.0.residual.2.weight"].view(-1)[5] = float("inf")
    path = ck.write_diffusers_vae(tmp_path / "vae", state)  # stored as decoder.mid_block.resnets.0.conv1.weight
    raises(load_vae, path, "is damaged", "tensor decoder.middle.0.residual.2.weight holds 1 inf values")


def test_umt5_with_a_nan_weight_is_damaged(tmp_path):
    state = ck.t5_state()
    state["blocks.0.attn.q.weight"][0, 0] = float("nan")
    path = ck.write_comfyui_t5(tmp_path / "umt5_xxl_fp16.safetensors", state)
    raises(load_t5, path, "is damaged", "tensor blocks.0.attn.q.weight holds 1 NaN values")


def test_weights_that_overflow_the_dtype_are_not_called_damaged(tmp_path, dit):
    state = dit | {"head.head.weight": torch.full_like(dit["head.head.weight"], 1e6)}
    path = ck.write_comfyui_dit(tmp_path / "dit.safetensors", state, dtype=torch.float32)
    message = raises(lambda p: load_dit(p, dtype=torch.float16), path, "finite in the file", "torch.bfloat16")
    assert "damaged" not in message, message
    assert "once loaded as torch.float16: its values overflow that dtype" in message


def test_lora_with_a_nan_matrix_is_damaged(tmp_path, dit):
    base = ck.write_comfyui_dit(tmp_path / "dit.safetensors", dit)
    down = torch.zeros(4, 256)
    down[1, 2] = float("nan")
    lora = ck.write_kohya_lora(tmp_path / "lora.safetensors", {"blocks.0.ffn.0": (down, torch.zeros(512, 4))}, 4)
    with pytest.raises(CheckpointError) as info:
        load_dit(base, lora=lora)
    assert f"the LoRA {lora} is damaged: its blocks.0.ffn.0.down matrix holds 1 NaN values" in str(info.value)


# --- components that do not fit each other -------------------------------------------------------------------------


def _small_t5(dim: int) -> dict[str, torch.Tensor]:
    cfg = T5Config(vocab_size=300, dim=dim, dim_attn=dim, dim_ffn=2 * dim, num_heads=4, num_layers=2)
    return tiny_encoder(cfg).state_dict()


@pytest.fixture()
def loaded(tmp_path, dit):
    """A tiny DiT (text_dim 64, 16 latent channels), a 32-wide umT5 and a VAE, loaded from their files."""
    dit_path = ck.write_comfyui_dit(tmp_path / "wan2.1_t2v_1.3B_bf16.safetensors", dit)
    torch.save(_small_t5(32), tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    torch.save(ck.vae_state(), tmp_path / "Wan2.1_VAE.pth")
    return (
        load_dit(dit_path),
        load_t5(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"),
        load_vae(tmp_path / "Wan2.1_VAE.pth"),
    )


def test_loaded_models_know_their_files(tmp_path, loaded):
    dit_model, t5, vae = loaded
    assert dit_model.load_info.path == str(tmp_path / "wan2.1_t2v_1.3B_bf16.safetensors")
    assert t5.load_info.path == str(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    assert vae.load_info.path == str(tmp_path / "Wan2.1_VAE.pth")


def test_umt5_of_another_width_than_the_dit(tmp_path, loaded):
    dit_model, t5, vae = loaded
    check_compatible(dit_model, vae=vae)  # these two fit
    for text_encoder in (
        t5,
        TextEncoder(t5, tiny_tokenizer()),
        OffloadedTextEncoder(TextEncoder(t5, tiny_tokenizer()), "cpu"),
    ):
        with pytest.raises(CheckpointError) as info:
            check_compatible(dit_model, text_encoder, vae)
        message = str(info.value)
        for word in (
            f"the umT5 text encoder {tmp_path / 'models_t5_umt5-xxl-enc-bf16.pth'} gives 32-wide text embeddings",
            f"but the DiT {tmp_path / 'wan2.1_t2v_1.3B_bf16.safetensors'} takes text_dim 64",
            "use the umT5 encoder of width 64 that belongs to this DiT",
            "umt5_xxl_fp16.safetensors",
        ):
            assert word in message, f"{word!r} not in: {message}"


def test_vae_with_other_latent_channels_than_the_dit(tmp_path, loaded):
    _, _, vae = loaded
    cfg = DiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=1, in_channels=8, out_channels=8, text_dim=64)
    path = ck.write_comfyui_dit(tmp_path / "dit8.safetensors", CausalWanDiT(cfg).state_dict())
    with pytest.raises(CheckpointError) as info:
        check_compatible(load_dit(path), vae=vae)
    message = str(info.value)
    assert f"the VAE {tmp_path / 'Wan2.1_VAE.pth'} has 16 latent channels (z_dim)" in message, message
    assert f"but the DiT {path} denoises latents of 8 channels" in message, message
    assert "wan_2.1_vae.safetensors" in message, message


def test_models_built_in_code_are_named_so_and_both_problems_told_at_once():
    dit_model, text_encoder, vae = tiny_models()
    check_compatible(dit_model, text_encoder, vae)  # the tiny preset fits together
    cfg = DiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=1, in_channels=8, out_channels=8, text_dim=48)
    with pytest.raises(CheckpointError) as info:
        check_compatible(CausalWanDiT(cfg), text_encoder, vae)
    message = str(info.value)
    assert "the umT5 text encoder built in code gives" in message, message
    assert "the VAE built in code has 16 latent channels" in message, message
    assert message.count("the DiT built in code") == 2, message
