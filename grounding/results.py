"""Summaries of an evaluation's per-pair records, grouped by method, and the result files."""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from grounding.aggregation import AggregateKind, AggregateResult, aggregate, deduplicate_records
from grounding.metrics import METRIC_NAMES, EmptyMaskPolicy, MetricConvention
from grounding.pipeline import MAIN_METHOD
from grounding.reporting import (
    CONVENTION_KEY,
    THRESHOLD_FREE_TABLE_METRICS,
    records_convention,
    write_method_tables,
    write_pair_csv,
)

log = logging.getLogger(__name__)

# The convention of Generate to Ground (MIDL 2025): every metric 0 for an empty mask, and its
# weighted average as the headline.
HEADLINE_POLICY = EmptyMaskPolicy.ZERO_ALL
HEADLINE_AGGREGATE = AggregateKind.WEIGHTED
HEADLINE_METRICS = ("miou", "cnr", "top1", "auc_roc")
# Methods that vary one setting of the main map; they get their own table.
ABLATION_PREFIXES = ("tokens/", "window/", "layers/")


def metric_keys() -> list[str]:
    """Record keys of every metric under both empty-mask policies."""
    return [f"{policy.value}/{name}" for policy in EmptyMaskPolicy for name in METRIC_NAMES]


def issue_counts(records: list[dict[str, Any]]) -> dict[str, int]:
    """Count the pairs that carry each issue flag (e.g. `empty_gt`), by flag name in sorted order.

    Args:
        records: Per-pair records whose `issues` value is a `;`-separated string (as written
            by `PairScores.as_record`) or a list of flags. Other values, such as the NaN that
            an empty CSV cell reads back as, count as no issue.
    """
    counts: dict[str, int] = {}
    for record in records:
        issues = record.get("issues")
        if isinstance(issues, str):
            issues = issues.split(";")
        if not isinstance(issues, (list, tuple)):
            continue
        for issue in issues:
            if issue:
                counts[issue] = counts.get(issue, 0) + 1
    return dict(sorted(counts.items()))


def _method_summary(result: AggregateResult, convention: MetricConvention, issues: dict[str, int]) -> dict[str, Any]:
    headline = result.overall[HEADLINE_AGGREGATE]
    overall: dict[str, Any] = {name: headline[f"{HEADLINE_POLICY.value}/{name}"] for name in METRIC_NAMES}
    overall["policy"] = HEADLINE_POLICY.value
    overall["aggregate"] = HEADLINE_AGGREGATE.value
    overall[CONVENTION_KEY] = convention.value
    overall["num_pairs"] = result.n_pairs
    return {
        "overall": overall,
        "aggregates": {kind.value: dict(values) for kind, values in result.overall.items()},
        "per_finding": {
            finding: {
                "num_pairs": summary.n_pairs,
                **{name: summary.means[f"{HEADLINE_POLICY.value}/{name}"] for name in METRIC_NAMES},
                **{key: value for key, value in summary.means.items()},
            }
            for finding, summary in result.findings.items()
        },
        "nan_counts": dict(result.nan_counts),
        "issue_counts": issues,
    }


def summarize_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate per-pair records per method.

    Every method's ``overall`` contains the headline numbers: the weighted average of Generate to Ground (MIDL 2025)
    (pairs weighted by their finding's size) under its empty-mask convention (all
    metrics 0 when the mask is empty), with the ``policy``, ``aggregate`` and metric
    ``convention`` that produced them. ``aggregates`` adds the plain mean over pairs and the mean
    of the finding means, under both conventions; ``per_finding`` has the finding means;
    ``nan_counts`` counts undefined values per metric key and ``issue_counts`` counts pairs
    per issue flag (e.g. ``empty_gt``). The top-level ``convention`` is the metric convention
    (``gmm_miou`` or ``multi_threshold``) of every record.

    Raises:
        ValueError: when ``records`` is empty, the records lack a metric convention or mix
            two, or two records of one pair and method differ.
    """
    if not records:
        raise ValueError("No per-pair records to summarize; check that the evaluation scored any pair.")
    convention = records_convention(records)
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_method[record["method"]].append(record)

    keys = metric_keys()
    methods = {}
    for method, rows in by_method.items():
        unique_rows, _ = deduplicate_records(rows)
        methods[method] = _method_summary(aggregate(rows, keys), convention, issue_counts(unique_rows))
    flagged = sum(1 for record in records if record.get("mask_flag", "ok") != "ok")
    num_pairs = max(summary["overall"]["num_pairs"] for summary in methods.values())
    return {
        CONVENTION_KEY: convention.value,
        "num_pairs": num_pairs,
        "maps_with_mask_flags": flagged,
        "methods": methods,
    }


def strict_json(value: Any) -> str:
    """Serialize ``value`` as indented JSON, with NaN and infinite floats written as null.

    Python's default writes bare ``NaN``, which strict JSON parsers (``jq``, browsers) reject.
    """

    def clean(item: Any) -> Any:
        if isinstance(item, float) and not math.isfinite(item):
            return None
        if isinstance(item, dict):
            return {key: clean(entry) for key, entry in item.items()}
        if isinstance(item, (list, tuple)):
            return [clean(entry) for entry in item]
        return item

    return json.dumps(clean(value), indent=2, default=str, allow_nan=False)


def _is_ablation(method: str) -> bool:
    return method.startswith(ABLATION_PREFIXES)


def write_results(records: list[dict[str, Any]], summary: dict[str, Any], directory: str | Path) -> Path:
    """Write the result files of one evaluation to ``directory``.

    Files: ``pairs.csv`` (one row per pair and method), ``summary.json``, and per-finding tables
    as CSV, JSON and Markdown laid out like Table 1 of Generate to Ground: ``findings.*`` (the main map,
    BBM and the controls side by side, its conventions), ``findings_threshold_free.*``
    (the same with threshold-free metrics kept for empty masks) and ``ablations.*`` (token
    strategies, timestep windows and layer subsets). Every file names the records' metric convention.

    Raises:
        ValueError: when the records lack a metric convention or mix two, or ``summary`` names
            another convention than the records.
    """
    # Checked before any file is written, so a rejected call leaves no partial results.
    convention = records_convention(records).value
    if summary.get(CONVENTION_KEY, convention) != convention:
        raise ValueError(
            f"The summary names metric convention {summary[CONVENTION_KEY]!r} but the records were scored "
            f"under {convention!r}; summarize these records with summarize_records."
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_pair_csv(records, directory / "pairs.csv")
    summary = {CONVENTION_KEY: convention, **summary}
    (directory / "summary.json").write_text(strict_json(summary))

    main_records = [record for record in records if not _is_ablation(record["method"])]
    ablation_records = [record for record in records if _is_ablation(record["method"]) or record["method"] == MAIN_METHOD]
    write_method_tables(main_records, directory, stem="findings")
    write_method_tables(main_records, directory, metrics=THRESHOLD_FREE_TABLE_METRICS, stem="findings_threshold_free")
    if any(_is_ablation(record["method"]) for record in records):
        write_method_tables(ablation_records, directory, stem="ablations")
    return directory
