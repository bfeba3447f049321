"""The agent bundle the portal serves: `agent/` with its Python dependencies, ready to unpack.

Built from the source by `manage.py build_agent` (which `make run` and the
deploy run after collectstatic), into settings.RECLO_AGENT_BUNDLE_DIR, never
checked in. `reclo-agent-<version>.tar.gz` holds one folder:

    reclo-agent-<version>/VERSION       the version and the source's digest
    reclo-agent-<version>/lib/          reclo_agent and every dependency, importable as is
    reclo-agent-<version>/wheels/       the compiled dependency (backports.zstd) for other Pythons

The installer unpacks it and runs `python3 -m reclo_agent` with lib/ on the
path: no pip, no virtual environment, no compiler and no package index on
the customer's server. All dependencies are pure Python except
backports.zstd (zstd for Python < 3.14); lib/ holds the build machine's
copy, wheels/ the others that could be fetched at build time, and Python
3.14's own compression.zstd needs neither.

pip does the dependency resolution (`pip install --target`); only the
packing is written here, because no tool packs "a folder of importable
packages plus a few platform wheels" for an installer written in sh.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from pathlib import Path

from django.conf import settings

log = logging.getLogger(__name__)

AGENT_DIR = Path(__file__).resolve().parent.parent / "agent"
# The compiled dependency, and the Pythons whose wheels of it are fetched too.
NATIVE = "backports.zstd"
NATIVE_PYTHONS = ("3.11", "3.12", "3.13")
NATIVE_PLATFORMS = ("manylinux2014_x86_64", "manylinux2014_aarch64")
_SKIP = {"__pycache__", "bin"}


def agent_version() -> str:
    return tomllib.loads((AGENT_DIR / "pyproject.toml").read_text())["project"]["version"]


def _dependencies() -> list[str]:
    return tomllib.loads((AGENT_DIR / "pyproject.toml").read_text())["project"]["dependencies"]


def source_digest() -> str:
    """SHA-256 of the agent's source and pins: a changed agent makes a new bundle."""
    digest = hashlib.sha256()
    files = [AGENT_DIR / "pyproject.toml", *sorted((AGENT_DIR / "reclo_agent").rglob("*.py"))]
    for path in files:
        digest.update(str(path.relative_to(AGENT_DIR)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def bundle_path(version: str | None = None) -> Path:
    return Path(settings.RECLO_AGENT_BUNDLE_DIR) / f"reclo-agent-{version or agent_version()}.tar.gz"


def built_digest(path: Path) -> str | None:
    try:
        return path.with_suffix(".digest").read_text().strip()
    except OSError:
        return None


def _pip(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet", *args],
        check=True,
        timeout=1800,
    )


def build(*, force: bool = False, native_wheels: bool = True) -> tuple[Path, bool]:
    """(bundle path, whether it was built now): rebuilt only when the agent's source changed."""
    version, digest = agent_version(), source_digest()
    target = bundle_path(version)
    if not force and target.exists() and built_digest(target) == digest:
        return target, False
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="reclo-agent-bundle-") as tmp:
        top = Path(tmp) / f"reclo-agent-{version}"
        lib = top / "lib"
        _pip("install", "--no-compile", "--target", str(lib), *_dependencies())
        shutil.copytree(AGENT_DIR / "reclo_agent", lib / "reclo_agent", ignore=shutil.ignore_patterns("__pycache__"))
        for name in _SKIP:
            shutil.rmtree(lib / name, ignore_errors=True)
        native_version = _installed_version(lib, NATIVE)
        wheels = top / "wheels"
        wheels.mkdir()
        if native_wheels and native_version:
            _fetch_native_wheels(wheels, native_version)
        (top / "VERSION").write_text(f"{version}\n{digest}\n")
        partial = target.with_name(f".{target.name}.{os.getpid()}")
        with tarfile.open(partial, "w:gz") as archive:
            archive.add(top, arcname=top.name, filter=_normalise)
        os.replace(partial, target)
    target.with_suffix(".digest").write_text(digest + "\n")
    return target, True


def _installed_version(lib: Path, name: str) -> str | None:
    prefix = name.replace(".", "_").replace("-", "_") + "-"
    for info in lib.glob("*.dist-info"):
        if info.name.startswith(prefix):
            return info.name[len(prefix) : -len(".dist-info")]
    return None


def _fetch_native_wheels(wheels: Path, version: str) -> None:
    """The compiled dependency for other Pythons and machines; best effort (the build machine's is in lib/)."""
    for python in NATIVE_PYTHONS:
        for platform in NATIVE_PLATFORMS:
            try:
                _pip("download", "--no-deps", "--only-binary=:all:", "--python-version", python,
                     "--platform", platform, "--dest", str(wheels), f"{NATIVE}=={version}")  # fmt: skip
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
                log.warning("no %s %s wheel for Python %s on %s; such servers need pip", NATIVE, version, python,
                            platform)  # fmt: skip


def _normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info
