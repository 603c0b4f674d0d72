"""The import rules of the library, read from its source with `ast` (no module is imported here).

- the library never imports ComfyUI;
- `models/` (pure nn.Modules) imports neither weight loading nor the pipeline and what runs it;
- `memory/` imports no language-model code: it talks to the verifier through `verify.Verifier`;
- no import cycles anywhere in `iamflow_core`, counting the imports inside functions too.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "iamflow_core"
COMFYUI = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "server", "nodes", "execution"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str) -> set[str]:
    """Every module `name` imports (absolute names), at any depth of its code. `from pkg import x` counts as
    importing `pkg.x` when that is a module of ours, else `pkg`."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def _ours(names: set[str]) -> set[str]:
    return {n for n in names if n in MODULES}


def test_the_library_never_imports_comfyui():
    bad = {m: sorted(i for i in imports if i.split(".")[0] in COMFYUI) for m, imports in GRAPH.items()}
    assert not {m: i for m, i in bad.items() if i}


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        ("iamflow_core.models", ("iamflow_core.weights", "iamflow_core.pipeline", "iamflow_core.render",
                                 "iamflow_core.settings", "iamflow_core.cli", "iamflow_core.memory")),
        ("iamflow_core.memory", ("iamflow_core.story.llm", "iamflow_core.story.vlm", "iamflow_core.story.hf",
                                 "iamflow_core.settings", "iamflow_core.pipeline", "transformers")),
        ("iamflow_core.verify", ("iamflow_core.story.llm", "iamflow_core.story.vlm", "transformers")),
        ("iamflow_core.config", ("iamflow_core.",)),
    ],
)  # fmt: skip
def test_layers_import_only_downwards(layer, forbidden):
    offences = {
        module: sorted(i for i in imports if i.startswith(forbidden))
        for module, imports in GRAPH.items()
        if module == layer or module.startswith(layer + ".")
    }
    assert not {m: i for m, i in offences.items() if i}


def test_there_are_no_import_cycles():
    cycles, done = [], set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycles.append(path[path.index(module) :] + [module])
            return
        if module in done:
            return
        for imported in sorted(_ours(GRAPH[module])):
            visit(imported, [*path, module])
        done.add(module)

    for module in sorted(MODULES):
        visit(module, [])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_rules_see_imports_inside_functions():
    """The checker itself: a lazy import inside a function counts (the commands load the LLM module lazily)."""
    assert "iamflow_core.story.llm" in GRAPH["iamflow_core.runs"]
    assert "iamflow_core.memory.identity" in GRAPH["iamflow_core.memory"]
