"""Result files of a grounding evaluation: a per-pair CSV and per-finding tables.

The per-finding tables are laid out like Table 1 of Generate to Ground (MIDL 2025): one row
per MS-CXR finding followed by the overall averages, and for each method (e.g. without and
with Bimodal Bias Merging, or a control) one column per metric. They are written as CSV,
JSON and Markdown, and each names the metric convention (`gmm_miou` or `multi_threshold`)
behind its mIoU and CNR, because both conventions share those labels.
"""

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from grounding.aggregation import (
    FINDING_KEY,
    ID_KEY,
    AggregateKind,
    AggregateResult,
    MeanStd,
    RunSummary,
    aggregate,
)
from grounding.metrics import MetricConvention, PairScores
from grounding.tokens import TokenSelection

logger = logging.getLogger(__name__)

# Columns of Generate to Ground's tables, computed as its reference code did: every metric 0
# for an empty mask, and CNR without the absolute value.
PAPER_TABLE_METRICS = {"zero_all/miou": "mIoU", "zero_all/cnr_signed": "CNR (signed)"}
# The same columns with threshold-free metrics kept for empty masks and CNR as |.|.
THRESHOLD_FREE_TABLE_METRICS = {
    "keep_threshold_free/miou": "mIoU",
    "keep_threshold_free/cnr": "CNR",
    "keep_threshold_free/top1": "Top-1",
    "keep_threshold_free/auc_roc": "AUC-ROC",
}
CONVENTION_KEY = "convention"
LEADING_PAIR_COLUMNS = (ID_KEY, "image_id", FINDING_KEY, "phrase", "token_strategy", "token_positions", "token_words")
MISSING_CELL = "n/a"


@dataclass(frozen=True)
class TablePaths:
    """Files of one per-finding table."""

    csv: Path
    json: Path
    markdown: Path


def pair_record(
    pair_id: str,
    finding: str,
    phrase: str,
    selection: TokenSelection,
    scores: PairScores,
    **extra: Any,
) -> dict[str, Any]:
    """Flatten one scored pair into a row of the per-pair CSV and an input of `aggregate`.

    Args:
        pair_id: Stable id of the (image, phrase) pair.
        finding: MS-CXR finding name.
        phrase: The grounded phrase.
        selection: Tokens whose maps were averaged.
        scores: Metrics under both empty-mask policies.
        **extra: Further columns, e.g. `image_id` or `seed`.

    Returns:
        A flat dict with ids, token selection and `PairScores.as_record` values.
    """
    record: dict[str, Any] = {
        ID_KEY: pair_id,
        FINDING_KEY: finding,
        "phrase": phrase,
        "token_strategy": selection.strategy.value,
        "token_positions": list(selection.positions),
        "token_words": list(selection.words),
        "tagger": selection.tagger,
        "token_fallback": selection.fallback or "",
    }
    record.update(extra)
    record.update(scores.as_record())
    return record


def records_convention(records: Sequence[Mapping[str, Any]], source: str = "the input") -> MetricConvention:
    """Find the one metric convention that every record was scored under.

    Records that mix conventions are rejected rather than labelled "mixed", because their
    mIoU and CNR values have different definitions and no mean over them is meaningful.

    Args:
        records: Per-pair records with a `convention` key, e.g. from `pair_record`.
        source: Name of the records' origin (e.g. a result folder), used in error messages.

    Returns:
        The shared convention.

    Raises:
        ValueError: If there are no records, a record has no convention or an unknown one,
            or the records name more than one convention.
    """
    if not records:
        raise ValueError(f"No per-pair records from {source}, so their metric convention is unknown.")
    counts: dict[str, int] = {}
    missing = 0
    for record in records:
        value = record.get(CONVENTION_KEY)
        # A CSV cell without a value reads back as NaN, so anything but a string is missing.
        if not isinstance(value, str) or not value:
            missing += 1
            continue
        counts[value] = counts.get(value, 0) + 1
    if missing:
        raise ValueError(
            f"{missing} of {len(records)} records from {source} have no {CONVENTION_KEY!r}; "
            "score pairs with score_pair so that each record names its metric convention."
        )
    if len(counts) > 1:
        raise ValueError(
            f"Records from {source} mix metric conventions {counts}; mIoU and CNR are defined "
            "differently under each, so aggregate each convention separately."
        )
    (value,) = counts
    try:
        return MetricConvention(value)
    except ValueError:
        known = [convention.value for convention in MetricConvention]
        raise ValueError(
            f"Records from {source} name the unknown metric convention {value!r}; expected one of {known}."
        ) from None


def _cell_for_csv(value: Any) -> Any:
    # Lists and tuples become JSON, so token positions and words read back unambiguously.
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    return value


