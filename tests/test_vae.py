"""Causal Wan2.1 VAE: fp32 parity with diffusers' AutoencoderKLWan, and streaming decode == full decode.

Tiny config (base_dim 8, the released layout otherwise), random seeded weights with non-trivial norm gains.
"""

from __future__ import annotations

import re

import pytest
import torch

from iamflow_core.config import VAEConfig
from iamflow_core.models.vae import VAEDecodeState, WanVAE

CFG = VAEConfig(base_dim=8)


def wan_to_diffusers_key(key: str, num_res_blocks: int) -> str:
    """Rename one original Wan2.1 VAE key to diffusers' AutoencoderKLWan (parity.md section 1.3)."""
    if key.startswith(("conv1.", "conv2.")):
        return ("quant_conv." if key.startswith("conv1.") else "post_quant_conv.") + key.split(".", 1)[1]
    part, rest = key.split(".", 1)
    rest = re.sub(r"^conv1\.", "conv_in.", rest)
    rest = re.sub(r"^head\.0\.", "norm_out.", rest)
    rest = re.sub(r"^head\.2\.", "conv_out.", rest)
    rest = re.sub(r"^middle\.0\.", "mid_block.resnets.0.", rest)
    rest = re.sub(r"^middle\.1\.", "mid_block.attentions.0.", rest)
    rest = re.sub(r"^middle\.2\.", "mid_block.resnets.1.", rest)
    rest = re.sub(r"^downsamples\.", "down_blocks.", rest)
    match = re.match(r"^upsamples\.(\d+)\.(.*)$", rest)
    if match:
        block, j = divmod(int(match.group(1)), num_res_blocks + 2)
        inner = f"resnets.{j}" if j <= num_res_blocks else "upsamplers.0"
        rest = f"up_blocks.{block}.{inner}.{match.group(2)}"
    for old, new in (("residual.0.", "norm1."), ("residual.2.", "conv1."), ("residual.3.", "norm2."),
                     ("residual.6.", "conv2."), ("shortcut.", "conv_shortcut.")):  # fmt: skip
        rest = rest.replace(old, new)
    return f"{part}.{rest}"


@pytest.fixture(scope="module")
def models() -> tuple[WanVAE, torch.nn.Module]:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(1234)
    ours = WanVAE(CFG).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    ref = diffusers.AutoencoderKLWan(
        base_dim=CFG.base_dim,
        z_dim=CFG.z_dim,
        dim_mult=list(CFG.dim_mult),
        num_res_blocks=CFG.num_res_blocks,
        temperal_downsample=list(CFG.temporal_downsample),
        latents_mean=list(CFG.latents_mean),
        latents_std=list(CFG.latents_std),
    ).eval()
    converted = {wan_to_diffusers_key(k, CFG.num_res_blocks): v for k, v in ours.state_dict().items()}
    ref.load_state_dict(converted, strict=True)
    return ours, ref


def _mean_std() -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, CFG.z_dim, 1, 1, 1)
    return torch.tensor(CFG.latents_mean).view(shape), torch.tensor(CFG.latents_std).view(shape)


def _latents(frames: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, CFG.z_dim, frames, 4, 4, generator=gen)


def test_checkpoint_key_names(models):
    keys = set(models[0].state_dict())
    assert len(keys) == 194
    for key in (
        "encoder.conv1.weight", "encoder.downsamples.0.residual.0.gamma", "encoder.downsamples.3.shortcut.weight",
        "encoder.downsamples.2.resample.1.weight", "encoder.downsamples.5.time_conv.weight",
        "encoder.middle.1.norm.gamma", "encoder.middle.1.to_qkv.weight", "encoder.middle.1.proj.bias",
        "encoder.head.0.gamma", "encoder.head.2.weight", "conv1.weight", "conv2.bias", "decoder.conv1.weight",
        "decoder.middle.2.residual.6.weight", "decoder.upsamples.3.time_conv.weight",
        "decoder.upsamples.4.shortcut.weight", "decoder.upsamples.11.resample.1.bias", "decoder.head.2.weight",
    ):  # fmt: skip
        assert key in keys, key


@torch.no_grad()
def test_encode_matches_diffusers(models):
    ours, ref = models
    video = torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mean, std = _mean_std()
    expected = (ref.encode(video).latent_dist.mean - mean) / std
    got = ours.encode(video)
    assert got.shape == (1, CFG.z_dim, 3, 4, 4)
    diff = (got - expected).abs().max().item()
    assert diff <= 1e-4, diff


@torch.no_grad()
def test_decode_matches_diffusers(models):
    ours, ref = models
    z = _latents(3)
    mean, std = _mean_std()
    expected = ref.decode(z * std + mean).sample
    got = ours.decode(z)
    assert got.shape == expected.shape == (1, 3, 9, 32, 32)
    # Random weights must not saturate the output, or the clamp would hide differences.
    assert (got.abs() < 1).float().mean() > 0.5
    diff = (got - expected).abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("sizes", [(1, 1, 1, 1, 1, 1), (3, 3), (2, 1, 3), (6,)])
