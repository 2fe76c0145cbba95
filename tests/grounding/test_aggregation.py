import math
from dataclasses import dataclass

import numpy as np
import pytest

from grounding.aggregation import (
    AggregateKind,
    aggregate,
    deduplicate_records,
    format_mean_std,
    summarize_runs,
)
from grounding.metrics import score_pair


def _records() -> list[dict[str, object]]:
    return [
        {"pair_id": "a1", "finding": "Edema", "miou": 0.2, "auc_roc": 0.9, "mask_empty": False},
        {"pair_id": "a2", "finding": "Edema", "miou": 0.4, "auc_roc": float("nan"), "mask_empty": False},
        {"pair_id": "a3", "finding": "Edema", "miou": 0.6, "auc_roc": 0.7, "mask_empty": True},
        {"pair_id": "b1", "finding": "Atelectasis", "miou": 1.0, "auc_roc": 0.5, "mask_empty": False},
    ]


def test_aggregate_weighted_hand_computed() -> None:
    result = aggregate(_records())

    # Edema (n=3) mean 0.4, Atelectasis (n=1) mean 1.0: (3 * 1.2 + 1 * 1.0) / (3 * 3 + 1).
    assert result.overall[AggregateKind.WEIGHTED]["miou"] == pytest.approx(4.6 / 10)
    assert result.overall[AggregateKind.PAIR_MEAN]["miou"] == pytest.approx(2.2 / 4)
    assert result.overall[AggregateKind.FINDING_MEAN]["miou"] == pytest.approx(0.7)
    assert result.findings["Edema"].means["miou"] == pytest.approx(0.4)
    assert result.findings["Edema"].n_pairs == 3


def test_aggregate_nan_counted_and_skipped() -> None:
    result = aggregate(_records())

    assert result.nan_counts == {"miou": 0, "auc_roc": 1}
    assert result.findings["Edema"].nan_counts["auc_roc"] == 1
    assert result.findings["Edema"].means["auc_roc"] == pytest.approx(0.8)
    # Edema has two defined AUCs, so n_c = 2: (2 * 1.6 + 1 * 0.5) / (2 * 2 + 1).
    assert result.overall[AggregateKind.WEIGHTED]["auc_roc"] == pytest.approx(3.7 / 5)
    assert result.overall[AggregateKind.PAIR_MEAN]["auc_roc"] == pytest.approx(2.1 / 3)


def test_aggregate_counts_empty_gt_nans() -> None:
    gt_mask = np.zeros((4, 4), bool)
    gt_mask[:2, :2] = True
    activation_map = np.zeros((4, 4))
    activation_map[0, 0] = 1.0
    mask = activation_map > 0.5
    scored = score_pair(activation_map, gt_mask, mask).as_record()
    empty_gt = score_pair(activation_map, np.zeros((4, 4), bool), mask).as_record()
    records = [
        {"pair_id": "p1", "finding": "Edema", **scored},
        {"pair_id": "p2", "finding": "Edema", **empty_gt},
    ]

    result = aggregate(records, ["keep_threshold_free/auc_roc", "keep_threshold_free/cnr", "keep_threshold_free/top1"])

    # AUC-ROC and CNR of the empty ground truth are counted as NaN and left out of the means.
    assert result.nan_counts["keep_threshold_free/auc_roc"] == 1
    assert result.nan_counts["keep_threshold_free/cnr"] == 1
    assert result.findings["Edema"].means["keep_threshold_free/auc_roc"] == scored["keep_threshold_free/auc_roc"]
    assert result.findings["Edema"].means["keep_threshold_free/cnr"] == pytest.approx(scored["keep_threshold_free/cnr"])
    # Top-1 is defined (a miss), so it is averaged in: (1 + 0) / 2.
    assert result.nan_counts["keep_threshold_free/top1"] == 0
    assert result.findings["Edema"].means["keep_threshold_free/top1"] == 0.5


def test_aggregate_infers_numeric_metrics() -> None:
    result = aggregate(_records())

    assert result.metric_names == ("miou", "auc_roc")


