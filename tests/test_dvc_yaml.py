"""dvc.yaml stays true to the code: each stage's deps list exactly the project
modules it imports, and its params name every section it loads.

The imports are read from the source (every ``import`` statement, including
those inside functions, followed transitively through ``mnist_dvc``), so a
new import without a new dep, or a stale dep, fails here instead of silently
rerunning too little or too much.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from helpers import REPO

PIPELINE = yaml.safe_load((REPO / "dvc.yaml").read_text())
STAGES = PIPELINE["stages"]
PACKAGES = ("mnist_dvc", "stages")


def module_file(name: str) -> Path | None:
    """``mnist_dvc.model`` -> mnist_dvc/model.py (package __init__ files are not deps)."""
    path = REPO / (name.replace(".", "/") + ".py")
    return path if path.exists() else None


def project_imports(path: Path) -> set[str]:
    """Names of the project modules ``path`` imports anywhere in its body."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # from mnist_dvc import model
    return {n for n in names if n.split(".")[0] in PACKAGES and module_file(n)}


def transitive_files(entry: Path) -> set[Path]:
    """``entry`` and every project file it imports, directly or not."""
    seen, todo = set(), [entry]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(module_file(name) for name in project_imports(path))
    return seen


def stage_files(name: str) -> set[str]:
    """The stage's script (the module its cmd runs), the stages package it runs through first
    (which pins the numerics), and everything they import, relative to the repo."""
    cmd = STAGES[name]["cmd"]
    assert f"python -m stages.{name}" in cmd, f"{name}: cmd runs {cmd!r}, not python -m stages.{name}"
    entries = [REPO / "stages" / "__init__.py", REPO / "stages" / f"{name}.py"]
    return {str(p.relative_to(REPO)) for entry in entries for p in transitive_files(entry)}


def sections_loaded(files: set[str]) -> set[str]:
    """The params.yaml sections these files read: the ``load_section("...")`` calls."""
    return {node.args[0].value
            for file in files for node in ast.walk(ast.parse((REPO / file).read_text()))
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "load_section"
            and node.args and isinstance(node.args[0], ast.Constant)}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_list_exactly_the_project_modules_it_imports(name):
    expected = stage_files(name)
    listed = {dep for dep in STAGES[name].get("deps", []) if dep.endswith(".py")}
    assert listed == expected, (
        f"stage {name}: missing from deps {sorted(expected - listed)}, not imported {sorted(listed - expected)}")


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_params_name_every_section_it_loads(name):
    listed = {entry.split(".")[0] for entry in STAGES[name].get("params", [])}
    assert sections_loaded(stage_files(name)) == listed


def test_the_import_reader_sees_imports_inside_functions_and_follows_them(tmp_path):
    # Heavy modules are imported where they are used, inside functions: the
    # reader must still see them, and what they import in turn.
    probe = tmp_path / "probe.py"
    probe.write_text("def main():\n    from mnist_dvc.figures import save_png\n")
    assert {str(p.relative_to(REPO)) for p in transitive_files(probe) - {probe}} == {
        "mnist_dvc/figures.py", "mnist_dvc/stage.py"}
