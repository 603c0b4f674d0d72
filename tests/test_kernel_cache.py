"""Compiled kernels are kept in one folder between runs (`IAMFLOW_CACHE_DIR`, default the user's cache folder)."""

import logging
import os

import pytest

from iamflow_core.models import fused


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("IAMFLOW_CACHE_DIR", "XDG_CACHE_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR",
                 "IAMFLOW_COMPILE"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    fused.enable(False)


def test_compiling_points_both_kernel_caches_into_iamflow_cache_dir(clean_env, tmp_path):
    clean_env.setenv("IAMFLOW_CACHE_DIR", str(tmp_path / "kernels"))
    fused.enable(True)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "kernels" / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "kernels" / "triton")
    assert (tmp_path / "kernels").is_dir()


def test_the_default_is_the_users_cache_folder_and_a_users_own_setting_stands(clean_env, tmp_path):
    clean_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    clean_env.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert fused.use_cache_dir() == tmp_path / "xdg" / "iamflow"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "xdg" / "iamflow" / "triton")


def test_torchs_own_temp_default_is_replaced(clean_env, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    clean_env.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what TorchInductor writes once it compiled
    clean_env.setenv("IAMFLOW_CACHE_DIR", str(tmp_path / "kernels"))
    fused.use_cache_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "kernels" / "inductor")


def test_a_folder_that_cannot_be_written_is_a_warning_not_a_failure(clean_env, tmp_path, caplog):
    (tmp_path / "file").write_text("not a folder")
    clean_env.setenv("IAMFLOW_CACHE_DIR", str(tmp_path / "file" / "kernels"))
    with caplog.at_level(logging.WARNING, logger="iamflow_core.models.fused"):
        assert fused.use_cache_dir() is None
    assert "cannot be written" in caplog.text and "IAMFLOW_CACHE_DIR" in caplog.text
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ


def test_compile_off_touches_nothing(clean_env, tmp_path):
    clean_env.setenv("IAMFLOW_CACHE_DIR", str(tmp_path / "kernels"))
    clean_env.setenv("IAMFLOW_COMPILE", "0")
    fused.enable(True)
    assert not fused.enabled() and not (tmp_path / "kernels").exists()
