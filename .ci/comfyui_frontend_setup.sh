#!/usr/bin/env bash
# ComfyUI 0.3.64 with its real web frontend (comfyui-frontend-package 1.27.10) for tests/test_frontend.py, from the
# vendored source tarball (see ../shared/vendor/README.md) and PyPI. Idempotent; prints the ComfyUI folder.
#
# Into the current Python: ComfyUI's requirements.txt minus torch/torchvision/torchaudio, with torch pinned by a
# constraints file to the version already installed (so no requirement can swap in a CUDA build), spandrel without
# its dependencies (they would pull torchvision), requests, and playwright (the browser is Debian's chromium; never
# `playwright install`). pip's default strategy leaves every package that already satisfies a requirement alone.
#
# There is no CPU torchvision on PyPI for this torch, and a stand-in package would fool transformers into thinking
# it is installed, so the five module-level torchvision imports of models we never load are made optional.
#
#   .ci/comfyui_frontend_setup.sh [CACHE_DIR]   (default: .cache in the repository)
#   IAMFLOW_COMFYUI_TARBALL   the source tarball (default: ../shared/vendor/comfyui-0.3.64.tar.gz, from the repo)
set -euo pipefail
cd "$(dirname "$0")/.."
cache="$(mkdir -p "${1:-.cache}" && cd "${1:-.cache}" && pwd)"
comfy="$cache/comfyui-0.3.64"
python="${PYTHON:-python3}"
tarball="${IAMFLOW_COMFYUI_TARBALL:-../shared/vendor/comfyui-0.3.64.tar.gz}"

if [ ! -f "$comfy/.complete" ]; then
    if [ ! -f "$tarball" ]; then
        echo "no ComfyUI source at $tarball; set IAMFLOW_COMFYUI_TARBALL to comfyui-0.3.64.tar.gz" >&2
        exit 2
    fi
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    tar -xzf "$tarball" -C "$work"
    rm -rf "$comfy"
    mv "$work/ComfyUI-0.3.64" "$comfy"
    "$python" - "$comfy" <<'PY'
import pathlib, sys

root = pathlib.Path(sys.argv[1])
imports = {
    "comfy/ldm/cascade/stage_c_coder.py": ("import torchvision", "torchvision"),
    "comfy/ldm/cascade/controlnet.py": ("import torchvision", "torchvision"),
    "comfy/ldm/cosmos/model.py": ("from torchvision import transforms", "transforms"),
    "comfy/ldm/cosmos/predict2.py": ("from torchvision import transforms", "transforms"),
    "comfy/ldm/ace/vae/music_dcae_pipeline.py": ("import torchvision.transforms as transforms", "transforms"),
}
for file, (line, name) in imports.items():
    path = root / file
    text = path.read_text()
    assert text.count(f"\n{line}\n") == 1, f"{path}: expected one '{line}' line"
    guarded = f"try:\n    {line}\nexcept ImportError:  # torchvision is not installed in the IAMFlow test engine\n    {name} = None\n"
    path.write_text(text.replace(f"\n{line}\n", "\n" + guarded, 1))
PY
    touch "$comfy/.complete"
fi

stamp="$comfy/.requirements-$("$python" -c 'import sys; print(sys.prefix.replace("/", "_"))')"
installed='import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, sys.argv[1:])))'
if [ ! -f "$stamp" ] || ! "$python" -c "$installed" comfyui_frontend_package playwright spandrel 2>/dev/null; then
    # the torch already installed (a CPU build stays one), else the one the README installs
    torch_version="$("$python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || echo 2.13.0)"
    grep -v -E '^(torch|torchvision|torchaudio|spandrel)\b' "$comfy/requirements.txt" > "$comfy/requirements-cpu.txt"
    echo "torch==$torch_version" > "$comfy/constraints.txt"
    "$python" -m pip install -q -c "$comfy/constraints.txt" -r "$comfy/requirements-cpu.txt" requests playwright >&2
    "$python" -m pip install -q --no-deps spandrel >&2
    touch "$stamp"
fi
echo "$comfy"
