"""bench/gpu_check.sh in its CPU dry mode: the script a GPU session runs works end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.integration.conftest import REPO_ROOT, subprocess_env


def test_gpu_check_dry_run_reports_every_check(tmp_path: Path) -> None:
    env = {**subprocess_env(), "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "bench" / "gpu_check.sh"), "--dry", "--work", str(tmp_path)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / "gpu_check.md").read_text()
    assert "CPU (dry run)" in report
    assert "training step, instance_memory (the paper), AMP" in report
    assert "training step, cluster_contrast + camera proxies, AMP" in report
    assert "'loss/intra'" in report and "'loss/instance'" in report
    assert "neighbour overlap 1.0000" in report  # the same neighbours from both indexes
    assert "index on the GPU: False" in report
