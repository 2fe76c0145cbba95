"""Combine the grounding results of several runs (for example training seeds) into mean ± std tables.

    python -m grounding.combine_runs runs/cxrbert-seed4200/grounding/test-step030000 \\
        runs/cxrbert-seed1759/grounding/test-step030000 runs/cxrbert-seed6357/grounding/test-step030000 \\
        --output runs/cxrbert-seeds

Each folder must contain the ``pairs.csv`` that an evaluation writes. The output folder gets
``findings.{csv,json,md}`` with mean ± sample standard deviation over the runs for every finding
and average row, laid out like Table 1 of Generate to Ground (MIDL 2025), and
``findings_threshold_free.*`` with the threshold-free metrics. All runs must share one metric
convention (``gmm_miou`` or ``multi_threshold``), which the tables name.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd

from grounding.aggregation import aggregate, summarize_runs
from grounding.metrics import MetricConvention
from grounding.reporting import THRESHOLD_FREE_TABLE_METRICS, records_convention, write_finding_tables
from grounding.results import metric_keys

log = logging.getLogger(__name__)

# Methods shown side by side; the ablation rows of single runs are left out.
TABLE_METHODS = ("cross_attention", "bbm/bezier", "bbm/linear", "bbm/quadratic", "shuffled_caption", "image_bias", "center_prior")


def read_pairs(directory: Path) -> pd.DataFrame:
    """Read one run's ``pairs.csv``.

    Raises:
        FileNotFoundError: when the folder has no ``pairs.csv``.
    """
    path = directory / "pairs.csv"
    if not path.is_file():
        raise FileNotFoundError(f"No pairs.csv in {directory}; pass the folders that a grounding evaluation wrote.")
    return pd.read_csv(path)


def shared_convention(directories: list[Path], frames: list[pd.DataFrame]) -> MetricConvention:
    """Return the metric convention of the runs' ``pairs.csv`` files.

    Raises:
        ValueError: when a run's records lack a convention or mix two, or two runs differ,
            naming the folders and their conventions.
    """
    conventions = {
        directory: records_convention(frame.to_dict("records"), source=str(directory / "pairs.csv"))
        for directory, frame in zip(directories, frames)
    }
    if len(set(conventions.values())) > 1:
        listing = ", ".join(f"{directory}: {convention.value}" for directory, convention in conventions.items())
        raise ValueError(
            f"The runs were scored under different metric conventions ({listing}); mIoU and CNR are "
            "defined differently under each, so combine only runs of one convention."
        )
    return next(iter(conventions.values()))


def combine_runs(directories: list[Path], output: Path) -> Path:
    """Aggregate each run per method, then write mean ± std tables over the runs to ``output``.

    Raises:
        FileNotFoundError: when a folder has no ``pairs.csv``.
        ValueError: when fewer than two runs are given, a folder is given twice, the runs'
            metric conventions are missing or differ, or no method is shared by every run.
    """
    if len(directories) < 2:
        raise ValueError(f"Combining runs needs at least two result folders, got {len(directories)}.")
    resolved = [directory.resolve() for directory in directories]
    repeated = sorted({str(directory) for directory in directories if resolved.count(directory.resolve()) > 1})
    if repeated:
        raise ValueError(f"Result folders {repeated} are given more than once; each run must count once.")
    frames = [read_pairs(directory) for directory in directories]
    convention = shared_convention(directories, frames)
    # Evaluations name their folders <stage>-step<N> (val, test, untrained).
    stages = {directory.resolve().name.split("-step")[0] for directory in directories}
    if len(stages) > 1:
        log.warning("The runs come from different evaluations (%s); their spread is not a seed spread.", sorted(stages))

    shared = set.intersection(*(set(frame["method"]) for frame in frames))
    methods = [method for method in TABLE_METHODS if method in shared]
    if not methods:
        raise ValueError(f"The runs share none of the methods {TABLE_METHODS}; check that they come from one kind of evaluation.")
    partial = [method for method in TABLE_METHODS if method not in shared and any(method in set(frame["method"]) for frame in frames)]
    if partial:
        log.warning("Methods %s are missing from some runs and are left out of the combined tables.", partial)
    pair_sets = {frozenset(frame["pair_id"].astype(str)) for frame in frames}
    if len(pair_sets) > 1:
        log.warning(
            "The runs scored different pairs (%s pairs); their means cover different data.",
            " / ".join(str(frame["pair_id"].nunique()) for frame in frames),
        )

    keys = metric_keys()
    summaries = {}
    for method in methods:
        results = [aggregate(frame[frame["method"] == method].to_dict("records"), keys) for frame in frames]
        summaries[method] = summarize_runs(results)

    write_finding_tables(summaries, output, stem="findings", convention=convention)
    write_finding_tables(
        summaries, output, metrics=THRESHOLD_FREE_TABLE_METRICS, stem="findings_threshold_free", convention=convention
    )
    log.info("Combined %d runs of %d methods (%s) into %s", len(frames), len(methods), convention.value, output)
    return output


def main(argv: list[str] | None = None) -> None:
    """Parse the folders and the output folder from the command line and combine the runs."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="result folders, each with a pairs.csv")
    parser.add_argument("--output", type=Path, required=True, help="folder for the combined tables")
    arguments = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        combine_runs(arguments.runs, arguments.output)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(str(error)) from error


if __name__ == "__main__":
    main()
