import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from grounding.aggregation import AggregateKind, aggregate, summarize_runs
from grounding.metrics import MetricConvention, score_pair
from grounding.reporting import (
    MISSING_CELL,
    PAPER_TABLE_METRICS,
    THRESHOLD_FREE_TABLE_METRICS,
    convention_caption,
    pair_record,
    records_convention,
    write_finding_tables,
    write_method_tables,
    write_pair_csv,
)
from grounding.tokens import TokenSelection, TokenStrategy


def _scored_records(shift: float = 0.0) -> list[dict[str, object]]:
    gt_mask = np.zeros((8, 8), bool)
    gt_mask[:4, :4] = True
    selection = TokenSelection(TokenStrategy.LEXICAL, (1, 3), ("small", "effusion"), "function-word-filter")
    records = []
    for index, (finding, offset) in enumerate([("Edema", 0.0), ("Edema", 1.0), ("Atelectasis", 2.0)]):
        activation_map = np.linspace(0.0, 1.0, 64).reshape(8, 8)[::-1].copy()
        activation_map[index, index] += offset + shift
        mask = activation_map > 0.5 if finding == "Edema" else np.zeros((8, 8), bool)
        scores = score_pair(activation_map, gt_mask, mask)
        records.append(pair_record(f"p{index}", finding, "small, effusion", selection, scores, image_id=f"img{index}"))
    return records


def test_pair_record_flattens() -> None:
    record = _scored_records()[0]

    assert record["pair_id"] == "p0"
    assert record["token_positions"] == [1, 3]
    assert record["tagger"] == "function-word-filter"
    assert record["image_id"] == "img0"
    assert "zero_all/miou" in record
    assert "keep_threshold_free/auc_roc" in record


def test_pair_csv_round_trip(tmp_path: Path) -> None:
    records = _scored_records()
    records[1]["keep_threshold_free/auc_roc"] = float("nan")

    path = write_pair_csv(records, tmp_path / "nested" / "pairs.csv")
    frame = pd.read_csv(path)

    assert list(frame.columns[:7]) == [
        "pair_id", "image_id", "finding", "phrase", "token_strategy", "token_positions", "token_words",
    ]  # fmt: skip
    assert len(frame) == 3
    assert json.loads(frame.loc[0, "token_words"]) == ["small", "effusion"]
    assert frame.loc[0, "phrase"] == "small, effusion"
    assert math.isnan(frame.loc[1, "keep_threshold_free/auc_roc"])
    assert frame.loc[2, "zero_all/miou"] == 0.0


def test_pair_csv_rejects_empty(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="No per-pair records"):
        write_pair_csv([], tmp_path / "pairs.csv")


def test_finding_tables_two_methods(tmp_path: Path) -> None:
    records = _scored_records()
    plain = aggregate(records)
    merged = aggregate(_scored_records(shift=0.5))

    paths = write_finding_tables(
        {"LDM": plain, "+BBM": merged}, tmp_path / "tables", THRESHOLD_FREE_TABLE_METRICS, convention="gmm_miou"
    )

    markdown = paths.markdown.read_text(encoding="utf-8").splitlines()
    assert markdown[2] == (
        "| Finding | LDM mIoU | LDM CNR | LDM Top-1 | LDM AUC-ROC"
        " | +BBM mIoU | +BBM CNR | +BBM Top-1 | +BBM AUC-ROC |"
    )
    assert [line.split(" | ")[0] for line in markdown[4:]] == [
        "| Atelectasis", "| Edema", *(f"| {kind.label}" for kind in AggregateKind),
    ]  # fmt: skip
    edema_miou = plain.findings["Edema"].means["keep_threshold_free/miou"]
    assert markdown[5].split(" | ")[1] == f"{edema_miou:.2f}"

    table = pd.read_csv(paths.csv)
    weighted = table[table["row"] == AggregateKind.WEIGHTED.label].iloc[0]
    assert weighted["LDM/mIoU"] == pytest.approx(plain.overall[AggregateKind.WEIGHTED]["keep_threshold_free/miou"])

    document = json.loads(paths.json.read_text(encoding="utf-8"))
    assert document["methods"]["LDM"]["n_pairs"] == {"Atelectasis": 1, "Edema": 2}
    assert document["rows"][0] == "Atelectasis"


def test_finding_tables_paper_columns_zeroed(tmp_path: Path) -> None:
    result = aggregate(_scored_records())

    paths = write_finding_tables({"LDM": result}, tmp_path, convention=MetricConvention.GMM_MIOU)

    markdown = paths.markdown.read_text(encoding="utf-8").splitlines()
    assert markdown[2] == "| Finding | LDM mIoU | LDM CNR (signed) |"
    # The only Atelectasis pair has an empty mask, so the zero_all columns read 0.
    assert markdown[4] == "| Atelectasis | 0.00 | 0.00 |"
    assert list(PAPER_TABLE_METRICS) == ["zero_all/miou", "zero_all/cnr_signed"]


def test_finding_tables_seed_summary(tmp_path: Path) -> None:
    runs = [aggregate(_scored_records(shift=shift)) for shift in (0.0, 0.2, 0.4)]
    summary = summarize_runs(runs)

    paths = write_finding_tables(
        {"LDM": summary}, tmp_path, {"keep_threshold_free/cnr": "CNR"}, digits=2, convention="gmm_miou"
    )

    edema = summary.rows["Edema"]["keep_threshold_free/cnr"]
    markdown = paths.markdown.read_text(encoding="utf-8")
    assert f"| Edema | {edema.format(2)} |" in markdown
    assert "±" in edema.format(2)
    table = pd.read_csv(paths.csv)
    assert "LDM/CNR std" in table.columns
    document = json.loads(paths.json.read_text(encoding="utf-8"))
    assert document["methods"]["LDM"]["n_runs"] == 3
    assert document["methods"]["LDM"]["values"]["Edema"]["keep_threshold_free/cnr"]["n_runs"] == 3


