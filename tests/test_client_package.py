"""The client is a package of its own: ``client/`` builds a wheel, which installs into a fresh virtualenv that has
nothing but httpx and websockets (and what they need), where ``conveyor`` and ``conveyor.aio`` import and work,
typed (``py.typed``), with the ``conveyor`` console script.

Offline: the wheel is built without build isolation when this environment can (the ``wheel`` package, or a
setuptools that has bdist_wheel), else with pip's isolated build from the configured index; the fresh
virtualenv gets no pip and no index at all: the wheel is installed into it by this environment's pip, and
httpx, websockets and their dependencies are linked in from this environment.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.requirements import Requirement

CLIENT = Path(__file__).resolve().parent.parent / "client"


def requirement_closure(roots: list[str]) -> set[str]:
    """The distributions ``roots`` need to run here, themselves included (extras and other platforms' left out)."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for text in md.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


def link_distribution(name: str, into: Path) -> None:
    """Make distribution ``name`` (as installed here) importable from ``into``, by symlinks."""
    dist = md.distribution(name)
    tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
    base = Path(str(dist.locate_file("")))
    for top in tops:
        source = base / top
        if source.exists() and not (into / top).exists() and not top.endswith(".pth"):
            (into / top).symlink_to(source)


def can_build_without_isolation() -> bool:
    if importlib.util.find_spec("wheel") is not None:
        return True
    import setuptools

    major, minor = (int(part) for part in setuptools.__version__.split(".")[:2])
    return (major, minor) >= (70, 1)  # bdist_wheel moved into setuptools


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    source = out / "client"  # a copy: a build writes build/ and *.egg-info beside the sources
    shutil.copytree(CLIENT, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    isolation = [] if not can_build_without_isolation() else ["--no-build-isolation"]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", *isolation, str(source), "-w", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("conveyor_client-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", "--no-index", wheel],
        check=True,
        capture_output=True,
        timeout=300,
    )
    site = Path(
        subprocess.run(
            [str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    deps = root / "deps"
    deps.mkdir()
    for name in requirement_closure(["httpx", "websockets"]):
        link_distribution(name, deps)
    (site / "deps.pth").write_text(f"{deps}\n")
    return root


CHECK = """
import asyncio, importlib.resources, pathlib, sys
import conveyor, conveyor.aio
import conveyor.registration, conveyor.watch, conveyor.balancer
import conveyor.aio.registration, conveyor.aio.watch, conveyor.aio.balancer
from conveyor import Registry, Unavailable
assert pathlib.Path(conveyor.__file__).is_relative_to(sys.prefix), conveyor.__file__
assert importlib.resources.files("conveyor").joinpath("py.typed").is_file()
try:
    import django
except ModuleNotFoundError:
    pass
else:
    raise AssertionError("django is importable: not a clean environment")
try:
    Registry("http://127.0.0.1:9", "t", timeout=1).get_service("x")
except Unavailable:
    pass
async def main():
    try:
        await conveyor.aio.Registry("http://127.0.0.1:9", "t", timeout=1).get_service("x")
    except Unavailable:
        return "ok"
print(asyncio.run(main()), sorted(m.split(".")[0] for m in sys.modules if m.split(".")[0] in ("httpx", "websockets")))
"""


def test_the_wheel_installs_alone_and_imports_with_only_httpx_and_websockets(venv):
    python = venv / "bin" / "python"
    result = subprocess.run(
        [str(python), "-I", "-c", textwrap.dedent(CHECK)], capture_output=True, text=True, timeout=120, cwd=venv
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "ok"
    assert "httpx" in result.stdout and "websockets" in result.stdout
    assert (venv / "bin" / "conveyor").is_file()  # the console script


def test_the_wheel_carries_the_package_and_its_type_marker(wheel):
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"conveyor/py.typed", "conveyor/aio/__init__.py", "conveyor/strategies.py"} <= names
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = [
        line.split(":", 1)[1].strip()
        for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
        if line.startswith("Requires-Dist:")
    ]
    assert sorted(re.split(r"[<>=! ]", r, maxsplit=1)[0] for r in requires) == ["httpx", "websockets"]
