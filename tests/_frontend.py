"""ComfyUI 0.3.64 with its own web frontend (1.27.10) in Chromium, driven the way an artist uses it: for
`tests/test_frontend.py` and for the template thumbnails (`python -m tests._frontend thumbnails`).

- `comfyui_dir()`: the ComfyUI folder that `.ci/comfyui_frontend_setup.sh` prepares from the vendored source tarball.
- `Server`: `main.py --cpu` on a free port, with a base directory holding this pack (linked into `custom_nodes/`) and
  tiny random model files under the names the workflows use.
- `Browser`: Debian's chromium, started here (its PID is ours to stop) and driven over CDP by playwright.
- `Frontend`: one page of the frontend: open a template from the template browser, read the layout of the graph as
  drawn (`app.graph`, `app.canvas.ds`), press Run or Cancel, follow the run through the frontend's own websocket.
- Geometry shared with the static workflow test: node rectangles (title bar included) and their overlaps.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / "example_workflows"
PACK = "ComfyUI-IAMFlow"  # the folder name under custom_nodes/, as ComfyUI-Manager installs it
WINDOW = {"width": 1600, "height": 1000}
CANVAS = (1536, 922)  # the graph canvas in that window (frontend 1.27.10: a 64-px bar on the left, 78 px on top)
TITLE_HEIGHT = 30  # LiteGraph.NODE_TITLE_HEIGHT in frontend 1.27.10: the title bar is drawn above node.pos
READABLE_ZOOM = 0.65  # below this the frontend's text is too small to read (and it soon draws blank boxes)
CHROMIUM = os.environ.get("IAMFLOW_CHROMIUM", "/usr/bin/chromium")
STARTUP_S, PAGE_S = 240, 60


# geometry


@dataclass(frozen=True)
class Rect:
    x: float
    y: float
    w: float
    h: float

    def overlaps(self, other: Rect) -> bool:
        """True when the two share area (touching edges do not count)."""
        return (
            self.x < other.x + other.w and other.x < self.x + self.w and self.y < other.y + other.h
            and other.y < self.y + self.h
        )  # fmt: skip

    def inside(self, other: Rect) -> bool:
        return (
            self.x >= other.x and self.y >= other.y and self.x + self.w <= other.x + other.w
            and self.y + self.h <= other.y + other.h
        )  # fmt: skip


def node_rect(pos, size) -> Rect:
    """A node's rectangle on the canvas, its title bar included (LiteGraph draws it above `pos`)."""
    return Rect(pos[0], pos[1] - TITLE_HEIGHT, size[0], size[1] + TITLE_HEIGHT)


def overlapping_pairs(rects: dict[str, Rect]) -> list[tuple[str, str]]:
    names = list(rects)
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1 :] if rects[a].overlaps(rects[b])]


def node_label(node: dict) -> str:
    return f"{node['id']} {node.get('title') or node['type']}"


# the ComfyUI server


class Unavailable(RuntimeError):
    """What the browser test needs is not on this machine (a ComfyUI source, chromium, playwright)."""