def test_finding_tables_missing_and_nan(tmp_path: Path) -> None:
    result = aggregate([{"pair_id": "p", "finding": "Edema", "cnr": float("nan")}])

    paths = write_finding_tables({"LDM": result}, tmp_path, {"cnr": "CNR", "miou": "mIoU"}, convention="gmm_miou")

    markdown = paths.markdown.read_text(encoding="utf-8").splitlines()
    assert markdown[4] == f"| Edema | {MISSING_CELL} | {MISSING_CELL} |"
    document = json.loads(paths.json.read_text(encoding="utf-8"))
    assert document["methods"]["LDM"]["values"]["Edema"] == {"cnr": None, "miou": None}
    assert document["methods"]["LDM"]["nan_counts"] == {"cnr": 1}


def test_finding_tables_bad_output(tmp_path: Path) -> None:
    result = aggregate([{"pair_id": "p", "finding": "Edema", "miou": 0.5}])
    existing_file = tmp_path / "report.txt"
    existing_file.write_text("not a folder", encoding="utf-8")

    with pytest.raises(ValueError, match="existing file"):
        write_finding_tables({"LDM": result}, existing_file, convention="gmm_miou")
    with pytest.raises(ValueError, match="at least one method"):
        write_finding_tables({}, tmp_path, convention="gmm_miou")
    with pytest.raises(ValueError, match="not a valid MetricConvention"):
        write_finding_tables({"LDM": result}, tmp_path, convention="mixed")
    with pytest.raises(TypeError, match="convention"):
        write_finding_tables({"LDM": result}, tmp_path)


def test_method_tables_group_records(tmp_path: Path) -> None:
    records = [{**record, "method": "no BBM"} for record in _scored_records()]
    records += [{**record, "method": "BBM"} for record in _scored_records(shift=0.5)]

    paths = write_method_tables(records, tmp_path)

    markdown = paths.markdown.read_text(encoding="utf-8").splitlines()
    assert markdown[0] == convention_caption(MetricConvention.GMM_MIOU)
    assert markdown[2] == "| Finding | no BBM mIoU | no BBM CNR (signed) | BBM mIoU | BBM CNR (signed) |"
    expected = aggregate([record for record in records if record["method"] == "BBM"], list(PAPER_TABLE_METRICS))
    document = json.loads(paths.json.read_text(encoding="utf-8"))
    assert document["methods"]["BBM"]["values"]["Edema"]["zero_all/miou"] == pytest.approx(
        expected.findings["Edema"].means["zero_all/miou"]
    )
    with pytest.raises(KeyError, match="'method'"):
        write_method_tables(_scored_records(), tmp_path)


def test_finding_tables_name_convention(tmp_path: Path) -> None:
    records = [{**record, "method": "LDM"} for record in _scored_records()]
    plain = aggregate(_scored_records())

    paths = write_finding_tables({"LDM": plain}, tmp_path, convention="multi_threshold")

    markdown = paths.markdown.read_text(encoding="utf-8").splitlines()
    assert markdown[0].startswith("Metric convention: multi_threshold. mIoU is the foreground IoU")
    assert markdown[1] == ""
    table = pd.read_csv(paths.csv)
    assert list(table.columns) == ["row", "LDM/mIoU", "LDM/CNR (signed)", "convention"]
    assert set(table["convention"]) == {"multi_threshold"}
    assert table["LDM/mIoU"].dtype == float
    document = json.loads(paths.json.read_text(encoding="utf-8"))
    assert document["convention"] == "multi_threshold"
    assert set(document) == {"convention", "metrics", "rows", "methods"}
    # write_method_tables takes the convention from the records.
    inferred = write_method_tables(records, tmp_path / "inferred")
    assert json.loads(inferred.json.read_text(encoding="utf-8"))["convention"] == "gmm_miou"
    assert "gmm_miou" in inferred.markdown.read_text(encoding="utf-8").splitlines()[0]


def test_records_convention_found() -> None:
    records = _scored_records()

    assert records_convention(records) is MetricConvention.GMM_MIOU
    assert records[0]["convention"] == "gmm_miou"


def test_records_convention_rejects_bad(tmp_path: Path) -> None:
    records = _scored_records()
    mixed = [records[0], {**records[1], "convention": "multi_threshold"}]
    missing = [records[0], {key: value for key, value in records[1].items() if key != "convention"}]
    from_csv = [{**records[0], "convention": float("nan")}]
    unknown = [{**records[0], "convention": "bogus"}]

    with pytest.raises(ValueError, match=r"Records from run-a mix metric conventions \{'gmm_miou': 1, 'multi_threshold': 1\}"):
        records_convention(mixed, source="run-a")
    with pytest.raises(ValueError, match="1 of 2 records from the input have no 'convention'"):
        records_convention(missing)
    with pytest.raises(ValueError, match="have no 'convention'"):
        records_convention(from_csv)
    with pytest.raises(ValueError, match="unknown metric convention 'bogus'"):
        records_convention(unknown)
    with pytest.raises(ValueError, match="No per-pair records"):
        records_convention([])
    with pytest.raises(ValueError, match="mix metric conventions"):
        write_method_tables([{**record, "method": "LDM"} for record in mixed], tmp_path)
    assert not (tmp_path / "findings.csv").exists()
