"""The compatibility check (scripts/compat_check.sh): a fresh environment with another torch
release, rode installed next to it, the core suite both ways (private torch calls, then
RODE_TORCH_PUBLIC=1). Downloads 1-6 GB and takes many minutes: slow."""
import os
import subprocess

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_compat_check_passes_on_the_oldest_supported_torch(tmp_path):
    version = os.environ.get("RODE_COMPAT_TORCH", "2.4.1")
    env = dict(os.environ, COMPAT_VENV=str(tmp_path / "venv"))
    env.pop("RODE_TORCH_PUBLIC", None)
    out = subprocess.run(["bash", str(ROOT / "scripts" / "compat_check.sh"), version], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=3600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert f"torch {version}" in log and f"== torch {version}: PASSED" in log
    assert "RODE_TORCH_PUBLIC=1" in log and " failed" not in log
    assert not (tmp_path / "venv").exists()     # deleted afterwards