@torch.no_grad()
def test_streaming_decode_equals_full_decode(models, sizes):
    ours = models[0]
    z = _latents(sum(sizes), seed=2)
    full = ours.decode(z)
    state = ours.new_decode_state()
    pieces = []
    for chunk in z.split(list(sizes), dim=2):
        first = state.latent_frames == 0
        piece = ours.decode_stream(chunk, state)
        n = chunk.shape[2]
        assert piece.shape[2] == (1 + 4 * (n - 1) if first else 4 * n)
        pieces.append(piece)
    streamed = torch.cat(pieces, dim=2)
    assert streamed.shape == full.shape
    diff = (streamed - full).abs().max().item()
    assert diff <= 1e-5, diff


@pytest.mark.parametrize("latent_frames", [1, 2, 5])
@torch.no_grad()
def test_frame_count(models, latent_frames):
    video = models[0].decode(_latents(latent_frames))
    assert video.shape == (1, 3, 1 + 4 * (latent_frames - 1), 32, 32)


@torch.no_grad()
def test_streams_are_independent(models):
    ours = models[0]
    za, zb = _latents(4, seed=3), _latents(4, seed=4, batch=2)
    state_a, state_b = ours.new_decode_state(), ours.new_decode_state()
    out_a, out_b = [], []
    for ca, cb in zip(za.split(2, dim=2), zb.split(2, dim=2)):  # interleave the two streams
        out_a.append(ours.decode_stream(ca, state_a))
        out_b.append(ours.decode_stream(cb, state_b))
    assert isinstance(state_a, VAEDecodeState) and state_a.latent_frames == 4
    for z, out in ((za, out_a), (zb, out_b)):  # each equals the same stream decoded on its own
        alone = ours.new_decode_state()
        expected = torch.cat([ours.decode_stream(c, alone) for c in z.split(2, dim=2)], dim=2)
        assert torch.equal(torch.cat(out, dim=2), expected)


@torch.no_grad()
def test_bad_inputs_raise(models):
    ours = models[0]
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        ours.encode(torch.zeros(1, 4, 5, 32, 32))
    with pytest.raises(ValueError, match="multiples of 8"):
        ours.encode(torch.zeros(1, 3, 5, 30, 32))
    with pytest.raises(ValueError, match=r"\[B, 16,"):
        ours.decode(torch.zeros(1, 8, 2, 4, 4))
    state = ours.new_decode_state()
    ours.decode_stream(_latents(1), state)
    with pytest.raises(ValueError, match="stream started with"):
        ours.decode_stream(torch.zeros(1, CFG.z_dim, 1, 8, 8), state)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("plan", ["conv3d", "taps"])
def test_conv3d_as_2d_convs_equals_conv3d(channels_last, plan):
    from iamflow_core.models.vae import _PLANS, CausalConv3d

    torch.manual_seed(0)
    conv = CausalConv3d(6, 5, 3, padding=1)
    x = torch.randn(1, 6, 7, 9, 10)  # 5 output frames after the 2 past frames
    if channels_last:
        conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        expected = torch.nn.functional.conv3d(x, conv.weight, conv.bias, 1, conv.padding)
        got = _PLANS[plan](conv, x)
    assert got.shape == expected.shape == (1, 5, 5, 9, 10)
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_temporal_upsampling_keeps_the_layout_it_is_given(layout):
    """The frame interleave of upsample3d writes its output in its input's layout (channels-last on a GPU): the
    convs after it then read it as it is instead of converting it back."""
    from iamflow_core.models.vae import Resample

    torch.manual_seed(0)
    resample = Resample(8, "upsample3d").eval()
    resample.time_conv.cache_slot = 0
    x = torch.randn(1, 8, 3, 5, 6).contiguous(memory_format=layout)
    with torch.no_grad():
        out = resample._upsample_time(x, [None], first_chunk=False)
        y = resample.time_conv(x, [None]).view(1, 2, 8, 3, 5, 6)
    assert torch.equal(out, torch.stack((y[:, 0], y[:, 1]), dim=3).flatten(2, 3))  # frame k -> (2k, 2k + 1)
    assert out.is_contiguous(memory_format=layout)


def test_the_vae_benchmark_names_its_kernels_and_needs_a_gpu(monkeypatch):
    from iamflow_core.bench import vae_decode

    assert vae_decode.kind_of("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc") == "conv"
    assert vae_decode.kind_of("triton_poi_fused_add_tap_sum_0") == "fused (triton)"
    assert vae_decode.kind_of("vectorized_elementwise_kernel<8, CUDAFunctor_add<BFloat16>>") == "add"
    assert vae_decode.kind_of("Memcpy DtoD (Device -> Device)") == "copy / cat"
    assert vae_decode.kind_of("upsample_nearest2d_nhwc_out_frame") == "upsample"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        list(vae_decode.main([]))


def test_the_fused_tap_sum_adds_the_taps_and_the_bias_per_channel():
    from iamflow_core.models import fused

    a, b, c = (torch.randn(4, 3, 5, 6, dtype=torch.bfloat16) for _ in range(3))
    bias = torch.randn(3, dtype=torch.bfloat16)
    expected = a.float() + b.float() + c.float() + bias.float()[None, :, None, None]
    out = fused.tap_sum(a, b, c, bias)
    assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), expected, atol=0.05)
