from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "tests" / "helpers" / "ddp_validate.py"


def run_validation(work_dir: Path, devices: int) -> Path:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(work_dir), str(devices)],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return work_dir / f"run-{devices}" / "grounding" / "val-step000000"


def test_two_processes_match_one(tmp_path: Path) -> None:
    single = run_validation(tmp_path, devices=1)
    double = run_validation(tmp_path, devices=2)

    single_summary = json.loads((single / "summary.json").read_text())
    double_summary = json.loads((double / "summary.json").read_text())
    single_pairs = pd.read_csv(single / "pairs.csv").sort_values(["method", "pair_id"]).reset_index(drop=True)
    double_pairs = pd.read_csv(double / "pairs.csv").sort_values(["method", "pair_id"]).reset_index(drop=True)

    # An odd number of pairs makes the distributed sampler pad with a duplicate.
    assert single_summary["num_pairs"] % 2 == 1
    assert double_summary["num_pairs"] == single_summary["num_pairs"]
    assert double_pairs["pair_id"].tolist() == single_pairs["pair_id"].tolist()
    # Batches of other sizes round matrix products differently, which can move a mask pixel.
    for method, values in single_summary["methods"].items():
        for name in ("miou", "cnr", "top1", "auc_roc"):
            assert double_summary["methods"][method]["overall"][name] == pytest.approx(values["overall"][name], abs=1e-3)
