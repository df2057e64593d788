"""The repository's structure: the router contract is written down (no optional hook is probed
with getattr), and the recipes form a tree (support modules never import a recipe script; no cycle)."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest
import torch

import lomix
from lomix.routers import Router, RouterConfig

ROOT = Path(__file__).resolve().parents[1]
CODE_FOLDERS = ("lomix", "recipes", "cli", "adapters_hub")


def _python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def test_no_router_hook_is_probed_with_getattr():
    probe = re.compile(r"getattr\(.*router")
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in _python_files(*CODE_FOLDERS)
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if probe.search(line)
    ]
    assert found == []


def test_the_contract_hooks_have_no_op_defaults():
    """A router that overrides nothing but forward builds in a layer and changes nothing else."""

    class Plain(Router):
        def forward(self, x, context):  # pragma: no cover - never called here
            raise AssertionError

    config = RouterConfig()
    assert config.estimator is None and config.needs_whole_sequences is False
    assert config.mixture_defaults() == {}
    mixture = lomix.MixtureConfig(num_experts=2)
    assert config.validate_mixture(mixture) is None
    router = Plain(config, d_in=4, num_experts=2)
    assert router.default_lr is None
    bank = lomix.ExpertBank(2, 2, 4, 3)
    before = bank.A.detach().clone()
    router.check_layer("layer", 4, 3)
    router.init_experts(bank)
    router.bind_experts(bank)
    router.bind_mixture(mixture)
    assert router.after_optimizer_step() is None
    assert torch.equal(bank.A, before)
    assert router.route_logits(torch.zeros(3, 2), torch.zeros(3, 4), lomix.RoutingContext()) is None


# ----------------------------------------------------------------------------------------------
# recipes/ as a tree

SUPPORT = {
    "assets",
    "bigbench",
    "config",
    "data",
    "evaluation",
    "examples",
    "formats",
    "hooks",
    "losses",
    "portable",
    "quantization",
    "runs",
}


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _recipe_imports(tree: ast.AST) -> set[str]:
    """Names of lomix.recipes modules imported anywhere in ``tree`` (in functions too), except
    under ``if TYPE_CHECKING:``."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_only(node):
            return
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[2] for a in node.names if a.name.startswith("lomix.recipes."))
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "lomix.recipes":
                found.update(a.name for a in node.names)
            elif node.module.startswith("lomix.recipes."):
                found.add(node.module.split(".")[2])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def recipes_import_graph() -> dict[str, set[str]]:
    """module -> the recipes modules it imports (every .py directly under recipes/)."""
    modules = {p.stem: p for p in (ROOT / "recipes").glob("*.py") if p.stem != "__init__"}
    return {name: _recipe_imports(ast.parse(path.read_text())) - {name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_recipes_import_graph_has_no_cycle():
    graph = recipes_import_graph()
    assert {"config", "finetune", "evaluation"} <= set(graph)
    assert _cycle(graph) is None


def test_support_modules_never_import_a_recipe_script():
    graph = recipes_import_graph()
    assert SUPPORT <= set(graph)
    wrong = {module: sorted(imports - SUPPORT) for module, imports in graph.items() if module in SUPPORT}
    assert {m: i for m, i in wrong.items() if i} == {}


# ----------------------------------------------------------------------------------------------
# `lomix --help` imports neither torch nor the recipes


def test_the_cli_and_the_package_import_without_torch():
    import subprocess
    import sys

    probe = (
        "import sys, lomix.cli; from lomix.cli.app import app; import typer.main; typer.main.get_command(app); "
        "print(sorted(m for m in ('torch', 'transformers', 'lomix.recipes.config') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    # ... and the names of the package still resolve, to what they always were
    assert lomix.inject is lomix.inject_frozen_experts.__globals__["inject"]
    assert lomix.MixtureConfig.__module__ == "lomix.config" and callable(lomix.disabled)
    assert set(lomix.__all__) <= set(dir(lomix))
    probe = "import lomix; print(lomix.mhr.__name__, lomix.checkpoint.read_config.__module__, hasattr(lomix, 'nope'))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.split() == [
        "lomix.methods.poly.mhr",
        "lomix.checkpoint",
        "False",
    ]  # (lomix.mhr: an alias) submodules resolve


# ----------------------------------------------------------------------------------------------
# Generic code names no method: the methods reach it through the router contract and registries

GENERIC_FILES = (
    "lomix/layer.py",
    "lomix/inject.py",
    "lomix/params.py",
    "lomix/config.py",
    "recipes/finetune.py",
    "recipes/evaluation.py",
    "recipes/config.py",
    *(str(p.relative_to(ROOT)) for p in sorted((ROOT / "cli").glob("*.py"))),
)
# ".arrow" is Apache Arrow's file suffix (a data format), not the Arrow router.
METHOD_NAME = re.compile(r"\b(remix|rloo|loramixer|glider|phatgoose|mhr|poly|(?<!\.)arrow)\b", re.IGNORECASE)


def method_names(path: Path) -> list[str]:
    """Lines of ``path`` (comment lines aside) that name a routing method."""
    return [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if not line.lstrip().startswith("#") and METHOD_NAME.search(line)
    ]


def test_the_method_name_probe_sees_a_method_name():
    probe = ROOT / "tests" / "test_structure.py"
    assert any("remix|rloo" in line for line in method_names(probe))
    assert METHOD_NAME.search('router="arrow"') and not METHOD_NAME.search("a .parquet or .arrow file")


def test_generic_files_name_no_method():
    assert [hit for name in GENERIC_FILES for hit in method_names(ROOT / name)] == []


# ----------------------------------------------------------------------------------------------
# A method is one package: lomix.methods.<method> (methods/<method>/) holds its pieces

METHODS_ROOT = ROOT / "methods"
LIBRARY_LEVEL_FORBIDDEN = ("lomix.recipes", "lomix.cli", "lomix.hub")


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports anywhere (functions too), relative imports resolved;
    ``from a import b`` gives a and a.b."""
    name = _module_name(path)
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module) if p)
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
    return found


def _method_piece(module: str) -> tuple[str, str] | None:
    """(method, piece) of a ``lomix.methods.<method>.<piece>`` module name, else None."""
    parts = module.split(".")
    if len(parts) >= 4 and parts[:2] == ["lomix", "methods"]:
        return parts[2], parts[3]
    return None


def _library_level(path: Path) -> bool:
    return path.stem not in ("hooks", "recipe", "cli")


def test_every_method_package_holds_its_pieces():
    from lomix import methods
    from lomix.cli import catalog
    from lomix.recipes import hooks
    from lomix.recipes.config import method_sections
    from lomix.recipes.hooks import TrainingHooks
    from lomix.routers import available_routers, router_class

    assert methods.names() == sorted(p.name for p in METHODS_ROOT.iterdir() if (p / "__init__.py").is_file())
    assert methods.names()  # the probe below sees packages
    for name in methods.names():
        package = f"lomix.methods.{name}"
        routers = [r for r in available_routers() if router_class(r).__module__.startswith(package + ".")]
        assert routers and {router_class(r).__module__ for r in routers} == {f"{package}.router"}, name
        for section in method_sections():
            owner = _method_piece(section.config.__module__)
            assert owner is None or owner == (owner[0], "config")
        if (METHODS_ROOT / name / "cli.py").is_file():
            for recipe in importlib.import_module(f"{package}.cli").RECIPES:  # its script: its package's recipe.py
                assert catalog.recipe_path(recipe) == METHODS_ROOT / name / "recipe.py"
        if (METHODS_ROOT / name / "hooks.py").is_file():
            assert isinstance(importlib.import_module(f"{package}.hooks").HOOKS, TrainingHooks), name
    assert hooks.every() and all(isinstance(h, TrainingHooks) for h in hooks.every())


def _module_name(path: Path) -> str:
    """The import name of a file of the five folders (setup.cfg's package_dir)."""
    folder, *rest = path.relative_to(ROOT).with_suffix("").parts
    prefix = {"lomix": [], "recipes": ["recipes"], "cli": ["cli"], "adapters_hub": ["hub"], "methods": ["methods"]}
    prefix = prefix[folder]
    return ".".join(["lomix", *prefix, *[p for p in rest if p != "__init__"]])


def _method_users(path: Path) -> set[tuple[str, str]]:
    return {p for m in _imports(path) if (p := _method_piece(m))}


def test_a_method_lives_only_in_its_package():
    """Outside methods/, a file imports a method's modules only to keep an old import path alive (an
    alias: importing it gives the package's module itself) or to name the shipped routers in lomix.routers.
    (The hub, a layer beside the recipes, may use a method's library-level modules: it pulls GLIDER's
    expert libraries.)"""
    aliases = [
        path
        for path in _python_files("lomix", "recipes", "cli")
        if path != ROOT / "lomix" / "routers" / "__init__.py" and _method_users(path)
    ]
    assert aliases  # the probe sees the aliases that keep the old paths
    for path in aliases:
        module = importlib.import_module(_module_name(path))
        assert _method_piece(module.__name__), f"{path.relative_to(ROOT)} uses a method's code without being an alias"


def test_method_library_modules_import_no_recipe_or_cli_code():
    checked = 0
    for path in sorted(METHODS_ROOT.rglob("*.py")):
        if _library_level(path):
            imports = _imports(path)
            checked += 1
            assert not [m for m in imports if m.startswith(LIBRARY_LEVEL_FORBIDDEN)], path
            assert all(piece not in ("hooks", "recipe", "cli") for _, piece in _method_users(path)), path
    assert checked >= 3
    # below the methods, the library and the recipes reach a method's library-level pieces only (aliases aside)
    for path in _python_files("lomix", "recipes"):
        if not _method_piece(importlib.import_module(_module_name(path)).__name__):
            assert all(piece not in ("hooks", "recipe", "cli") for _, piece in _method_users(path)), path


def test_the_router_registry_finds_method_routers_without_recipe_code():
    import subprocess
    import sys

    probe = (
        "import sys, lomix.routers as r; from lomix import methods; "
        "print(all(m in r.available_routers() for m in methods.names()), "
        "sorted(m for m in sys.modules if m.startswith(('lomix.recipes', 'lomix.cli', 'lomix.hub')) "
        "or m.startswith('lomix.') and m.endswith(('.hooks', '.recipe', '.cli'))))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "True []"


def test_a_router_estimator_comes_from_the_method_that_defines_it():
    from types import SimpleNamespace

    from lomix.errors import ConfigError
    from lomix.methods.remix import hooks as remix_hooks
    from lomix.recipes import hooks, losses

    cfg = SimpleNamespace(mixture=lomix.MixtureConfig(num_experts=4, router=lomix.router_config("topk", k=2)))
    assert hooks.batch_loss_for(cfg) is losses.plain_loss
    assert hooks.estimator("rloo") is remix_hooks.HOOKS.estimators["rloo"]
    with pytest.raises(ConfigError, match=r"router\.estimator: no method defines the estimator 'nope'"):
        hooks.estimator("nope")
