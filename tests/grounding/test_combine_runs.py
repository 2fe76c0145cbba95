from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from grounding.combine_runs import combine_runs, main
from grounding.results import metric_keys


def write_run(directory: Path, miou: float) -> Path:
    rows = []
    for index, finding in enumerate(["Cardiomegaly", "Cardiomegaly", "Pneumothorax"]):
        for method in ("cross_attention", "bbm/bezier", "tokens/end"):
            row = {"pair_id": f"p{index}", "finding": finding, "method": method, "phrase": "x"}
            row.update({key: miou for key in metric_keys()})
            rows.append(row)
    directory.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(directory / "pairs.csv", index=False)
    return directory


def test_mean_and_std_over_runs(tmp_path: Path) -> None:
    runs = [write_run(tmp_path / f"seed{seed}", miou) for seed, miou in ((1, 0.5), (2, 0.7))]

    combine_runs(runs, tmp_path / "combined")

    table = json.loads((tmp_path / "combined" / "findings.json").read_text())
    text = json.dumps(table)
    assert "cross_attention" in text
    assert "tokens/end" not in text
    markdown = (tmp_path / "combined" / "findings.md").read_text()
    assert "0.60±.14" in markdown
    assert (tmp_path / "combined" / "findings_threshold_free.csv").is_file()


def test_single_run_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least two"):
        combine_runs([write_run(tmp_path / "one", 0.5)], tmp_path / "out")


def test_missing_pairs_file_named(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="No pairs.csv"):
        main([str(write_run(tmp_path / "one", 0.5)), str(tmp_path / "empty"), "--output", str(tmp_path / "out")])
