"""The full-size Wan VAE on a GPU: bf16 streaming decode (channels-last, autotuned convs) against fp32."""

import pytest
import torch

from iamflow_core.config import VAEConfig
from iamflow_core.models import fused
from iamflow_core.models.vae import CONV_PLANS, Resample, WanVAE

pytestmark = pytest.mark.gpu


@pytest.fixture(params=[False, True], ids=["eager", "compiled"])
def compiled(request):
    """Both the plain PyTorch path and the fused kernels (tap sums with the residual, norms writing the past frames,
    the phase interleave of the upsampling)."""
    fused.enable(request.param)
    yield request.param
    fused.enable(False)


@torch.no_grad()
def test_bf16_streaming_decode_matches_fp32(compiled):
    torch.manual_seed(0)
    vae = WanVAE(VAEConfig()).cuda().eval()
    latents = torch.randn(1, 16, 7, 60, 104, device="cuda")
    reference = vae.decode(latents)
    vae.to(torch.bfloat16)
    state = vae.new_decode_state()
    chunks = [vae.decode_stream(latents[:, :, a:b].bfloat16(), state) for a, b in ((0, 1), (1, 4), (4, 7))]
    video = torch.cat(chunks, dim=2).float()
    assert video.shape == reference.shape == (1, 3, 25, 480, 832)
    rel = ((video - reference).norm() / reference.norm()).item()
    print(f"bf16 streaming decode vs fp32 (compiled={compiled}): {rel:.3%}; conv plans: {list(CONV_PLANS.values())}")
    assert rel <= 0.03
    assert CONV_PLANS  # the 3x3x3 convs were timed both ways


@torch.no_grad()
def test_the_compiled_phase_interleave_writes_channels_last(compiled):
    torch.manual_seed(0)
    resample = Resample(192, "upsample2d").cuda().to(torch.bfloat16).eval()
    resample.resample[1].weight.data = resample.resample[1].weight.data.contiguous(memory_format=torch.channels_last)
    x = torch.randn(1, 192, 4, 24, 40, device="cuda", dtype=torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    got = resample._upsample_space(x)
    reference = resample.float()._upsample_space(x.float())  # fp32 (TF32 convs) through the same phase kernels
    expected = (
        torch.nn.functional.conv2d(
            torch.nn.functional.interpolate(x.float().transpose(1, 2).flatten(0, 1), scale_factor=2.0),
            resample.resample[1].weight,
            resample.resample[1].bias,
            1,
            1,
        )
        .unflatten(0, (1, 4))
        .transpose(1, 2)
    )
    assert got.is_contiguous(memory_format=torch.channels_last_3d)
    assert ((reference - expected).norm() / expected.norm()).item() < 1e-3
    assert ((got.float() - expected).norm() / expected.norm()).item() < 0.01


@torch.no_grad()
@pytest.mark.parametrize("first", [1, 3], ids=["one-latent-frame-first", "three-latent-frames-first"])
def test_every_tuned_conv_reads_channels_last_whatever_the_first_chunk(monkeypatch, first):
    """A stream that starts with one latent frame (frame-wise presets, `decode`) used to leave some convs' caches in
    the plain layout, and every later chunk of those convs on cuDNN's slow kernels."""
    from iamflow_core.models import vae as vae_module

    seen = []
    plan = vae_module._conv_plan
    monkeypatch.setattr(vae_module, "_conv_plan", lambda conv, x: seen.append(x) or plan(conv, x))
    torch.manual_seed(0)
    vae = WanVAE(VAEConfig()).cuda().to(torch.bfloat16).eval()
    state = vae.new_decode_state()
    z = torch.randn(1, 16, 3, 30, 52, device="cuda", dtype=torch.bfloat16)
    for n in (first, 1, 3):
        vae.decode_stream(z[:, :, :n], state)
    assert seen and all(x.is_contiguous(memory_format=torch.channels_last_3d) for x in seen)


@torch.no_grad()
def test_a_conv3d_plan_adds_its_bias_and_residual_in_one_channels_last_pass():
    """The convs cuDNN runs as one conv3d get their bias and a residual block's shortcut from one compiled kernel
    (`fused.bias_add`), whose output stays channels-last for the convs after it."""
    from iamflow_core.models.vae import CausalConv3d, _conv3d

    fused.enable(True)
    try:
        torch.manual_seed(0)
        conv = CausalConv3d(32, 32, 3, padding=1).cuda().to(torch.bfloat16)
        conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last_3d)
        x = torch.randn(1, 32, 6, 24, 40, device="cuda", dtype=torch.bfloat16)
        x = x.contiguous(memory_format=torch.channels_last_3d)
        residual = torch.randn(1, 32, 4, 24, 40, device="cuda", dtype=torch.bfloat16)
        residual = residual.contiguous(memory_format=torch.channels_last_3d)
        got = _conv3d(conv, x, residual)
        expected = torch.nn.functional.conv3d(x.float(), conv.weight.float(), conv.bias.float(), 1, conv.padding)
        expected += residual.float()
        assert got.is_contiguous(memory_format=torch.channels_last_3d)
        assert ((got.float() - expected).norm() / expected.norm()).item() < 0.01
    finally:
        fused.enable(False)
