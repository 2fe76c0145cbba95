"""Reduction of per-pair metrics to per-finding means and overall averages.

Three overall averages are reported, each with its own label, because they differ when the
findings have different numbers of pairs:

- `weighted`: the "Weighted Avg." of Generate to Ground (MIDL 2025), sum_i x_i n_c(i) /
  sum_i n_c(i), where n_c(i) is the number of pairs of pair i's finding. Each finding mean
  therefore counts with weight n_c squared.
- `pair_mean`: the plain mean over pairs (each finding mean weighted by n_c).
- `finding_mean`: the unweighted mean of the finding means.

NaN values (e.g. AUC-ROC and CNR of an empty or full-image ground truth) are left out of
every mean and counted. n_c counts the pairs of a finding with a defined value of that metric.
"""

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum, unique
from numbers import Real
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

ID_KEY = "pair_id"
FINDING_KEY = "finding"

# Row order of the MS-CXR findings in Generate to Ground's Table 1; other findings follow
# alphabetically.
MS_CXR_FINDINGS = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Lung Opacity",
    "Edema",
    "Pneumonia",
    "Pneumothorax",
    "Pleural Effusion",
)


@unique
class AggregateKind(str, Enum):
    """Overall average over all pairs."""

    WEIGHTED = "weighted"
    PAIR_MEAN = "pair_mean"
    FINDING_MEAN = "finding_mean"

    @property
    def label(self) -> str:
        """Row label for tables."""
        return {
            AggregateKind.WEIGHTED: "Weighted Avg. (pairs weighted by finding size)",
            AggregateKind.PAIR_MEAN: "Mean over pairs",
            AggregateKind.FINDING_MEAN: "Mean of finding means",
        }[self]


@dataclass(frozen=True)
class FindingSummary:
    """Means of one finding's pairs.

    Attributes:
        finding: Finding name as given in the records.
        n_pairs: Number of pairs after deduplication.
        means: Mean per metric over the pairs with a defined value (NaN when none).
        nan_counts: Number of NaN values per metric.
    """

    finding: str
    n_pairs: int
    means: dict[str, float]
    nan_counts: dict[str, int]


@dataclass(frozen=True)
class AggregateResult:
    """Per-finding means and overall averages of one run.

    Attributes:
        metric_names: Metrics that were aggregated.
        findings: Summary per finding, in `MS_CXR_FINDINGS` order, then alphabetical.
        overall: Value per `AggregateKind` and metric.
        nan_counts: Number of NaN values per metric over all pairs.
        n_pairs: Number of pairs after deduplication.
        duplicates_dropped: Number of identical duplicate records that were dropped.
    """

    metric_names: tuple[str, ...]
    findings: dict[str, FindingSummary]
    overall: dict[AggregateKind, dict[str, float]]
    nan_counts: dict[str, int]
    n_pairs: int
    duplicates_dropped: int

    def rows(self) -> dict[str, dict[str, float]]:
        """Return table rows: each finding's means, then the overall averages by label."""
        table = {name: dict(summary.means) for name, summary in self.findings.items()}
        for kind, values in self.overall.items():
            table[kind.label] = dict(values)
        return table


@dataclass(frozen=True)
class MeanStd:
    """Mean and standard deviation of one value over runs (e.g. training seeds)."""

    mean: float
    std: float
    n_runs: int

    def format(self, digits: int = 2) -> str:
        """Format as `0.54±.00`, the style of Generate to Ground's tables; one run gives the mean alone."""
        return format_mean_std(self.mean, self.std, digits)


@dataclass(frozen=True)
class RunSummary:
    """Mean ± standard deviation over runs of every row and metric of `AggregateResult.rows`."""

    metric_names: tuple[str, ...]
    rows: dict[str, dict[str, MeanStd]]
    n_runs: int


def format_mean_std(mean: float, std: float, digits: int = 2) -> str:
    """Format a mean and standard deviation as `0.54±.00`; a NaN std gives the mean alone."""
    if math.isnan(mean):
        return "nan"
    text = f"{mean:.{digits}f}"
    if math.isnan(std):
        return text
    std_text = f"{std:.{digits}f}"
    if std_text.startswith("0."):
        std_text = std_text[1:]
    return f"{text}±{std_text}"


def _as_dict(record: Mapping[str, Any] | Any) -> dict[str, Any]:
    if isinstance(record, Mapping):
        return dict(record)
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        return dataclasses.asdict(record)
    raise TypeError(f"A record must be a mapping or a dataclass instance, got {type(record).__name__}.")


def _same_value(first: Any, second: Any) -> bool:
    if isinstance(first, float) and isinstance(second, float) and math.isnan(first) and math.isnan(second):
        return True
    return bool(first == second)


def deduplicate_records(records: Sequence[Mapping[str, Any] | Any]) -> tuple[list[dict[str, Any]], int]:
    """Drop repeated records of one pair, as distributed samplers pad the last batch with repeats.

    Args:
        records: Per-pair records (mappings or dataclasses) with a `pair_id` key.

    Returns:
        The records in first-seen order, one per pair id, and the number dropped.

    Raises:
        KeyError: If a record has no `pair_id`.
        ValueError: If two records of one pair id differ (NaN equals NaN here), naming the
            pair id and the keys that differ.
    """
    unique_records: dict[Any, dict[str, Any]] = {}
    dropped = 0
    for record in records:
        row = _as_dict(record)
        if ID_KEY not in row:
            raise KeyError(f"Record {row} has no {ID_KEY!r}; every record must name its pair.")
        pair_id = row[ID_KEY]
        if pair_id not in unique_records:
            unique_records[pair_id] = row
            continue

        first_record = unique_records[pair_id]
        differing = sorted(
            key
            for key in set(first_record) | set(row)
            if key not in first_record or key not in row or not _same_value(first_record[key], row[key])
        )
        if differing:
            raise ValueError(
                f"Pair {pair_id!r} has two records that differ in {differing}; "
                "a duplicate from distributed padding must be identical, so check the pair ids."
            )
        dropped += 1
    if dropped:
        logger.info("Dropped %d duplicate records of %d pairs.", dropped, len(unique_records))
    return list(unique_records.values()), dropped


