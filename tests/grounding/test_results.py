import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from grounding.metrics import MetricConvention, score_pair
from grounding.results import issue_counts, summarize_records, write_results


def _gt_mask() -> np.ndarray:
    gt_mask = np.zeros((4, 4), bool)
    gt_mask[:2, :2] = True
    return gt_mask


def _pair_scores(pair_id: str) -> dict[str, object]:
    corner = np.zeros((4, 4))
    corner[0, 0] = 1.0
    # p0: AUC 30/48 = 0.625 (1.0 beats 12 zeros, three zeros tie 12), Top-1 1.
    # p1: the same map on an empty ground truth, so AUC and CNR are NaN and Top-1 is 0.
    # p2: the map is positive only on the ground truth, so AUC 1 and Top-1 1. Its values
    # inside differ, so the CNR has a nonzero variance and is defined.
    if pair_id == "p0":
        return score_pair(corner, _gt_mask(), corner > 0.5).as_record()
    if pair_id == "p1":
        return score_pair(corner, np.zeros((4, 4), bool), corner > 0.5).as_record()
    exact = _gt_mask().astype(float)
    exact[1, 1] = 0.6
    return score_pair(exact, _gt_mask(), _gt_mask()).as_record()


def _records(methods: tuple[str, ...] = ("cross_attention", "bbm/bezier", "tokens/end")) -> list[dict[str, object]]:
    records = []
    for method in methods:
        for pair_id, finding in (("p0", "Edema"), ("p1", "Edema"), ("p2", "Atelectasis")):
            record = {"pair_id": pair_id, "finding": finding, "phrase": "small effusion", "method": method}
            record["mask_flag"] = "ok"
            record.update(_pair_scores(pair_id))
            records.append(record)
    return records


def test_summary_counts_empty_gt() -> None:
    summary = summarize_records(_records())

    method = summary["methods"]["cross_attention"]
    assert method["issue_counts"] == {"auc_single_class": 1, "cnr_undefined": 1, "empty_gt": 1}
    assert method["nan_counts"]["zero_all/auc_roc"] == 1
    assert method["nan_counts"]["keep_threshold_free/cnr"] == 1
    assert method["nan_counts"]["zero_all/top1"] == 0
    # Weighted, AUC-ROC: Edema has one defined value (0.625), Atelectasis 1.0, so
    # (1 * 0.625 + 1 * 1.0) / 2. Averaging the NaN in as 0 would give 0.45.
    assert method["overall"]["auc_roc"] == pytest.approx(0.8125)
    # Top-1: Edema (1 + 0) / 2 with n_c = 2, Atelectasis 1: (4 * 0.5 + 1 * 1) / 5.
    assert method["overall"]["top1"] == pytest.approx(0.6)
    assert summary["num_pairs"] == 3


def test_summary_names_convention() -> None:
    records = _records()

    summary = summarize_records(records)

    assert summary["convention"] == "gmm_miou"
    for method in ("cross_attention", "bbm/bezier", "tokens/end"):
        assert summary["methods"][method]["overall"]["convention"] == "gmm_miou"
        assert summary["methods"][method]["overall"]["policy"] == "zero_all"
        assert isinstance(summary["methods"][method]["overall"]["miou"], float)


def test_summary_rejects_bad_conventions() -> None:
    records = _records()
    mixed = records[:-1] + [{**records[-1], "convention": MetricConvention.MULTI_THRESHOLD.value}]
    missing = [{key: value for key, value in record.items() if key != "convention"} for record in records]

    with pytest.raises(ValueError, match="mix metric conventions"):
        summarize_records(mixed)
    with pytest.raises(ValueError, match="9 of 9 records from the input have no 'convention'"):
        summarize_records(missing)
    with pytest.raises(ValueError, match="No per-pair records to summarize"):
        summarize_records([])


def test_issue_counts_value_forms() -> None:
    records = [
        {"issues": "empty_gt;auc_single_class"},
        {"issues": ["empty_gt"]},
        {"issues": ""},
        {"issues": float("nan")},
        {"issues": None},
        {},
    ]

    assert issue_counts(records) == {"auc_single_class": 1, "empty_gt": 2}
    assert issue_counts([]) == {}


def test_issue_counts_skip_duplicates() -> None:
    records = _records(("cross_attention",))
    # A distributed sampler pads the last batch with an identical copy of a pair.
    padded = records + [dict(records[1])]

    summary = summarize_records(padded)

    assert summary["methods"]["cross_attention"]["issue_counts"]["empty_gt"] == 1
    assert summary["methods"]["cross_attention"]["overall"]["num_pairs"] == 3


def test_write_results_files_name_convention(tmp_path: Path) -> None:
    records = _records()
    summary = summarize_records(records)

    directory = write_results(records, summary, tmp_path / "results")

    written = json.loads((directory / "summary.json").read_text())
    assert written["convention"] == "gmm_miou"
    assert written["methods"]["cross_attention"]["overall"]["convention"] == "gmm_miou"
    assert set(pd.read_csv(directory / "pairs.csv")["convention"]) == {"gmm_miou"}
    for stem in ("findings", "findings_threshold_free", "ablations"):
        assert json.loads((directory / f"{stem}.json").read_text())["convention"] == "gmm_miou"
        table = pd.read_csv(directory / f"{stem}.csv")
        assert set(table["convention"]) == {"gmm_miou"}
        caption = (directory / f"{stem}.md").read_text().splitlines()[0]
        assert caption.startswith("Metric convention: gmm_miou.")
    findings = pd.read_csv(directory / "findings_threshold_free.csv")
    edema_auc = findings.loc[findings["row"] == "Edema", "cross_attention/AUC-ROC"].iloc[0]
    assert edema_auc == pytest.approx(0.625)


def test_write_results_adds_missing_convention(tmp_path: Path) -> None:
    records = _records()
    summary = summarize_records(records)
    del summary["convention"]

    directory = write_results(records, summary, tmp_path / "results")

    assert json.loads((directory / "summary.json").read_text())["convention"] == "gmm_miou"
    assert "convention" not in summary


def test_write_results_rejects_mismatch(tmp_path: Path) -> None:
    records = _records()
    summary = {**summarize_records(records), "convention": "multi_threshold"}

    with pytest.raises(ValueError, match="names metric convention 'multi_threshold'"):
        write_results(records, summary, tmp_path / "results")
    assert not (tmp_path / "results").exists()


def test_summary_all_nan_auc() -> None:
    records = [record for record in _records(("cross_attention",)) if record["pair_id"] == "p1"]

    summary = summarize_records(records)

    assert math.isnan(summary["methods"]["cross_attention"]["overall"]["auc_roc"])
    assert summary["methods"]["cross_attention"]["nan_counts"]["zero_all/auc_roc"] == 1


def test_summary_json_writes_nan_as_null(tmp_path: Path) -> None:
    records = [record for record in _records(("cross_attention",)) if record["pair_id"] == "p1"]

    write_results(records, summarize_records(records), tmp_path / "results")

    def reject(constant: str) -> None:
        raise ValueError(f"non-standard JSON constant {constant}")

    text = (tmp_path / "results" / "summary.json").read_text()
    summary = json.loads(text, parse_constant=reject)
    assert summary["methods"]["cross_attention"]["overall"]["auc_roc"] is None
