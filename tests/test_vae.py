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
@pytest.mark.parametrize("plan", ["conv3d", "taps", "stacked"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_conv3d_as_2d_convs_equals_conv3d(channels_last, plan, with_residual):
    from iamflow_core.models.vae import _PLANS, CausalConv3d

    torch.manual_seed(0)
    conv = CausalConv3d(6, 5, 3, padding=1)
    x = torch.randn(1, 6, 7, 9, 10)  # 5 output frames after the 2 past frames
    residual = torch.randn(1, 5, 5, 9, 10) if with_residual else None
    if channels_last:
        conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        expected = torch.nn.functional.conv3d(x, conv.weight, conv.bias, 1, conv.padding)
        if with_residual:
            expected += residual
        got = _PLANS[plan](conv, x, residual)
    assert got.shape == expected.shape == (1, 5, 5, 9, 10)
    assert (got - expected).abs().max().item() <= 1e-5


def test_the_stacked_taps_follow_a_changed_weight():
    """The stacked kernel is derived from the conv's weight once and kept; loading new weights renews it."""
    from iamflow_core.models.vae import CausalConv3d, _conv_by_stacked_taps

    torch.manual_seed(0)
    conv = CausalConv3d(4, 3, 3, padding=1)
    x = torch.randn(1, 4, 6, 5, 5)
    with torch.no_grad():
        _conv_by_stacked_taps(conv, x)
        conv.load_state_dict({"weight": torch.randn_like(conv.weight), "bias": conv.bias})
        expected = torch.nn.functional.conv3d(x, conv.weight, conv.bias, 1, conv.padding)
        assert (_conv_by_stacked_taps(conv, x) - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
@pytest.mark.parametrize("mode", ["upsample2d", "upsample3d"])
def test_spatial_upsampling_by_phase_kernels_equals_upsample_then_conv(layout, mode):
    """The Resample runs its nearest 2x upsampling and 3x3 conv as four 2x2 phase kernels on the small frames; the
    result is that of the checkpoint's modules run as written, channels-last when its input is (the GPU path)."""
    from iamflow_core.models.vae import Resample, _per_frame

    torch.manual_seed(0)
    resample = Resample(8, mode).eval()
    x = torch.randn(1, 8, 3, 5, 7).contiguous(memory_format=layout)
    with torch.no_grad():
        expected = _per_frame(resample.resample, x)  # nn.Upsample, then the Conv2d
        got = resample._upsample_space(x)
    assert got.shape == expected.shape == (1, 4, 3, 10, 14)
    assert (got - expected).abs().max().item() <= 1e-5
    if layout == torch.channels_last_3d:
        assert got.is_contiguous(memory_format=layout)


def test_the_norm_before_a_causal_conv_writes_the_past_frames_in_the_same_pass():
    from iamflow_core.models import fused
    from iamflow_core.models.vae import CausalConv3d, RMSNorm

    torch.manual_seed(0)
    norm, conv = RMSNorm(4), CausalConv3d(4, 3, 3, padding=1)
    norm.gamma.data.uniform_(0.5, 1.5)
    conv.cache_slot = 0
    x, past = torch.randn(1, 4, 3, 5, 5), torch.randn(1, 4, 2, 5, 5)
    normed = torch.nn.functional.silu(norm(x))
    assert torch.allclose(fused.channel_rms_silu(x, norm.gamma, norm.scale, past), torch.cat([past, normed], 2))
    with torch.no_grad():
        cache = [past]
        got = conv(x, cache, norm=norm)
        expected = torch.nn.functional.conv3d(torch.cat([past, normed], 2), conv.weight, conv.bias, 1, conv.padding)
    assert (got - expected).abs().max().item() <= 1e-5
    assert torch.allclose(cache[0], normed[:, :, -2:])  # the cache keeps the conv's input: the normed frames


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
    key = ((1, 96, 14, 480, 832), torch.bfloat16, "cuda:0", True, (96, 96, 3, 3, 3))
    plan = {"conv3d": 2.0, "taps": 1.5, "stacked": 1.7, "choice": "taps"}
    assert (
        vae_decode.plan_line(key, plan) == "96->96 3x3x3 on 14x480x832: taps (conv3d 2.00, taps 1.50, stacked 1.70 ms)"
    )
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
    residual = torch.randn(4, 3, 5, 6, dtype=torch.bfloat16)
    out = fused.tap_sum(a, b, c, bias, residual)
    assert torch.allclose(out.float(), expected + residual.float(), atol=0.05)


def test_steady_chunks_call_the_fused_kernels_with_the_signatures_of_the_first(monkeypatch):
    """Every new shape or stride a compiled function meets costs a compile (about a second on a fresh machine). The
    past frames a conv keeps must not carry strides of the chunk they came from: after the first steady chunk, the
    decoder's fused kernels see nothing new."""
    from iamflow_core.models import fused
    from iamflow_core.models import vae as vae_module

    signatures: set = set()

    def recording(fn, dynamic):  # stands in for torch.compile: notes what each call would compile for
        def run(*args, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) or a is None]
            signatures.add((fn.__name__, *((None,) if t is None else (t.shape, t.stride()) for t in tensors)))
            return fn(*args, **kwargs)

        return run

    monkeypatch.setattr(fused, "_enabled", True)
    monkeypatch.setattr(fused, "compiles", lambda x: not fused.eager_now())
    monkeypatch.setattr(fused, "_compile", recording)
    # the GPU's conv plans, on the CPU: three 2D convs over the time taps, channels-last
    monkeypatch.setattr(vae_module.CausalConv3d, "_tunable", lambda self, x: self.kernel_size[0] > 1)
    monkeypatch.setattr(vae_module, "_conv_plan", lambda conv, x: "taps")
    torch.manual_seed(0)
    model = vae_module.WanVAE(CFG).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.Conv3d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last_3d)
    state = model.new_decode_state()
    z = torch.randn(1, CFG.z_dim, 3, 6, 8).contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        with fused.eager():  # the pipeline's first chunk
            model.decode_stream(z, state)
        model.decode_stream(z, state)
        first = set(signatures)
        model.decode_stream(z, state)
        model.decode_stream(z, state)
    assert first and signatures == first


def test_kernels_derived_from_weights_made_in_inference_mode():
    """ComfyUI builds and runs models under `torch.inference_mode()`; its tensors have no version counter."""
    from iamflow_core.models.vae import Resample, _per_frame

    torch.manual_seed(0)
    with torch.inference_mode():
        resample = Resample(8, "upsample2d").eval()
        x = torch.randn(1, 8, 2, 5, 7)
        assert resample.resample[1].weight.is_inference()
        expected = _per_frame(resample.resample, x)
        assert (resample._upsample_space(x) - expected).abs().max().item() <= 1e-5
        assert (resample._upsample_space(x) - expected).abs().max().item() <= 1e-5  # kept kernels
