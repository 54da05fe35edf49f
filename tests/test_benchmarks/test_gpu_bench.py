"""``benchmarks/gpu_bench.py --tiny`` runs end to end on this machine (tiny models, CPU), so
the GPU benchmark never rots between GPU runs: every case and A/B prints its figures, the
JSON lines parse, and kubetune's step shows no Python-visible host sync while the bare
loop's per-step ``loss.item()`` shows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def test_tiny_mode_measures_every_case_and_ab(tmp_path: Path) -> None:
    out = tmp_path / "figures.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_bench.py", "--tiny", "--rounds", "1", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1700, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    labels = [r["label"] for r in rows]
    assert len([lb for lb in labels if not lb.startswith("A/B")]) == 8, labels  # 4 cases x GC
    assert [lb.split(":")[0] for lb in labels if lb.startswith("A/B")] == [
        "A/B mixed precision (bf16 weights)",
        "A/B LoRA targets",
    ]  # channels_last: CUDA only
    for row in rows:
        assert all(f["images_per_s"] > 0 for f in row["figures"]), row
    compared = [r for r in rows if not r["label"].startswith("A/B")]
    for row in compared:
        kubetune, bare = row["figures"]
        assert (kubetune["loop"], bare["loop"]) == ("kubetune", "bare")
        assert kubetune["python_syncs"] == 0 and bare["python_syncs"] >= 1, row
    assert "total" in done.stdout and "not measured" not in done.stdout
