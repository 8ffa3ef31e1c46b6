"""Issue 2: set-up scripts, environment report, import hygiene."""

from __future__ import annotations

import os
import subprocess
import sys
import venv

import pytest
from helpers import REPO

INSTALLER = REPO / "scripts" / "install_detectron2.sh"


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> str:
    """An interpreter of a fresh venv without detectron2 (nor pip: nothing may get installed)."""
    root = tmp_path_factory.mktemp("bare_venv")
    venv.EnvBuilder(with_pip=False).create(root)
    py = root / "bin" / "python"
    probe = subprocess.run([str(py), "-c", "import detectron2"], capture_output=True)
    assert probe.returncode != 0, "the bare venv unexpectedly imports detectron2"
    return str(py)


def _run_installer(python: str, wheel: str | None) -> subprocess.CompletedProcess:
    args = ["bash", str(INSTALLER), python] + ([wheel] if wheel else [])
    env = {k: v for k, v in os.environ.items() if k != "NFDET_DETECTRON2_WHEEL"}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)


def test_corrupted_wheel_is_refused(bare_python, tmp_path):
    fake = tmp_path / "sal_detectron2-0.7.2-cp310-none-any.whl"
    fake.write_bytes(b"not the pinned wheel")
    res = _run_installer(bare_python, str(fake))
    assert res.returncode != 0
    assert "sha256 mismatch" in res.stderr
    assert str(fake) in res.stderr
    probe = subprocess.run([bare_python, "-c", "import detectron2"], capture_output=True)
    assert probe.returncode != 0


def test_missing_wheel_is_refused(bare_python, tmp_path):
    res = _run_installer(bare_python, str(tmp_path / "does_not_exist.whl"))
    assert res.returncode != 0
    assert "not found" in res.stderr


def test_existing_detectron2_is_kept():
    import detectron2

    res = _run_installer(sys.executable, None)
    assert res.returncode == 0, res.stderr
    assert "keeping it" in res.stdout
    assert detectron2.__version__ in res.stdout


def test_collect_env_reports_versions():
    import detectron2
    import torch

    res = subprocess.run(
        [sys.executable, "-m", "nfdet.collect_env"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for name, version in (("torch", torch.__version__), ("detectron2", detectron2.__version__)):
        line = next(x for x in out.splitlines() if x.startswith(name + " "))
        assert version in line
    assert "detectron2 compiled ops" in out
    assert "CUDA available" in out


@pytest.mark.parametrize("module", ["nfdet", "nfdet.config", "nfdet.modeling"])
def test_core_imports_do_not_need_detectron2(module):
    code = (
        f"import sys, {module}; "
        "sys.exit(int(any(m.startswith('detectron2') for m in sys.modules)))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, f"importing {module} imported detectron2\n{res.stderr}"


def test_setup_is_up_to_date_after_make():
    """After `make test` has set up .venv, a second set-up has nothing to do (no reinstall)."""
    if not (REPO / ".venv" / ".stamp-test").exists():
        pytest.skip("no .venv made by `make setup` in this checkout (tests run outside make)")
    res = subprocess.run(["make", "-q", "setup"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, "make considers set-up out of date: a second run would reinstall"