def write_pair_csv(records: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write one row per pair: ids, finding, phrase, selected tokens, then every metric.

    Args:
        records: Per-pair records, e.g. from `pair_record`.
        path: CSV file to write; its folder is created.

    Returns:
        The path written.

    Raises:
        ValueError: If `records` is empty.
    """
    if not records:
        raise ValueError(f"No per-pair records to write to {path}; check that the evaluation scored any pair.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    columns = list(dict.fromkeys(key for record in records for key in record))
    leading = [column for column in LEADING_PAIR_COLUMNS if column in columns]
    ordered = leading + [column for column in columns if column not in leading]
    frame = pd.DataFrame([{key: _cell_for_csv(value) for key, value in record.items()} for record in records])
    frame[ordered].to_csv(path, index=False, na_rep="nan")
    logger.info("Wrote %d pair records to %s.", len(records), path)
    return path


def _method_rows(result: AggregateResult | RunSummary) -> dict[str, dict[str, float | MeanStd]]:
    if isinstance(result, RunSummary):
        return {label: dict(values) for label, values in result.rows.items()}
    return {label: dict(values) for label, values in result.rows().items()}


def _row_order(methods: Mapping[str, AggregateResult | RunSummary]) -> list[str]:
    aggregate_labels = [kind.label for kind in AggregateKind]
    labels = list(dict.fromkeys(label for result in methods.values() for label in _method_rows(result)))
    return [label for label in labels if label not in aggregate_labels] + [
        label for label in aggregate_labels if label in labels
    ]


def _format_cell(value: float | MeanStd | None, digits: int) -> str:
    if value is None:
        return MISSING_CELL
    if isinstance(value, MeanStd):
        return MISSING_CELL if math.isnan(value.mean) else value.format(digits)
    return MISSING_CELL if math.isnan(value) else f"{value:.{digits}f}"


def _json_value(value: float | MeanStd | None) -> float | dict[str, float | int] | None:
    if value is None:
        return None
    if isinstance(value, MeanStd):
        return {"mean": _json_number(value.mean), "std": _json_number(value.std), "n_runs": value.n_runs}
    return _json_number(value)


def _json_number(value: float) -> float | None:
    # JSON has no NaN, so an undefined value is written as null.
    return None if math.isnan(value) else value


def _write_csv_table(
    method_rows: Mapping[str, dict[str, dict[str, float | MeanStd]]],
    row_labels: list[str],
    metrics: Mapping[str, str],
    convention: MetricConvention,
    path: Path,
) -> None:
    # One numeric column per method and metric, plus a std column for summaries. The
    # convention is the last column, so the metric columns keep their positions.
    csv_rows = []
    for label in row_labels:
        csv_row: dict[str, Any] = {"row": label}
        for name, rows in method_rows.items():
            for metric, column in metrics.items():
                value = rows.get(label, {}).get(metric)
                if isinstance(value, MeanStd):
                    csv_row[f"{name}/{column}"] = value.mean
                    csv_row[f"{name}/{column} std"] = value.std
                else:
                    csv_row[f"{name}/{column}"] = float("nan") if value is None else value
        csv_row[CONVENTION_KEY] = convention.value
        csv_rows.append(csv_row)
    pd.DataFrame(csv_rows).to_csv(path, index=False, na_rep="nan")


def _write_json_table(
    methods: Mapping[str, AggregateResult | RunSummary],
    method_rows: Mapping[str, dict[str, dict[str, float | MeanStd]]],
    row_labels: list[str],
    metrics: Mapping[str, str],
    convention: MetricConvention,
    path: Path,
) -> None:
    # The same values nested by method, row and metric, with the column labels.
    document: dict[str, Any] = {
        CONVENTION_KEY: convention.value,
        "metrics": dict(metrics),
        "rows": row_labels,
        "methods": {},
    }
    for name, result in methods.items():
        entry: dict[str, Any] = {
            "values": {
                label: {metric: _json_value(method_rows[name].get(label, {}).get(metric)) for metric in metrics}
                for label in row_labels
            }
        }
        if isinstance(result, AggregateResult):
            entry["n_pairs"] = {finding: summary.n_pairs for finding, summary in result.findings.items()}
            entry["nan_counts"] = result.nan_counts
            entry["duplicates_dropped"] = result.duplicates_dropped
        else:
            entry["n_runs"] = result.n_runs
        document["methods"][name] = entry
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def convention_caption(convention: MetricConvention) -> str:
    """Build the caption line that names a table's metric convention and defines mIoU and CNR."""
    return f"Metric convention: {convention.value}. {convention.description}"


def _write_markdown_table(
    method_rows: Mapping[str, dict[str, dict[str, float | MeanStd]]],
    row_labels: list[str],
    metrics: Mapping[str, str],
    convention: MetricConvention,
    digits: int,
    path: Path,
) -> None:
    # A caption line, then findings and the averages, like Table 1 of Generate to Ground.
    header = ["Finding"] + [f"{name} {column}" for name in method_rows for column in metrics.values()]
    lines = [
        convention_caption(convention),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for label in row_labels:
        cells = [label] + [
            _format_cell(rows.get(label, {}).get(metric), digits) for rows in method_rows.values() for metric in metrics
        ]
        lines.append("| " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_finding_tables(
    methods: Mapping[str, AggregateResult | RunSummary],
    output_dir: str | Path,
    metrics: Mapping[str, str] | None = None,
    stem: str = "findings",
    digits: int = 2,
    *,
    convention: MetricConvention | str,
) -> TablePaths:
    """Write the per-finding table of several methods as CSV, JSON and Markdown.

    Args:
        methods: Aggregate of one run or summary over runs per method, keyed by the column
            group's name (e.g. {"CXR-BERT LDM": ..., "+BBM": ...}), in column order.
        output_dir: Folder to write into; it is created.
        metrics: Metric key to column label, in column order; defaults to
            `PAPER_TABLE_METRICS`.
        stem: File name without suffix.
        digits: Decimals in the Markdown table.
        convention: Metric convention of every method's values (see `records_convention`).

    Returns:
        The three paths. The CSV contains numbers, with `<method>/<label> std` columns for
        summaries over runs, and a last `convention` column with the same value in every
        row. The JSON has a top-level `convention` key and also contains pair and NaN counts
        of single runs. The Markdown starts with a caption line that names the convention.

    Raises:
        ValueError: If `methods` is empty, `output_dir` is an existing file or `convention`
            is unknown.
    """
    if not methods:
        raise ValueError("write_finding_tables needs at least one method.")
    convention = MetricConvention(convention)
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"Output directory {output_dir} is an existing file; pass a folder path.")
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics = dict(metrics) if metrics is not None else dict(PAPER_TABLE_METRICS)

    method_rows = {name: _method_rows(result) for name, result in methods.items()}
    row_labels = _row_order(methods)
    for name, rows in method_rows.items():
        found = {metric for values in rows.values() for metric in values}
        absent = [metric for metric in metrics if metric not in found]
        if absent:
            logger.warning("Method %r has no values for %s; its cells read %r.", name, absent, MISSING_CELL)

    paths = TablePaths(output_dir / f"{stem}.csv", output_dir / f"{stem}.json", output_dir / f"{stem}.md")
    _write_csv_table(method_rows, row_labels, metrics, convention, paths.csv)
    _write_json_table(methods, method_rows, row_labels, metrics, convention, paths.json)
    _write_markdown_table(method_rows, row_labels, metrics, convention, digits, paths.markdown)
    logger.info("Wrote per-finding tables of %d methods (%s) to %s.", len(methods), convention.value, output_dir)
    return paths


def write_method_tables(
    records: Sequence[Mapping[str, Any]],
    output_dir: str | Path,
    method_key: str = "method",
    metrics: Mapping[str, str] | None = None,
    stem: str = "findings",
    digits: int = 2,
) -> TablePaths:
    """Group per-pair records by method, aggregate each group and write the per-finding tables.

    Args:
        records: Per-pair records of one run; each names its method under `method_key`, so
            one pair may appear once per method.
        output_dir: Folder to write into; it is created.
        method_key: Record key of the method name (e.g. "no BBM", "BBM bezier").
        metrics: Metric key to column label; defaults to `PAPER_TABLE_METRICS`.
        stem: File name without suffix.
        digits: Decimals in the Markdown table.

    Returns:
        The paths of `write_finding_tables`, with methods in first-seen order and the
        records' metric convention.

    Raises:
        KeyError: If a record has no `method_key`.
        ValueError: As `aggregate`, `records_convention` and `write_finding_tables`.
    """
    metrics = dict(metrics) if metrics is not None else dict(PAPER_TABLE_METRICS)
    grouped: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        if method_key not in record:
            raise KeyError(f"Record of pair {record.get(ID_KEY)!r} has no {method_key!r} naming its method.")
        grouped.setdefault(str(record[method_key]), []).append(record)

    convention = records_convention(records)

    # Only the table's metrics are aggregated, so string and list columns never reach `aggregate`.
    methods = {name: aggregate(rows, list(metrics)) for name, rows in grouped.items()}
    return write_finding_tables(methods, output_dir, metrics, stem, digits, convention=convention)