def comfyui_dir() -> Path:
    """The ComfyUI 0.3.64 folder, prepared (idempotently) by .ci/comfyui_frontend_setup.sh from the vendored source
    tarball, `IAMFLOW_COMFYUI_TARBALL` where ../shared is absent. Raises Unavailable saying why."""
    try:
        done = subprocess.run(
            ["bash", str(REPO / ".ci" / "comfyui_frontend_setup.sh")], capture_output=True, text=True, timeout=900,
            env={**os.environ, "PYTHON": sys.executable},
        )  # fmt: skip
    except subprocess.TimeoutExpired as e:
        raise Unavailable(".ci/comfyui_frontend_setup.sh took more than 15 minutes (no package registry?)") from e
    if done.returncode != 0:
        raise Unavailable(f".ci/comfyui_frontend_setup.sh failed: {done.stderr.strip()[-600:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(process: subprocess.Popen, timeout: float = 20) -> None:
    """End a process we started, by its PID: SIGTERM, then SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()


def prepare_base(root: Path) -> Path:
    """A ComfyUI base directory: models/ with tiny random files under the workflows' names (tiny Qwen3 and Qwen3-VL
    folders as the LLM and the VLM), custom_nodes/ComfyUI-IAMFlow linked to this repository."""
    from tests._comfy_models import LLM_FOLDER, VLM_FOLDER, write_tiny_models
    from tests._tiny_qwen import tiny_qwen_folders

    write_tiny_models(root / "models", fp8_dit=True)
    qwen = tiny_qwen_folders()
    (root / "models" / "LLM").mkdir(exist_ok=True)
    (root / "models" / "LLM" / LLM_FOLDER).symlink_to(qwen.llm, target_is_directory=True)
    (root / "models" / "LLM" / VLM_FOLDER).symlink_to(qwen.vlm, target_is_directory=True)
    (root / "custom_nodes").mkdir()
    (root / "custom_nodes" / PACK).symlink_to(REPO, target_is_directory=True)
    _write_pictures(root / "input")
    return root


def _write_pictures(folder: Path) -> None:
    """The pictures iamflow_pictures.json loads (its Load Image nodes), as an artist would have uploaded them."""
    import numpy as np
    from PIL import Image

    from tests._comfy_workflows import PICTURES

    folder.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(PICTURES):
        pixels = np.random.default_rng(seed).integers(0, 256, (96, 128, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)


class Server:
    """`python main.py --cpu` of ComfyUI 0.3.64 on a free port, everything it writes under `root`."""

    def __init__(self, comfy_dir: Path, root: Path) -> None:
        self.root, self.port = root, _free_port()
        self.visited = False  # whether a page has opened the frontend yet (its user settings are fresh until then)
        self.url = f"http://127.0.0.1:{self.port}"
        self.output = root / "output"
        self.log = root / "comfyui.log"
        command = [
            sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--disable-auto-launch", "--base-directory", str(root), "--database-url", "sqlite:///:memory:",
        ]  # fmt: skip
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(command, cwd=comfy_dir, stdout=out, stderr=subprocess.STDOUT)
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict):
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def run_prompt(self, prompt: dict, timeout_s: float) -> dict:
        """POST an API-form prompt and wait for its history entry (outputs and status)."""
        prompt_id = self.post("/prompt", {"prompt": prompt, "client_id": "iamflow-test"})["prompt_id"]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            entry = self.get(f"/api/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                return entry
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout_s} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def stop(self) -> None:
        _stop(self.process)

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited at startup:\n{self.log_tail()}")
            try:
                self.get("/api/object_info/IAMFlowStreamingSampler")
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not answer in {STARTUP_S} s:\n{self.log_tail()}")


# the browser


class Browser:
    """Debian's chromium, headless, started here (so its PID is ours) and driven by playwright over CDP; never
    `playwright install`."""

    def __init__(self) -> None:
        if not Path(CHROMIUM).is_file():
            raise Unavailable(f"no chromium at {CHROMIUM} (Debian: apt-get install -y chromium)")
        try:
            from playwright.sync_api import sync_playwright
        except ImportError as e:
            raise Unavailable("the playwright package is not installed (pip install playwright)") from e
        self.profile = Path(tempfile.mkdtemp(prefix="iamflow-chromium-"))
        port = _free_port()
        command = [
            CHROMIUM, "--headless=new", "--no-sandbox", f"--remote-debugging-port={port}",
            f"--user-data-dir={self.profile}", "--no-first-run", "--no-default-browser-check", "--mute-audio",
            "--hide-scrollbars", f"--window-size={WINDOW['width']},{WINDOW['height']}", "about:blank",
        ]  # fmt: skip
        self.log = self.profile / "chromium.log"
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        self.playwright = None
        try:
            self._wait_for_devtools(port)
            self.playwright = sync_playwright().start()
            self.browser = self.playwright.chromium.connect_over_cdp(f"http://127.0.0.1:{port}")
        except BaseException:
            self.stop()
            raise

    def new_page(self):
        context = self.browser.new_context(viewport=WINDOW, device_scale_factor=1)
        return context.new_page()

    def stop(self) -> None:
        if self.playwright is not None:
            try:
                self.browser.close()
            finally:
                self.playwright.stop()  # ends playwright's own driver process
        _stop(self.process)
        shutil.rmtree(self.profile, ignore_errors=True)

    def _wait_for_devtools(self, port: int) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"chromium exited: {self.log.read_text(errors='replace')[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/version", timeout=2):
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)
        raise RuntimeError("chromium did not open its DevTools port in 30 s")


# the frontend

# Installed once per page: every websocket message the frontend's api object dispatches that tells how a run goes.
_RECORD_EVENTS = """() => {
  window.__iamflow = [];
  for (const type of ['execution_start', 'executing', 'progress', 'progress_text', 'executed', 'execution_success',
                      'execution_error', 'execution_interrupted'])
    app.api.addEventListener(type, (e) =>
      window.__iamflow.push({type, detail: JSON.parse(JSON.stringify(e.detail ?? null))}));
}"""

# What is on screen: the view, every node's rectangle (title bar included) and the parts of the UI drawn over the
# canvas (the minimap and the zoom toolbar), in page pixels.
_LAYOUT = """() => {
  const box = (el) => { if (!el) return null; const r = el.getBoundingClientRect();
    return r.width && r.height ? [r.left, r.top, r.width, r.height] : null; };
  const fit = document.querySelector('button[aria-label^="Fit View"]');
  return {
    scale: app.canvas.ds.scale, offset: [...app.canvas.ds.offset], lowQuality: !!app.canvas.low_quality,
    titleHeight: LiteGraph.NODE_TITLE_HEIGHT, canvas: box(app.canvas.canvas),
    overlays: [box(document.querySelector('.minimap-main-container')), box(fit?.closest('.p-buttongroup'))]
      .filter(Boolean),
    nodes: app.graph._nodes.map((n) => ({id: n.id, type: n.type, title: n.title, pos: [...n.pos], size: [...n.size],
      collapsed: !!n.flags?.collapsed, registered: !!LiteGraph.registered_node_types[n.type]})),
    dialogs: [...document.querySelectorAll('[role=dialog]')].filter((d) => d.offsetParent !== null)
      .map((d) => d.innerText.slice(0, 300)),
  };
}"""

# How the node shows its result: a <video> element (the frontend's video preview widget) or still images.
_PREVIEW = """(id) => {
  const node = app.graph.getNodeById(id);
  const video = node.videoContainer?.querySelector('video')
    ?? node.widgets?.map((w) => w.element?.querySelector?.('video')).find(Boolean) ?? null;
  return {
    media: node.previewMediaType ?? null,
    video: video && {src: video.currentSrc || video.src, readyState: video.readyState, width: video.videoWidth,
                     height: video.videoHeight, connected: video.isConnected},
    images: (node.imgs ?? []).map((img) => img.currentSrc || img.src),
    widgets: (node.widgets ?? []).map((w) => w.name),
  };
}"""


def _timeout_error() -> type[Exception]:
    from playwright.sync_api import TimeoutError

    return TimeoutError


@dataclass
class Layout:
    """The graph as the frontend draws it (graph units) and the view it draws it in."""

    scale: float
    offset: tuple[float, float]
    low_quality: bool
    canvas: Rect  # page pixels
    overlays: list[Rect]  # page pixels: UI drawn over the canvas
    nodes: list[dict]
    dialogs: list[str]

    @classmethod
    def from_page(cls, raw: dict) -> Layout:
        assert raw["titleHeight"] == TITLE_HEIGHT, f"the frontend's title bar is {raw['titleHeight']} px"
        return cls(
            raw["scale"], tuple(raw["offset"]), raw["lowQuality"], Rect(*raw["canvas"]),
            [Rect(*o) for o in raw["overlays"]], raw["nodes"], raw["dialogs"],
        )  # fmt: skip

    def rects(self) -> dict[str, Rect]:
        return {node_label(n): node_rect(n["pos"], n["size"]) for n in self.nodes}

    def on_screen(self, rect: Rect) -> Rect:
        """A graph rectangle in page pixels (LiteGraph: screen = (graph + offset) * scale)."""
        (ox, oy), s = self.offset, self.scale
        return Rect(self.canvas.x + (rect.x + ox) * s, self.canvas.y + (rect.y + oy) * s, rect.w * s, rect.h * s)

    def hidden_nodes(self) -> list[str]:
        """Nodes not wholly in the visible canvas: outside it, or under the minimap or the zoom toolbar."""
        hidden = []
        for label, rect in self.rects().items():
            seen = self.on_screen(rect)
            if not seen.inside(self.canvas) or any(seen.overlaps(o) for o in self.overlays):
                hidden.append(label)
        return hidden


@dataclass
class Run:
    prompt_id: str
    events: list[dict] = field(default_factory=list)

    @property
    def outcome(self) -> str:
        ends = [e["type"] for e in self.events if e["type"] in ("execution_success", "execution_error",
                                                                  "execution_interrupted")]  # fmt: skip
        return ends[-1] if ends else "running"

    def texts(self, node_id) -> list[str]:
        """The status texts a node showed, in order."""
        return [e["detail"]["text"] for e in self.events
                if e["type"] == "progress_text" and str(e["detail"]["nodeId"]) == str(node_id)]  # fmt: skip


class Frontend:
    """One browser page on the ComfyUI frontend, used as an artist would."""

    def __init__(self, page, server: Server) -> None:
        self.page, self.server = page, server

    def open(self) -> None:
        """Load the frontend afresh; a new user's first visit opens the template browser by itself."""
        self.first_visit, self.server.visited = not self.server.visited, True
        self.page.goto(self.server.url + "/")
        ready = "() => window.app?.graph && window.app.canvas && window.app.api"
        self.page.wait_for_function(ready, timeout=PAGE_S * 1000)
        self.page.evaluate(_RECORD_EVENTS)

    def open_template(self, name: str) -> dict:
        """Workflow → Browse Templates → ComfyUI-IAMFlow → the card `name`: the path an artist takes. Returns what
        the card showed: {"title", "thumbnail": natural width of its picture, 0 when it did not load}."""
        dialog = self.page.get_by_role("dialog").filter(has=self.page.get_by_role("option", name=PACK))
        if self.first_visit:  # a new user's first visit opens the template browser by itself
            dialog.wait_for(timeout=PAGE_S * 1000)
        else:
            self.page.locator("button.templates-tab-button").click()
        dialog.get_by_role("option", name=PACK).click()
        card = dialog.get_by_test_id(f"template-workflow-{name}")
        card.wait_for(timeout=PAGE_S * 1000)
        picture = card.locator("img")
        with contextlib.suppress(_timeout_error()):  # a thumbnail that does not load stays hidden behind an icon
            self.page.wait_for_function("(img) => img.naturalWidth > 0", arg=picture.element_handle(), timeout=10_000)
        shown = {"title": card.locator("h3").inner_text(), "thumbnail": picture.evaluate("img => img.naturalWidth")}
        count = len(json.loads((WORKFLOWS / f"{name}.json").read_text())["nodes"])
        card.click()
        self.page.wait_for_function(f"() => app.graph._nodes.length === {count}", timeout=PAGE_S * 1000)
        dialog.wait_for(state="hidden", timeout=PAGE_S * 1000)
        self.page.wait_for_timeout(1000)  # DOM widgets (text areas) settle, the canvas redraws
        return shown

    def layout(self) -> Layout:
        return Layout.from_page(self.page.evaluate(_LAYOUT))

    def set_widgets(self, values: dict[str, dict]) -> None:
        """Type widget values into nodes, by node type: {"IAMFlowStory": {"text": "..."}}."""
        self.page.evaluate(
            """(values) => { for (const n of app.graph._nodes)
                 for (const [k, v] of Object.entries(values[n.type] ?? {})) {
                   const w = n.widgets.find((w) => w.name === k); w.value = v; w.callback?.(v); } }""",
            values,
        )  # fmt: skip

    def press_run(self) -> Run:
        """The Run button (`app.queuePrompt(0, 1)`); returns once the server has started the prompt."""
        start = self.page.evaluate("() => window.__iamflow.length")
        self.page.get_by_role("button", name="Run", exact=True).click()
        self.page.wait_for_function(
            f"() => window.__iamflow.slice({start}).some((e) => e.type === 'execution_start')", timeout=PAGE_S * 1000
        )
        detail = self.page.evaluate(f"() => window.__iamflow.slice({start}).find((e) => e.type === 'execution_start')")
        return Run(detail["detail"]["prompt_id"])

    def press_cancel(self) -> None:
        self.page.get_by_role("button", name="Cancel current run").click()

    def wait_for_progress(self, run: Run, node_id, value: int, timeout_s: float) -> None:
        """Until the node's progress bar reaches `value` (one step per chunk for the sampler) or the run ends."""
        self.page.wait_for_function(
            """([pid, node, value]) => window.__iamflow.some((e) => e.detail?.prompt_id === pid && (
                 (e.type === 'progress' && String(e.detail.node) === node && e.detail.value >= value)
                 || ['execution_success', 'execution_error', 'execution_interrupted'].includes(e.type)))""",
            arg=[run.prompt_id, str(node_id), value], timeout=timeout_s * 1000,
        )  # fmt: skip

    def wait_for_end(self, run: Run, timeout_s: float) -> Run:
        ends = "['execution_success', 'execution_error', 'execution_interrupted']"
        try:
            self.page.wait_for_function(
                f"(pid) => window.__iamflow.some((e) => {ends}.includes(e.type) && e.detail?.prompt_id === pid)",
                arg=run.prompt_id, timeout=timeout_s * 1000,
            )  # fmt: skip
        finally:
            run.events = self.page.evaluate(
                "(pid) => window.__iamflow.filter((e) => !e.detail?.prompt_id || e.detail.prompt_id === pid)",
                run.prompt_id,
            )  # fmt: skip
        return run

    def preview(self, node_id) -> dict:
        return self.page.evaluate(_PREVIEW, node_id)

    def wait_for_previews(self, types: tuple[str, ...], timeout_s: float = 10) -> None:
        """Until every node of these types that has an output shows its picture (for the screenshot)."""
        with contextlib.suppress(_timeout_error()):
            self.page.wait_for_function(
                "(types) => app.graph._nodes.filter((n) => types.includes(n.type)).every((n) => n.imgs?.length)",
                arg=list(types), timeout=timeout_s * 1000,
            )  # fmt: skip

    def wait_for_video(self, node_id, name: str = "", timeout_s: float = 10) -> dict:
        """Until the node plays a loaded <video> whose address holds `name` (or the time is up); returns what the
        node shows."""
        with contextlib.suppress(_timeout_error()):  # the caller checks what the node shows
            video = f"({_PREVIEW})(id).video"
            playing = f"([id, name]) => {{ const v = {video}; return v?.readyState >= 2 && v.src.includes(name); }}"
            self.page.wait_for_function(playing, arg=[node_id, name], timeout=timeout_s * 1000)
        return self.preview(node_id)

    def screenshot(self, path: Path) -> None:
        """The page as a JPEG (quality 85: readable text, a tenth of the PNG's bytes in the repository)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path), type="jpeg", quality=85)

    def canvas_picture(self, path: Path, width: int = 768) -> None:
        """The graph alone (canvas region, minimap and zoom toolbar hidden) as a JPEG `width` pixels wide."""
        from PIL import Image

        self.page.add_style_tag(content=".minimap-main-container, .p-buttongroup { display: none !important; }")
        self.page.evaluate("() => { app.canvas.show_info = false; app.canvas.setDirty(true, true); }")
        self.page.wait_for_timeout(300)
        canvas = self.layout().canvas
        clip = {"x": canvas.x, "y": canvas.y, "width": canvas.w, "height": canvas.h}
        with tempfile.TemporaryDirectory() as tmp:
            png = Path(tmp) / "canvas.png"
            self.page.screenshot(path=str(png), clip=clip)
            with Image.open(png) as image:
                small = image.convert("RGB").resize((width, round(width * canvas.h / canvas.w)), Image.LANCZOS)
                small.save(path, "JPEG", quality=85, optimize=True)


# thumbnails


def write_thumbnails(out: Path = WORKFLOWS) -> list[Path]:
    """example_workflows/NAME.jpg for every NAME.json: its graph as the frontend opens it from the template browser."""
    written = []
    with tempfile.TemporaryDirectory(prefix="iamflow-thumbnails-") as tmp:
        server = Server(comfyui_dir(), prepare_base(Path(tmp)))
        try:
            browser = Browser()
            try:
                for path in sorted(WORKFLOWS.glob("*.json")):
                    front = Frontend(browser.new_page(), server)
                    front.open()
                    front.open_template(path.stem)
                    front.canvas_picture(out / f"{path.stem}.jpg")
                    front.page.context.close()
                    written.append(out / f"{path.stem}.jpg")
            finally:
                browser.stop()
        finally:
            server.stop()
    return written


if __name__ == "__main__":
    import argparse
    import logging

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["thumbnails"])
    parser.add_argument("--out", type=Path, default=WORKFLOWS, help="folder for NAME.jpg (default: %(default)s)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    for written in write_thumbnails(args.out):
        logging.info("wrote %s", written)
