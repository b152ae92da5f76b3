"""Every module the server's code imports resolves in this interpreter, and every server module imports.

Run with a .venv made from requirements.txt alone (the smoke test does, in its fresh clone): an
import of a dev-only package, even one inside a function that a smoke run never reaches, is
reported here. Prints what is missing and exits 1, or prints nothing and exits 0.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import pkgutil
import sys
from pathlib import Path

BASE = Path(__file__).resolve().parent.parent
SERVER = ["manage.py", "registry_project", "registry", "groups", "balancer", "scripts"]
PACKAGES = ["registry_project", "registry", "groups", "balancer"]


def imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def unresolved_imports() -> list[str]:
    local = {p.name for p in BASE.iterdir() if p.is_dir()} | {p.stem for p in BASE.glob("*.py")}
    problems = []
    for target in SERVER:
        base = BASE / target
        files = [base] if base.is_file() else sorted(base.rglob("*.py"))
        for path in files:
            for name in sorted(imported_names(path)):
                if name in sys.stdlib_module_names or name in local or name == "__future__":
                    continue
                if importlib.util.find_spec(name) is None:
                    problems.append(f"{name} (imported in {path.relative_to(BASE)}) is not installed")
    return problems


def failing_modules() -> list[str]:
    """Import every module of the server packages (after django.setup(), as the server does)."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "registry_project.settings")
    import django

    django.setup()
    problems = []
    for package in PACKAGES:
        for module in pkgutil.walk_packages([str(BASE / package)], prefix=f"{package}."):
            try:
                importlib.import_module(module.name)
            except ImportError as exc:
                problems.append(f"{module.name} does not import: {exc}")
    return problems


def main() -> int:
    sys.path.insert(0, str(BASE))
    problems = unresolved_imports() + failing_modules()
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
