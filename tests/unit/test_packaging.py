"""Packaging: one import name, ``stanchion``; the repository's top-level packages never load under their own names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OWN = ("contracts", "middleware", "handlers")

IMPORT_ALL = """
import importlib, json, pkgutil, sys
import stanchion
names = [m.name for m in pkgutil.walk_packages(stanchion.__path__, "stanchion.")]
for name in names:
    importlib.import_module(name)
print(json.dumps({"modules": names, "loaded": sorted(sys.modules)}))
"""


def test_every_module_loads_under_the_stanchion_name_only() -> None:
    """Importing every module of the distribution loads none of them as top-level contracts/middleware/handlers."""
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL], cwd="/", capture_output=True, text=True, timeout=120, check=True
    )
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert "stanchion.handlers.api" in data["modules"] and "stanchion.middleware.stack" in data["modules"]
    assert [m for m in data["loaded"] if m.split(".")[0] in OWN] == []


@pytest.mark.parametrize("editable", [False, True], ids=["wheel", "editable"])
def test_a_user_with_own_handlers_and_middleware_packages_imports_both(editable: bool, tmp_path: Path) -> None:
    """``pip install`` (and ``pip install -e``) of the repository beside a user's own ``handlers`` and ``middleware``
    packages: the user's import as theirs, stanchion's as ``stanchion.*``."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    target = sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)})
    # The dependencies (and hatchling, to build) come from this test's environment; stanchion itself only from the
    # install under test: the dev install's path entry (a .pth file) is not read from PYTHONPATH.
    deps = sysconfig.get_path("purelib")
    env = {**os.environ, "PYTHONPATH": deps, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    install = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target"]
    if editable:
        # --target does not take editable installs: install into the venv with its own interpreter and our pip.
        install = [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "-e"]
        subprocess.run([*install, str(ROOT)], check=True, env=env, timeout=300, capture_output=True)
    else:
        subprocess.run([*install, target, str(ROOT)], check=True, env=env, timeout=300, capture_output=True)
    user = tmp_path / "user"
    for package in ("handlers", "middleware"):
        (user / package).mkdir(parents=True)
        (user / package / "__init__.py").write_text(f"OWNER = 'user {package}'\n")
    check = (
        "import handlers, middleware, stanchion, sys\n"
        "from stanchion import Stanchion\n"
        "from stanchion.middleware import Stack\n"
        "print(handlers.OWNER, middleware.OWNER, stanchion.__file__, sep='|')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'contracts'))\n"
    )
    result = subprocess.run(
        [str(python), "-c", check], cwd=user, env=env, capture_output=True, text=True, timeout=120, check=True
    )
    first, second = result.stdout.strip().splitlines()
    owner_handlers, owner_middleware, location = first.split("|")
    assert (owner_handlers, owner_middleware) == ("user handlers", "user middleware")
    assert location.startswith(str(ROOT / "src") if editable else target), location
    assert second == "[]"
