"""The layers of STYLE.md: the library never imports the app, inference never imports training, training logs
instead of printing."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import echolvfm_core

LIBRARY = Path(echolvfm_core.__file__).resolve().parent
REPO_ROOT = LIBRARY.parent


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, at any depth (imports inside functions too)."""
    package = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def _offending_imports(folder: Path, forbidden: str) -> list[str]:
    return [f"{path.relative_to(REPO_ROOT)}:{line}: {module}"
            for path in sorted(folder.rglob("*.py"))
            for line, module in _imported_modules(path)
            if module == forbidden or module.startswith(forbidden + ".")]


def test_importing_every_library_module_loads_no_app_module():
    code = (
        "import json, pkgutil, importlib, sys\n"
        "import echolvfm_core\n"
        "for m in pkgutil.walk_packages(echolvfm_core.__path__, 'echolvfm_core.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(json.dumps(sorted(n for n in sys.modules if n == 'app' or n.startswith('app.'))))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env,
                          cwd=REPO_ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_no_library_module_imports_the_app_even_inside_a_function():
    assert _offending_imports(LIBRARY, "app") == []


def test_estimators_and_pipelines_never_import_training():
    for layer in ("estimators", "pipelines"):
        assert _offending_imports(LIBRARY / layer, "echolvfm_core.training") == [], layer


def test_training_code_prints_nothing():
    offenders = [f"{path.relative_to(REPO_ROOT)}:{node.lineno}"
                 for path in sorted((LIBRARY / "training").rglob("*.py"))
                 for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"]
    assert offenders == []
