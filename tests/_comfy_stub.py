"""Test-time stand-ins for the ComfyUI modules the node pack imports (`folder_paths`, `comfy.utils`,
`comfy.model_management`, `server`), with the behaviour the nodes rely on: model folders on disk, a progress bar
whose hook raises on Cancel (as ComfyUI's does), the interrupt flag, and progress text. The real engine is
exercised by test_comfyui_engine.py; these let the node functions run directly in-process.

`install()` registers the modules once; `configure(root)` points them at fresh folders for one test.
"""

from __future__ import annotations

import os
import sys
import tempfile
import types
from pathlib import Path

SUPPORTED = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}


class InterruptProcessingException(Exception):
    pass


class Recorder:
    """What the nodes sent to the UI during a test."""

    def __init__(self) -> None:
        self.progress: list[tuple[int, int, object]] = []
        self.texts: list[tuple[str, str]] = []
        self.interrupt_after: int | None = None  # set the interrupt flag after this many progress updates


recorder = Recorder()
_state = {"interrupted": False}


def _folder_paths() -> types.ModuleType:
    fp = types.ModuleType("folder_paths")
    fp.supported_pt_extensions = SUPPORTED
    fp.folder_names_and_paths = {}

    def get_folder_paths(name):
        return list(fp.folder_names_and_paths[name][0])

    def add_model_folder_path(name, path, is_default=False):
        if name in fp.folder_names_and_paths:
            fp.folder_names_and_paths[name][0].append(path)
        else:
            fp.folder_names_and_paths[name] = ([path], set())

    def get_filename_list(name):
        paths, extensions = fp.folder_names_and_paths[name]
        found = []
        for base in paths:
            for folder, _, files in os.walk(base, followlinks=True):
                for f in files:
                    if not extensions or os.path.splitext(f)[1] in extensions:
                        found.append(Path(folder, f).relative_to(base).as_posix())
        return sorted(set(found))

    def get_full_path(name, filename):
        for base in fp.folder_names_and_paths[name][0]:
            path = os.path.join(base, filename)
            if os.path.isfile(path):
                return path
        return None

    def get_save_image_path(prefix, output_dir, width=0, height=0):
        subfolder, name = os.path.split(prefix)
        folder = os.path.join(output_dir, subfolder)
        os.makedirs(folder, exist_ok=True)
        counter = 1 + sum(1 for f in os.listdir(folder) if f.startswith(name + "_"))
        return folder, name, counter, subfolder, prefix

    fp.get_folder_paths, fp.add_model_folder_path = get_folder_paths, add_model_folder_path
    fp.get_filename_list, fp.get_full_path, fp.get_save_image_path = (
        get_filename_list,
        get_full_path,
        get_save_image_path,
    )
    fp.get_output_directory = lambda: fp.output_directory
    fp.get_temp_directory = lambda: fp.temp_directory
    return fp


def _comfy() -> tuple[types.ModuleType, types.ModuleType, types.ModuleType]:
    comfy = types.ModuleType("comfy")
    comfy.__path__ = []
    mm = types.ModuleType("comfy.model_management")
    mm.InterruptProcessingException = InterruptProcessingException

    def interrupt_current_processing(value=True):
        _state["interrupted"] = value

    def throw_exception_if_processing_interrupted():
        if _state["interrupted"]:
            _state["interrupted"] = False
            raise InterruptProcessingException()

    mm.interrupt_current_processing = interrupt_current_processing
    mm.processing_interrupted = lambda: _state["interrupted"]
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted

    utils = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total, self.current = total, 0

        def update_absolute(self, value, total=None, preview=None):
            self.current, self.total = value, total or self.total
            recorder.progress.append((value, self.total, preview))
            if recorder.interrupt_after is not None and len(recorder.progress) >= recorder.interrupt_after:
                interrupt_current_processing(True)
            throw_exception_if_processing_interrupted()  # ComfyUI's progress hook does this

        def update(self, value):
            self.update_absolute(self.current + value)

    utils.ProgressBar = ProgressBar
    comfy.utils, comfy.model_management = utils, mm
    return comfy, utils, mm


def _server() -> types.ModuleType:
    server = types.ModuleType("server")

    class PromptServer:
        instance = None

        def send_progress_text(self, text, node_id, sid=None):
            recorder.texts.append((node_id, text))

    PromptServer.instance = PromptServer()
    server.PromptServer = PromptServer
    return server


def install() -> None:
    if "folder_paths" in sys.modules and getattr(sys.modules["folder_paths"], "_iamflow_stub", False):
        return
    fp = _folder_paths()
    fp._iamflow_stub = True
    comfy, utils, mm = _comfy()
    sys.modules.update(
        {"folder_paths": fp, "comfy": comfy, "comfy.utils": utils, "comfy.model_management": mm, "server": _server()}
    )
    configure(Path(tempfile.mkdtemp(prefix="iamflow-comfy-")))


def configure(root: Path, *, legacy_names: bool = False) -> Recorder:
    """Fresh model/output/temp folders under `root` (ComfyUI layout) and a clean recorder.

    legacy_names: the folder keys of ComfyUI before mid-2024 (`unet`, `clip`) instead of `diffusion_models`,
    `text_encoders`, to check that the pack adds the new keys itself.
    """
    fp = sys.modules["folder_paths"]
    models = root / "models"
    keys = ("unet", "clip") if legacy_names else ("diffusion_models", "text_encoders")
    fp.models_dir = str(models)
    fp.folder_names_and_paths = {
        key: ([str(models / key)], SUPPORTED) for key in (*keys, "vae", "loras", "checkpoints")
    }
    fp.output_directory, fp.temp_directory = str(root / "output"), str(root / "temp")
    for folder in (root / "output", root / "temp"):
        folder.mkdir(parents=True, exist_ok=True)
    _state["interrupted"] = False
    recorder.__init__()
    return recorder