def test_aggregate_finding_order() -> None:
    records = _records() + [{"pair_id": "c1", "finding": "Aortic ectasia", "miou": 0.1, "auc_roc": 0.6}]

    result = aggregate(records)

    assert list(result.findings) == ["Atelectasis", "Edema", "Aortic ectasia"]
    assert list(result.rows())[3:] == [kind.label for kind in AggregateKind]


def test_aggregate_all_nan_metric() -> None:
    records = [{"pair_id": "x", "finding": "Edema", "cnr": float("nan")}]

    result = aggregate(records)

    assert math.isnan(result.findings["Edema"].means["cnr"])
    assert all(math.isnan(result.overall[kind]["cnr"]) for kind in AggregateKind)
    assert result.nan_counts["cnr"] == 1


def test_aggregate_missing_metric_is_nan() -> None:
    records = _records()
    del records[0]["miou"]

    result = aggregate(records, metric_names=["miou"])

    assert result.nan_counts["miou"] == 1
    assert result.findings["Edema"].means["miou"] == pytest.approx(0.5)


def test_deduplicate_drops_identical_copies() -> None:
    records = _records() + [dict(_records()[1]), dict(_records()[3])]

    unique_rows, dropped = deduplicate_records(records)
    result = aggregate(records)

    assert dropped == 2
    assert [row["pair_id"] for row in unique_rows] == ["a1", "a2", "a3", "b1"]
    assert result.duplicates_dropped == 2
    assert result.n_pairs == 4
    assert result.overall[AggregateKind.WEIGHTED]["miou"] == pytest.approx(0.46)


def test_deduplicate_conflict_raises() -> None:
    records = _records() + [{**_records()[0], "miou": 0.3}]

    with pytest.raises(ValueError, match=r"Pair 'a1' has two records that differ in \['miou'\]"):
        aggregate(records)


@dataclass
class PairRecord:
    pair_id: str
    finding: str
    miou: float


def test_aggregate_accepts_dataclasses() -> None:
    records = [PairRecord("p1", "Edema", 0.5), PairRecord("p2", "Edema", 0.7), PairRecord("p1", "Edema", 0.5)]

    result = aggregate(records)

    assert result.findings["Edema"].means["miou"] == pytest.approx(0.6)
    assert result.duplicates_dropped == 1


def test_aggregate_bad_records() -> None:
    with pytest.raises(ValueError, match="No per-pair records"):
        aggregate([])
    with pytest.raises(KeyError, match="pair_id"):
        aggregate([{"finding": "Edema", "miou": 0.5}])
    with pytest.raises(KeyError, match="finding"):
        aggregate([{"pair_id": "p", "miou": 0.5}])
    with pytest.raises(ValueError, match="'high', not a number"):
        aggregate([{"pair_id": "p", "finding": "Edema", "miou": "high"}], metric_names=["miou"])
    with pytest.raises(TypeError, match="mapping or a dataclass"):
        aggregate([("p", "Edema", 0.5)])


def test_summarize_runs_mean_std() -> None:
    first = aggregate([{"pair_id": "p", "finding": "Edema", "miou": 0.5}])
    second = aggregate([{"pair_id": "p", "finding": "Edema", "miou": 0.6}])

    summary = summarize_runs([first, second])
    edema = summary.rows["Edema"]["miou"]

    assert summary.n_runs == 2
    assert edema.mean == pytest.approx(0.55)
    assert edema.std == pytest.approx(math.sqrt(0.005))
    assert edema.format() == "0.55±.07"
    assert summary.rows[AggregateKind.WEIGHTED.label]["miou"].n_runs == 2


def test_summarize_single_run_no_std() -> None:
    only = aggregate([{"pair_id": "p", "finding": "Edema", "miou": 0.5}])

    summary = summarize_runs([only])

    assert math.isnan(summary.rows["Edema"]["miou"].std)
    assert summary.rows["Edema"]["miou"].format() == "0.50"
    with pytest.raises(ValueError, match="at least one"):
        summarize_runs([])


def test_format_mean_std_cases() -> None:
    assert format_mean_std(0.54, 0.001) == "0.54±.00"
    assert format_mean_std(1.26, 0.04) == "1.26±.04"
    assert format_mean_std(0.5, 1.234) == "0.50±1.23"
    assert format_mean_std(float("nan"), 0.1) == "nan"
    assert format_mean_std(0.123, 0.0456, digits=3) == "0.123±.046"
