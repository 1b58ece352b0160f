"""The layout shows the architecture, and stays that way: imports between the packages of draggan_core
and the layers of webui only go downward, no module is longer than MAX_LINES, no folder holds more
than MAX_MODULES modules. Imports are read from the source (ast), lazy ones inside functions included;
nothing is imported."""
from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 600
MAX_MODULES = 10  # per folder, __init__.py not counted

# draggan_core: a package may import only packages of a lower rank (and itself). The top-level
# modules (the public API, __main__, the old-path shims) stand above every package.
CORE_RANKS = {"model": 0, "edit": 1, "evaluation": 2, "serving": 2, "cli": 3}
SHIMS = {"drag", "models", "latents"}
# webui: services < the per-user editor < the page (gradio) < start-up < the package's __init__
WEBUI_LAYERS = {"services": ("services", 0), "editor": ("editor", 1), "app": ("page", 2), "handlers": ("page", 2),
                "launcher": ("launcher", 3)}
TOP = 10


def modules(package: str) -> list[Path]:
    return sorted(p for p in (REPO / package).rglob("*.py") if "__pycache__" not in p.parts)


def dotted(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, relative ones resolved."""
    name = dotted(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            # `from pkg import sub`: the edge goes to pkg.sub when that is a module
            for a in node.names:
                sub = f"{module}.{a.name}"
                out.append((node.lineno, sub if _is_module(sub) else module))
    return out


def _is_module(name: str) -> bool:
    p = REPO.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def core_layer(module: str) -> tuple[str, int]:
    """(layer, rank) of a draggan_core module: its subpackage, or the top for the modules beside them."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] not in CORE_RANKS:  # draggan_core itself, __main__, the shims
        return module, TOP
    return parts[1], CORE_RANKS[parts[1]]


def webui_layer(module: str) -> tuple[str, int]:
    parts = module.split(".")
    return ("webui", TOP) if len(parts) == 1 else WEBUI_LAYERS.get(parts[1], (parts[1], TOP))


def upward_edges(package: str, layer) -> list[str]:
    """Imports from one layer to another of the same or a higher rank."""
    bad = []
    for path in modules(package):
        src = layer(dotted(path))
        for line, target in imported(path):
            if target.split(".")[0] != package:
                continue
            dst = layer(target)
            if dst[0] != src[0] and dst[1] >= src[1]:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    return bad


def test_every_module_is_known_to_the_layer_maps():
    for path in modules("draggan_core"):
        parts = dotted(path).split(".")
        assert len(parts) <= 3, f"{path}: one level of subpackages only"
        if len(parts) == 2:
            assert parts[1] in CORE_RANKS or parts[1] in SHIMS or parts[1] == "__main__", \
                f"{path}: a new top-level module of draggan_core; put it in a subpackage (CORE_RANKS)"
    for path in modules("webui"):
        parts = dotted(path).split(".")
        assert len(parts) == 1 or parts[1] in WEBUI_LAYERS, f"{path}: not in WEBUI_LAYERS"


def test_draggan_core_imports_only_downward():
    assert upward_edges("draggan_core", core_layer) == []


def test_webui_imports_only_downward():
    assert upward_edges("webui", webui_layer) == []


@pytest.mark.parametrize("package", ["draggan_core", "webui"])
def test_the_engine_never_imports_the_ui_nor_training(package):
    forbidden = {"draggan_core": ("webui", "training", "gradio", "app"), "webui": ("training",)}[package]
    bad = [f"{p.relative_to(REPO)}:{line} imports {m}" for p in modules(package)
           for line, m in imported(p) if m.split(".")[0] in forbidden]
    assert bad == []


def test_ray_only_in_serving():
    bad = [f"{p.relative_to(REPO)}:{line}" for p in modules("draggan_core") for line, m in imported(p)
           if m.split(".")[0] == "ray" and dotted(p).split(".")[1:2] != ["serving"]]
    assert bad == []


def test_the_shims_only_re_export():
    for name in sorted(SHIMS):
        tree = ast.parse((REPO / "draggan_core" / f"{name}.py").read_text())
        body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
        assert ast.get_docstring(tree) and all(isinstance(n, ast.ImportFrom) and n.level == 1 for n in body), name


def test_no_module_is_too_long():
    paths = modules("draggan_core") + modules("webui") + [REPO / "app.py"]
    long = {str(p.relative_to(REPO)): n for p in paths if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_no_folder_has_too_many_modules():
    for package in ("draggan_core", "webui"):
        folders = {p.parent for p in modules(package)}
        for folder in folders:
            count = sum(1 for p in folder.glob("*.py") if p.name != "__init__.py")
            assert count <= MAX_MODULES, f"{folder.relative_to(REPO)}: {count} modules"


def test_every_package_says_what_it_holds_and_may_import():
    for init in sorted((REPO / "draggan_core").glob("*/__init__.py")) + sorted((REPO / "webui").glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "May import" in doc, init
        for module in init.parent.glob("*.py"):  # every module of the package is named in it
            if module.name != "__init__.py":
                assert module.name in doc, f"{init.relative_to(REPO)} does not mention {module.name}"


def test_the_wheel_lists_every_package():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {dotted(p) for p in modules("draggan_core") if p.name == "__init__.py"}
    assert found <= listed, found - listed


def test_the_public_api():
    import draggan_core
    from draggan_core import DragConfig, DragSession, ModelStore, default_model_path, seed_to_w
    from draggan_core.drag import DragConfig as OldConfig
    from draggan_core.drag import DragSession as OldSession
    from draggan_core.latents import seed_to_w as old_seed_to_w
    from draggan_core.models import ModelStore as OldStore
    from draggan_core.models import default_model_path as old_default
    assert (OldConfig, OldSession, old_seed_to_w, OldStore, old_default) == \
        (DragConfig, DragSession, seed_to_w, ModelStore, default_model_path)
    for name in draggan_core.__all__:
        assert getattr(draggan_core, name) is not None
    with pytest.raises(AttributeError):
        draggan_core.no_such_name  # noqa: B018
