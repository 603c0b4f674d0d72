"""The full-size Wan VAE on a GPU: bf16 streaming decode (channels-last, autotuned convs) against fp32."""

import pytest
import torch

from iamflow_core.config import VAEConfig
from iamflow_core.models.vae import CONV_PLANS, WanVAE

pytestmark = pytest.mark.gpu


@torch.no_grad()
def test_bf16_streaming_decode_matches_fp32():
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
    print(f"bf16 streaming decode vs fp32: {rel:.3%} relative; conv plans: {list(CONV_PLANS.values())}")
    assert rel <= 0.03
    assert CONV_PLANS  # the 3x3x3 convs were timed both ways
