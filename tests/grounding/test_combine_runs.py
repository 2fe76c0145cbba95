from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from grounding.combine_runs import combine_runs, main
from grounding.results import metric_keys


def write_run(directory: Path, miou: float, convention: str | None = "gmm_miou") -> Path:
    rows = []
    for index, finding in enumerate(["Cardiomegaly", "Cardiomegaly", "Pneumothorax"]):
        for method in ("cross_attention", "bbm/bezier", "tokens/end"):
            row = {"pair_id": f"p{index}", "finding": finding, "method": method, "phrase": "x"}
            if convention is not None:
                row["convention"] = convention
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


def test_convention_carried_to_tables(tmp_path: Path) -> None:
    runs = [write_run(tmp_path / f"seed{seed}", 0.5, "multi_threshold") for seed in (1, 2)]

    combine_runs(runs, tmp_path / "combined")

    for stem in ("findings", "findings_threshold_free"):
        document = json.loads((tmp_path / "combined" / f"{stem}.json").read_text())
        assert document["convention"] == "multi_threshold"
        table = pd.read_csv(tmp_path / "combined" / f"{stem}.csv")
        assert set(table["convention"]) == {"multi_threshold"}
        caption = (tmp_path / "combined" / f"{stem}.md").read_text().splitlines()[0]
        assert caption.startswith("Metric convention: multi_threshold.")


def test_mixed_conventions_rejected(tmp_path: Path) -> None:
    first = write_run(tmp_path / "gmm", 0.5, "gmm_miou")
    second = write_run(tmp_path / "threshold", 0.7, "multi_threshold")

    with pytest.raises(ValueError, match="different metric conventions") as raised:
        combine_runs([first, second], tmp_path / "out")
    assert f"{first}: gmm_miou" in str(raised.value)
    assert f"{second}: multi_threshold" in str(raised.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit, match="different metric conventions"):
        main([str(first), str(second), "--output", str(tmp_path / "out")])


def test_missing_convention_names_folder(tmp_path: Path) -> None:
    first = write_run(tmp_path / "new", 0.5)
    second = write_run(tmp_path / "old", 0.7, convention=None)

    with pytest.raises(ValueError, match=re.escape(f"records from {second / 'pairs.csv'} have no 'convention'")):
        combine_runs([first, second], tmp_path / "out")


def test_single_run_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least two"):
        combine_runs([write_run(tmp_path / "one", 0.5)], tmp_path / "out")


def test_missing_pairs_file_named(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="No pairs.csv"):
        main([str(write_run(tmp_path / "one", 0.5)), str(tmp_path / "empty"), "--output", str(tmp_path / "out")])


def test_repeated_folder_rejected(tmp_path: Path) -> None:
    run = write_run(tmp_path / "seed1", 0.5)

    with pytest.raises(ValueError, match="more than once"):
        combine_runs([run, tmp_path / "." / "seed1"], tmp_path / "combined")


def test_partial_methods_and_pairs_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = write_run(tmp_path / "seed1", 0.5)
    second = write_run(tmp_path / "seed2", 0.7)
    frame = pd.read_csv(second / "pairs.csv")
    frame = frame[(frame["method"] != "bbm/bezier") & (frame["pair_id"] != "p2")]
    frame.to_csv(second / "pairs.csv", index=False)

    with caplog.at_level("WARNING", logger="grounding.combine_runs"):
        combine_runs([first, second], tmp_path / "combined")

    assert "['bbm/bezier'] are missing from some runs" in caplog.text
    assert "different pairs (3 / 2 pairs)" in caplog.text
    assert "bbm/bezier" not in (tmp_path / "combined" / "findings.md").read_text()


def test_different_stages_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    runs = [write_run(tmp_path / "a" / "val-step000100", 0.5), write_run(tmp_path / "b" / "untrained-step000000", 0.2)]

    with caplog.at_level("WARNING", logger="grounding.combine_runs"):
        combine_runs(runs, tmp_path / "combined")

    assert "different evaluations (['untrained', 'val'])" in caplog.text
