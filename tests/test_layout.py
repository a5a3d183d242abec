"""The package's layout is its architecture: no import circles, and the runtime and the
shared client layer import no protocol."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "calloutkit"
PROTOCOLS = ("extproc", "network", "authz", "tyk", "proxy")
# Each folder and what it may import from calloutkit besides itself (the generated code and
# the public top-level modules are leaves).
MAY_IMPORT = {
    "runtime": set(),
    "client": {"runtime"},
    "extproc": {"runtime", "client"},
    "network": {"runtime", "client"},
    "authz": {"runtime", "client"},
    "tyk": {"runtime", "_generated"},
    "proxy": {"runtime"},
    "testing": {"runtime", "client", "extproc", "network", "authz"},
    "cli": {"runtime", "client", *PROTOCOLS, "testing"},
}


def _module(path: Path) -> str:
    parts = ["calloutkit", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every calloutkit module ``path`` imports, anywhere in it (lazy and type-only too)."""
    here = _module(path).split(".")
    if path.name != "__init__.py":
        here = here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("calloutkit")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = here[:len(here) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            if not base.startswith("calloutkit"):
                continue
            for alias in node.names:  # `from . import x` may name a module
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in MODULES else base)
    return found


FILES = {_module(p): p for p in PACKAGE.rglob("*.py")}
MODULES = set(FILES)
GRAPH = {name: {m for m in _imports(path) if m in MODULES and m != name}
         for name, path in FILES.items()}


def _folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or module in {f"calloutkit.{d}" for d in MAY_IMPORT} \
        else "<top>"


def test_no_import_circles() -> None:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for name in sorted(GRAPH):
        if name not in index:
            visit(name)
    assert circles == []


def test_every_folder_imports_only_what_sits_below_it() -> None:
    wrong = []
    for name, imported in sorted(GRAPH.items()):
        folder = _folder(name)
        if folder == "<top>" or folder == "_generated":
            continue
        for other in sorted(imported):
            target = _folder(other)
            if target not in (folder, "<top>") and target not in MAY_IMPORT[folder]:
                wrong.append(f"{name} imports {other}")
            if target == "<top>" and other != "calloutkit":
                wrong.append(f"{name} imports the public module {other}")
    assert wrong == []


def test_the_runtime_imports_no_protocol() -> None:
    runtime = [name for name in GRAPH if _folder(name) == "runtime"]
    assert runtime, "no runtime modules found"
    above = {*PROTOCOLS, "client", "cli", "testing"}
    for name in runtime:
        assert not {_folder(m) for m in GRAPH[name]} & above, name


def test_the_tree_names_each_part() -> None:
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == {*MAY_IMPORT, "_generated"}
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert loose == ["__init__.py", "__main__.py", "tools.py"]


def test_the_native_module_is_the_runtime_s_alone() -> None:
    """calloutkit_native (the calloutkit-native distribution) may be missing: one module
    imports it, after the transport was chosen; everything else asks `_config`."""
    users = sorted(name for name, path in FILES.items()
                   if any(m.split(".")[0] == "calloutkit_native" for m in _imports(path)))
    assert users == ["calloutkit.runtime._server"]
    assert not (PACKAGE / "_native.pyi").exists()  # the stub ships with calloutkit-native
