"""scripts/gpu_check.sh end to end on this CPU machine, in a copy of the repo.

The GPU machine's time is scarce (minutes per task), so the script's plumbing is
checked here: wheel extraction, the step table, the time budget, the summary
and the exit status. Without CUDA every GPU test skips and every GPU benchmark
says so and exits 0, so a passing run here means the script itself works.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CORE = sorted((REPO / "python" / "qdelta").glob("_core*.so"))

pytestmark = pytest.mark.skipif(
    not CORE or shutil.which("bash") is None or shutil.which("timeout") is None,
    reason="needs the built extension, bash and coreutils timeout",
)


def _copy_repo(dest: Path, *, with_tests: bool = True) -> None:
    """The parts of the tree the script uses, without the built extension."""
    ignore = shutil.ignore_patterns("_core*.so", "__pycache__", "*.pyc")
    parts = ["python", "scripts", "benches", "docs", "README.md", "pyproject.toml"]
    if with_tests:
        parts.append("tests")
    for part in parts:
        src = REPO / part
        if src.is_dir():
            shutil.copytree(src, dest / part, ignore=ignore)
        else:
            shutil.copy2(src, dest / part)


def _wheelhouse(dest: Path) -> None:
    """A wheel holding just the extension, named like maturin's abi3 wheel."""
    (dest / "wheelhouse").mkdir()
    wheel = dest / "wheelhouse" / "qdelta-0.0.0-cp38-abi3-linux_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as whl:
        whl.write(CORE[0], f"qdelta/{CORE[0].name}")


def _run(root: Path, budget_s: int) -> tuple[subprocess.CompletedProcess, Path]:
    out = root / "out"
    env = {
        **os.environ,
        "OUT": str(out),
        "QDELTA_GPU_PYTHON": sys.executable,
        "QDELTA_GPU_BUDGET_S": str(budget_s),
        "PYTHONPATH": "",
    }
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=budget_s + 120,
    )
    return proc, out


def _steps(out: Path) -> dict[str, str]:
    rows = (line.split("\t") for line in (out / "steps.tsv").read_text().splitlines())
    return {name: rc for name, rc, _seconds in rows}


def test_gpu_check_passes_without_a_gpu(tmp_path):
    _copy_repo(tmp_path)
    _wheelhouse(tmp_path)
    proc, out = _run(tmp_path, budget_s=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    steps = _steps(out)
    assert list(steps) == [
        "environment", "install", "gpu-tests", "bench_delta_gpu", "bench_ring_gpu", "profile",
    ]  # fmt: skip
    assert set(steps.values()) == {"0"}, steps
    # The extension came out of the wheel, beside the copied sources.
    assert (tmp_path / "python" / "qdelta" / CORE[0].name).is_file()
    summary = (out / "summary.md").read_text()
    assert "Result: every step passed" in summary
    assert "## GPU tests" in summary and "failures: 0" in summary and "errors: 0" in summary
    assert (out / "junit-gpu.xml").is_file()
    assert "no CUDA device" in (out / "bench_delta_gpu.log").read_text()


def test_gpu_check_reports_failed_steps_and_exits_1(tmp_path):
    # No wheel and no tests: the install and test steps fail, the rest still run.
    _copy_repo(tmp_path, with_tests=False)
    (tmp_path / "wheelhouse").mkdir()
    proc, out = _run(tmp_path, budget_s=120)
    assert proc.returncode == 1, proc.stdout[-3000:]
    steps = _steps(out)
    assert steps["install"] != "0" and steps["gpu-tests"] != "0"
    assert "profile" in steps  # later steps were not skipped by the failure
    summary = (out / "summary.md").read_text()
    assert "Result: FAILED (steps: install gpu-tests" in summary
    assert "no qdelta wheel in wheelhouse/" in (out / "install.log").read_text()
