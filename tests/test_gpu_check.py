"""benchmarks/gpu_check.py runs on a machine without a GPU: --help, the plain run (facts recorded, every CUDA-only
phase skipped with its reason, exit 0) and --cpu_smoke (every phase but CUDA/CPU parity, at tiny sizes on the CPU).
The GPU run itself is not part of the suite (docs/scaling.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.py"


def _run(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def test_help():
    proc = _run("--help")
    assert proc.returncode == 0, proc.stderr
    assert "--cpu_smoke" in proc.stdout and "--output" in proc.stdout


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-CUDA path")
def test_without_cuda_records_facts_and_skips(tmp_path):
    proc = _run("--output", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["facts"]["torch"] and report["facts"]["cuda_available"] is False
    for phase in ("parity", "nest", "sdpa", "throughput"):
        assert "no CUDA device" in report["phases"][phase]["skipped"]
    assert "# GPU check" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.slow  # 12-25 s on the 2-core machine (a subprocess, imports and 4 systems)
def test_cpu_smoke_runs_every_phase(tmp_path):
    proc = _run("--cpu_smoke", "--output", str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    phases = report["phases"]
    assert "skipped" in phases["parity"]  # CUDA vs CPU needs CUDA
    nest = phases["nest"]
    assert nest["passed"] and nest["all_finite"] and nest["decreased"], nest
    for kind in ("rel_pos", "rel_pos_padded", "rotary", "rotary_padded"):
        row = phases["sdpa"][kind]
        assert row["backends"]["MATH"] == "ok" and row["default_dispatches_to"], row
    for system in ("ours_nest_fastconformer_l", "parakeet_l", "ours_contrastive_conformer_l", "w2v2_conformer_l"):
        row = phases["throughput"][system]
        assert "error" not in row, row
        assert (
            row["search"]["limited_by"].startswith("cap") and row["audio_s_per_s"] > 0 and row["flops_per_audio_s"] > 0
        )
    assert report["failed"] == []
