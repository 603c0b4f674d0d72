"""The node pack in-process, without a ComfyUI server: ComfyUI's real node API (`comfy_api`, from the ComfyUI 0.3.64
source the tests use, see `comfyui_source`) with test-time stand-ins for the runtime modules the nodes call
(`folder_paths`, `comfy.utils`, `comfy.model_management`, `server`): model folders on disk, a progress bar whose hook
raises on Cancel (as ComfyUI's does), the interrupt flag, and progress text. The real server and frontend are
exercised by test_frontend.py.

`install()` registers the modules once; `configure(root)` points them at fresh folders for one test.
"""

from __future__ import annotations

import os
import sys
import tarfile
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
        self.messages: list[tuple[str, dict]] = []  # what nodes sent through the server (e.g. mid-run "executed")
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
    fp.get_input_directory = lambda: fp.input_directory
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
        client_id = "test-client"

        def send_progress_text(self, text, node_id, sid=None):
            recorder.texts.append((node_id, text))

        def send_sync(self, event, data, sid=None):
            recorder.messages.append((event, data))

    PromptServer.instance = PromptServer()
    server.PromptServer = PromptServer
    return server


REPO = Path(__file__).resolve().parent.parent
TARBALL = REPO.parent / "shared" / "vendor" / "comfyui-0.3.64.tar.gz"


def comfyui_source() -> Path | None:
    """A ComfyUI 0.3.64 source folder: `IAMFLOW_COMFYUI_SOURCE`, else the vendored tarball (`IAMFLOW_COMFYUI_TARBALL`,
    default ../shared/vendor/comfyui-0.3.64.tar.gz) unpacked once into .cache/; None when there is neither."""
    given = os.environ.get("IAMFLOW_COMFYUI_SOURCE")
    if given:
        return Path(given) if (Path(given) / "comfy_api").is_dir() else None
    tarball = Path(os.environ.get("IAMFLOW_COMFYUI_TARBALL", TARBALL))
    folder = REPO / ".cache" / "comfyui-src" / "ComfyUI-0.3.64"
    if not (folder / ".complete").is_file():
        if not tarball.is_file():
            return None
        with tarfile.open(tarball) as archive:
            archive.extractall(folder.parent, filter="data")
        (folder / ".complete").touch()
    return folder


def install() -> None:
    """The stand-ins, then ComfyUI's own `comfy_api` from its source (its `comfy` package on top of the stand-ins).
    Skips the calling test module when there is no ComfyUI source (fails when IAMFLOW_REQUIRE_COMFYUI=1)."""
    if "folder_paths" in sys.modules and getattr(sys.modules["folder_paths"], "_iamflow_stub", False):
        return
    source = comfyui_source()
    if source is None:
        import pytest

        reason = f"no ComfyUI source for the node API: set IAMFLOW_COMFYUI_SOURCE or put {TARBALL} in place"
        if os.environ.get("IAMFLOW_REQUIRE_COMFYUI") == "1":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason, allow_module_level=True)
    fp = _folder_paths()
    fp._iamflow_stub = True
    comfy, utils, mm = _comfy()
    comfy.__path__ = [str(source / "comfy")]  # comfy.cli_args & co. from the source; utils, model_management stand in
    sys.modules.update(
        {"folder_paths": fp, "comfy": comfy, "comfy.utils": utils, "comfy.model_management": mm, "server": _server()}
    )
    sys.path.append(str(source))  # after the repository: `nodes` stays this pack's, never ComfyUI's nodes.py
    configure(Path(tempfile.mkdtemp(prefix="iamflow-comfy-")))


def node_classes() -> dict:
    """The pack's nodes by node id (what ComfyUI registers from `comfy_entrypoint`)."""
    import nodes

    return {cls.GET_SCHEMA().node_id: cls for cls in nodes.NODES}


def run_node(cls, *args, unique_id: str = "9", **inputs):
    """Run a node as ComfyUI's executor does (a class clone with its hidden inputs, then `execute`): its
    `io.NodeOutput`."""
    from comfy_api.latest import io

    clone = cls.PREPARE_CLASS_CLONE({io.Hidden.unique_id: unique_id})
    return clone.EXECUTE_NORMALIZED(*args, **inputs)


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
    fp.input_directory = str(root / "input")
    for folder in (root / "output", root / "temp"):
        folder.mkdir(parents=True, exist_ok=True)
    _state["interrupted"] = False
    recorder.__init__()
    return recorder
