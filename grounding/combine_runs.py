"""Combine the grounding results of several runs (for example training seeds) into mean ± std tables.

    python -m grounding.combine_runs runs/cxrbert-seed4200/grounding/test-step030000 \\
        runs/cxrbert-seed1759/grounding/test-step030000 runs/cxrbert-seed6357/grounding/test-step030000 \\
        --output runs/cxrbert-seeds

Each folder must contain the ``pairs.csv`` that an evaluation writes. The output folder gets
``findings.{csv,json,md}`` with mean ± sample standard deviation over the runs for every finding
and average row, laid out like Table 1 of Generate to Ground (MIDL 2025), and
``findings_threshold_free.*`` with the threshold-free metrics.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd

from grounding.aggregation import aggregate, summarize_runs
from grounding.reporting import THRESHOLD_FREE_TABLE_METRICS, write_finding_tables
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


def combine_runs(directories: list[Path], output: Path) -> Path:
    """Aggregate each run per method, then write mean ± std tables over the runs to ``output``.

    Raises:
        FileNotFoundError: when a folder has no ``pairs.csv``.
        ValueError: when fewer than two runs are given or no method is shared by every run.
    """
    if len(directories) < 2:
        raise ValueError(f"Combining runs needs at least two result folders, got {len(directories)}.")
    frames = [read_pairs(directory) for directory in directories]

    shared = set.intersection(*(set(frame["method"]) for frame in frames))
    methods = [method for method in TABLE_METHODS if method in shared]
    if not methods:
        raise ValueError(f"The runs share none of the methods {TABLE_METHODS}; check that they come from one kind of evaluation.")

    keys = metric_keys()
    summaries = {}
    for method in methods:
        results = [aggregate(frame[frame["method"] == method].to_dict("records"), keys) for frame in frames]
        summaries[method] = summarize_runs(results)

    write_finding_tables(summaries, output, stem="findings")
    write_finding_tables(summaries, output, metrics=THRESHOLD_FREE_TABLE_METRICS, stem="findings_threshold_free")
    log.info("Combined %d runs of %d methods into %s", len(frames), len(methods), output)
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
