"""The installed distribution exposes one import namespace, lomix, and the `lomix` command."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True)


def test_namespace_resolves_to_the_five_folders_outside_the_repository(tmp_path):
    # From another directory the repository root is not on sys.path: only what is installed imports.
    result = run_python(
        "import lomix, lomix.hub, lomix.recipes, lomix.cli, lomix.methods; print(lomix.__file__, lomix.hub.__file__, "
        "lomix.recipes.__file__, lomix.cli.__file__, lomix.methods.__file__, sep='\\n')",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    files = [Path(line) for line in result.stdout.split()]
    assert [f.parent.name for f in files] == ["lomix", "adapters_hub", "recipes", "cli", "methods"]


def test_setup_cfg_lists_every_method_package():
    """setup.cfg names packages one by one: a method package missing there would not be installed."""
    import configparser

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    packages = set(config["options"]["packages"].split())
    methods = {f"lomix.methods.{p.parent.name}" for p in (ROOT / "methods").glob("*/__init__.py")}
    assert methods and methods | {"lomix.methods"} <= packages


@pytest.mark.parametrize("generic", ["cli", "recipes", "adapters_hub", "methods"])
def test_generic_top_level_names_are_not_installed(tmp_path, generic):
    result = run_python(f"import {generic}", tmp_path)
    assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr


def test_distribution_declares_the_console_script():
    dist = importlib.metadata.distribution("lomix")
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert scripts == {"lomix": "lomix.cli:main"}
    command = Path(sys.executable).parent / "lomix"
    result = subprocess.run([str(command), "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == f"lomix {dist.version}"


@pytest.mark.slow
def test_built_wheel_holds_only_the_lomix_package(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("lomix-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert {t for t in top_level if not t.endswith(".dist-info")} == {"lomix"}
    for required in (
        "lomix/hub/__init__.py",
        "lomix/cli/app.py",
        "lomix/recipes/__init__.py",
        "lomix/kernels/__init__.py",
        "lomix/recipes/finetune.py",
        "lomix/methods/__init__.py",
        "lomix/methods/loramixer/router.py",
        "lomix/methods/loramixer/recipe.py",
        "lomix/recipes/configs/quickstart.yaml",
        "lomix/recipes/configs/accelerate/ddp.yaml",
        "lomix/recipes/configs/accelerate/fsdp.yaml",
        "lomix/recipes/configs/accelerate/deepspeed_zero2.yaml",
        "lomix/recipes/metrics/accuracy/accuracy.py",
        "lomix/recipes/metrics/exact_match/exact_match.py",
        "lomix/recipes/BIGBENCH_NOTICE.md",
    ):
        assert required in names
    # BIG-bench examples are built locally, never shipped
    assert not [n for n in names if n.endswith((".jsonl", "task.json"))]
    # the PyPI page: README.md without relative links (PyPI cannot resolve them; see setup.py)
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    page = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "Content-Type: text/markdown" in page and "# lomix" in page
    assert "](docs/" not in page and "](benchmarks/" not in page and "](recipes/" not in page
    assert "(`docs/methods.md` in the lomix repository)" in page