def _infer_metric_names(rows: list[dict[str, Any]]) -> tuple[str, ...]:
    names: dict[str, None] = {}
    for row in rows:
        for key, value in row.items():
            if key in (ID_KEY, FINDING_KEY) or isinstance(value, (bool, np.bool_)):
                continue
            if isinstance(value, Real):
                names[key] = None
    return tuple(names)


def _metric_value(row: dict[str, Any], name: str) -> float:
    value = row.get(name, float("nan"))
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Real):
        raise ValueError(f"Metric {name!r} of pair {row.get(ID_KEY)!r} is {value!r}, not a number.")
    return float(value)


def _finding_order(findings: set[str]) -> list[str]:
    known = [finding for finding in MS_CXR_FINDINGS if finding in findings]
    return known + sorted(findings - set(known))


def aggregate(records: Sequence[Mapping[str, Any] | Any], metric_names: Sequence[str] | None = None) -> AggregateResult:
    """Compute per-finding means and the three overall averages of per-pair metrics.

    Args:
        records: Per-pair records (mappings or dataclasses) with `pair_id`, `finding` and
            numeric metric values. Identical duplicates are dropped.
        metric_names: Metrics to aggregate; by default every numeric, non-boolean key other
            than `pair_id` and `finding`. A record without a metric counts as NaN.

    Returns:
        The aggregate, with NaN counts per finding and overall.

    Raises:
        ValueError: If there are no records, duplicates conflict, or a metric is not numeric.
        KeyError: If a record has no `pair_id` or `finding`.
    """
    rows, dropped = deduplicate_records(records)
    if not rows:
        raise ValueError("No per-pair records to aggregate; check that the evaluation scored any pair.")
    for row in rows:
        if FINDING_KEY not in row:
            raise KeyError(f"Record of pair {row[ID_KEY]!r} has no {FINDING_KEY!r}.")
    names = tuple(metric_names) if metric_names is not None else _infer_metric_names(rows)

    # One column of values per metric, and the finding of each row.
    findings = np.array([str(row[FINDING_KEY]) for row in rows])
    values = {name: np.array([_metric_value(row, name) for row in rows]) for name in names}

    # Per-finding means over the defined values.
    summaries: dict[str, FindingSummary] = {}
    for finding in _finding_order(set(findings.tolist())):
        in_finding = findings == finding
        means: dict[str, float] = {}
        nan_counts: dict[str, int] = {}
        for name in names:
            finding_values = values[name][in_finding]
            defined = finding_values[~np.isnan(finding_values)]
            means[name] = float(defined.mean()) if defined.size else float("nan")
            nan_counts[name] = int(finding_values.size - defined.size)
        summaries[finding] = FindingSummary(finding, int(in_finding.sum()), means, nan_counts)

    # Overall averages; n_c counts the defined values of the metric in each finding.
    overall: dict[AggregateKind, dict[str, float]] = {kind: {} for kind in AggregateKind}
    for name in names:
        counts = np.array([summaries[finding].n_pairs - summaries[finding].nan_counts[name] for finding in summaries])
        means = np.array([summaries[finding].means[name] for finding in summaries])
        present = counts > 0
        if not present.any():
            for kind in AggregateKind:
                overall[kind][name] = float("nan")
            continue
        counts, means = counts[present], means[present]
        overall[AggregateKind.WEIGHTED][name] = float((counts**2 * means).sum() / (counts**2).sum())
        overall[AggregateKind.PAIR_MEAN][name] = float((counts * means).sum() / counts.sum())
        overall[AggregateKind.FINDING_MEAN][name] = float(means.mean())

    total_nans = {name: int(np.isnan(values[name]).sum()) for name in names}
    return AggregateResult(names, summaries, overall, total_nans, len(rows), dropped)


def summarize_runs(results: Sequence[AggregateResult], ddof: int = 1) -> RunSummary:
    """Combine the aggregates of several runs (e.g. seeds) into mean ± standard deviation.

    Args:
        results: One aggregate per run.
        ddof: Delta degrees of freedom of the standard deviation; 1 gives the sample
            standard deviation, so one run has a NaN std.

    Returns:
        Mean and std over the runs with a defined value, per row and metric of
        `AggregateResult.rows`. A row or metric missing from a run counts as undefined there.

    Raises:
        ValueError: If `results` is empty.
    """
    if not results:
        raise ValueError("summarize_runs needs at least one aggregate.")

    metric_names = tuple(dict.fromkeys(name for result in results for name in result.metric_names))
    run_rows = [result.rows() for result in results]
    row_labels = list(dict.fromkeys(label for rows in run_rows for label in rows))

    summary: dict[str, dict[str, MeanStd]] = {}
    for label in row_labels:
        summary[label] = {}
        for name in metric_names:
            samples = np.array([rows.get(label, {}).get(name, float("nan")) for rows in run_rows], dtype=float)
            defined = samples[~np.isnan(samples)]
            mean = float(defined.mean()) if defined.size else float("nan")
            std = float(defined.std(ddof=ddof)) if defined.size > ddof else float("nan")
            summary[label][name] = MeanStd(mean, std, int(defined.size))
    return RunSummary(metric_names, summary, len(results))
