"""dvc.yaml's deps follow the code: every module of this repository that a stage's script loads is a
dep of that stage (itself or a folder above it), so that an edit there re-runs the stage instead of
`dvc repro` reporting a stale result as current.

What a stage loads is the union of two views: the modules in `sys.modules` after its script is
imported in a fresh interpreter, with every model family loaded as `pipeline.model.family.get` loads
the one params.yaml names (by name, through importlib), and the static closure of every `import`
statement reachable from the script, including those inside functions (imported only when the
stage runs).
What it catches: a stage whose code path gains a module (a new helper, a lazy import in a function)
without the dep, or a dep list that names a file the code no longer has under that name."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, tool_env

PACKAGES = ("pipeline", "stages")  # the repository's own code that stages load
DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())
STAGE_MODULE = re.compile(r"python -m (stages\.\w+)")


def module_file(name: str) -> Path | None:
    path = REPO.joinpath(*name.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def imported_names(path: Path, module: str) -> set[str]:
    """The modules (and `from m import x` as `m.x`, which may be a module) that `path` imports
    anywhere in its code."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return {n for n in names if n.split(".")[0] in PACKAGES}


def static_closure(start: str) -> set[Path]:
    seen: dict[str, Path] = {}
    todo = [start]
    while todo:
        parts = todo.pop().split(".")
        for i in range(1, len(parts) + 1):  # a module loads the packages above it
            name = ".".join(parts[:i])
            path = module_file(name)
            if path is not None and name not in seen:
                seen[name] = path
                todo.extend(imported_names(path, name))
    return set(seen.values())


def loaded_at_import(module: str) -> set[Path]:
    code = (f"import importlib, json, sys; importlib.import_module({module!r})\n"
            "if 'pipeline.model.family' in sys.modules:\n"
            "    f = sys.modules['pipeline.model.family']; [f.get(name) for name in f.FAMILIES]\n"
            "print(json.dumps([getattr(m, '__file__', None) for m in list(sys.modules.values())]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=tool_env(), capture_output=True, text=True,
                          timeout=300, check=True)
    files = {Path(f).resolve() for f in json.loads(proc.stdout.splitlines()[-1]) if f}
    return {f for f in files if f.is_relative_to(REPO) and f.relative_to(REPO).parts[0] in PACKAGES}


def stage_scripts() -> dict[str, str]:
    out = {}
    for stage, spec in DVC_YAML["stages"].items():
        m = STAGE_MODULE.search(spec["cmd"])
        assert m, f"stage {stage}: its cmd runs no `python -m stages.<name>`"
        out[stage] = m.group(1)
    return out


def uncovered(files: set[Path], deps: list[str]) -> list[str]:
    def covered(rel: str) -> bool:
        return any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps)
    return sorted(rel for rel in (f.relative_to(REPO).as_posix() for f in files) if not covered(rel))


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(stage_scripts()))
def test_every_module_a_stage_loads_is_one_of_its_deps(stage):
    module = stage_scripts()[stage]
    loaded = static_closure(module) | loaded_at_import(module)
    missing = uncovered(loaded, DVC_YAML["stages"][stage].get("deps", []))
    assert not missing, f"stage {stage}: dvc.yaml deps miss {', '.join(missing)} (loaded by {module})"


def test_every_code_dep_exists():
    """A dep that names code the repository no longer has (moved or renamed) covers nothing."""
    gone = [f"{stage}: {d}" for stage, spec in DVC_YAML["stages"].items() for d in spec.get("deps", [])
            if d.split("/")[0] in PACKAGES and not (REPO / d).exists()]
    assert not gone, f"dvc.yaml deps that do not exist: {', '.join(gone)}"


@pytest.mark.slow
def test_the_check_sees_a_lazy_import_and_the_family_modules():
    """The static view follows an import inside a function (feasibility's); the runtime view loads
    the family modules that importlib finds by name."""
    assert "pipeline/cache.py" in {f.relative_to(REPO).as_posix() for f in static_closure("stages.train")}
    loaded = {f.relative_to(REPO).as_posix() for f in loaded_at_import("stages.evaluate")}
    assert {"pipeline/model/rlan/family.py", "pipeline/model/trm/family.py"} <= loaded
    assert uncovered({REPO / "pipeline" / "cache.py"}, ["pipeline/arc.py"]) == ["pipeline/cache.py"]
    assert uncovered({REPO / "pipeline" / "model" / "rlan" / "model.py"}, ["pipeline/model"]) == []
