"""NarraStream-Bench scoring of rendered stories: `python -m iamflow_core eval MANIFEST --dino DIR --clip DIR`.

Modules: `inputs` (the manifest and story maps), `features` (DINO and CLIP from local folders), `scan` (one
streaming pass over a video), `metrics` (the dimensions, pure functions), `judge` (the MLLM-judged dimension over
an OpenAI-compatible endpoint), `story` (one story), `cli` (the command). The benchmark's constants live in
`settings`.
"""

from .inputs import EvalError, read_manifest, read_story_layout
from .settings import BENCH, BenchSettings

__all__ = ["BENCH", "BenchSettings", "EvalError", "read_manifest", "read_story_layout"]
