"""Kernels warmed while the models load (`warmup`): which runs warm, and what the loader calls. The tracing itself
needs CUDA (tests/gpu/test_gpu_pipeline.py)."""

import dataclasses

import pytest

from iamflow_core import warmup
from iamflow_core.config import SamplerConfig
from iamflow_core.presets import TINY_DIT, TINY_T5, TINY_VAE, tiny_models
from iamflow_core.weights import find_model_files, load_models

from ._comfy_layout import write_models


def test_the_kernel_key_names_what_decides_the_kernels():
    dit, _, vae = tiny_models()
    config = SamplerConfig(height=64, width=96)
    key = warmup.kernel_key(dit, vae, config)
    assert key == warmup.kernel_key(dit, vae, SamplerConfig(height=64, width=96))
    others = {
        warmup.kernel_key(dit, vae, dataclasses.replace(config, height=96)),
        warmup.kernel_key(
            dit, vae, dataclasses.replace(config, cache=dataclasses.replace(config.cache, chunk_frames=1))
        ),
        warmup.kernel_key(dit, None, config),
    }
    dit.attention_backend = "flash3"
    others.add(warmup.kernel_key(dit, vae, config))
    assert len(others) == 4 and key not in others


def test_no_warming_off_the_gpu():
    dit, _, vae = tiny_models()
    assert warmup.warm_if_cached(dit, vae, SamplerConfig(height=64, width=96)) is None
    assert warmup.warm_kernels(dit, vae, SamplerConfig(height=64, width=96)) == 0.0


def test_the_loader_warms_with_the_dit_and_vae_it_returns(tmp_path):
    files = find_model_files(write_models(tmp_path / "models", TINY_DIT, TINY_T5, TINY_VAE))
    seen = []
    dit, text_encoder, vae = load_models(files, device="cpu", warm=lambda *models: seen.append(models))
    assert len(seen) == 1 and seen[0][0] is dit and seen[0][1] is vae
    assert text_encoder.encode(["a woman reads"]).shape[0] == 1


def test_files_that_do_not_fit_are_not_warmed_and_still_reported(tmp_path):
    from iamflow_core.weights import CheckpointError

    vae = dataclasses.replace(TINY_VAE, z_dim=8, latents_mean=(0.0,) * 8, latents_std=(1.0,) * 8)
    files = find_model_files(write_models(tmp_path / "models", TINY_DIT, TINY_T5, vae))
    seen = []
    with pytest.raises(CheckpointError, match="latent channels"):
        load_models(files, device="cpu", warm=lambda *models: seen.append(models))
    assert not seen
