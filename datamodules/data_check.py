"""Check the configured data sets without training and print a JSON summary.

Usage::

    python -m datamodules.data_check --config configs/cxrbert.yaml [--config more.yaml] \\
        [--data.init_args.ms_cxr_csv=/path/MS_CXR_Local_Alignment_v1.1.0.csv] \\
        [--decode grounding] [--max-train-images 1000]

The command reads the ``data`` section of LightningCLI-style YAML files (``data.class_path`` and
``data.init_args``) and resolves OmegaConf interpolations. It builds the data module and its pair
lists, and writes the demo phantoms when ``demo`` is on, but never builds the latent cache. It
then decodes the chosen images and prints pairs kept and skipped, pairs excluded by the leakage
guard, grounding pairs per finding, boxes, flagged pairs and unreadable images. Overrides take
the form ``--data.init_args.<name>=<value>`` (with ``=``).
"""

import argparse
import importlib
import json
import logging
import random
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from enum import Enum, unique
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from datamodules.datamodule import CXRDataModule
from datamodules.image_io import ImageDecodeError, read_grayscale
from datamodules.mimic_cxr import CHEXPERT_FILE
from datamodules.ms_cxr import GroundingReadResult

logger = logging.getLogger(__name__)

MAX_LISTED_IDS = 20


@unique
class DecodeScope(str, Enum):
    """Images that the check decodes."""

    NONE = "none"
    GROUNDING = "grounding"
    ALL = "all"


def load_data_config(config_paths: list[str], overrides: list[str]) -> dict[str, Any]:
    """Merge YAML files and ``--data.init_args.key=value`` overrides; return the resolved ``data`` section.

    Raises:
        ValueError: No file has a ``data`` section with a ``class_path``, or an override does
            not start with ``data.``.
    """
    merged = OmegaConf.create()
    for path in config_paths:
        merged = OmegaConf.merge(merged, OmegaConf.load(path))

    dotlist = []
    for override in overrides:
        key = override.removeprefix("--")
        if not key.startswith("data."):
            raise ValueError(f"Override {override!r} is not in the data section; use --data.init_args.<name>=<value>.")
        dotlist.append(key)
    merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(dotlist))

    if "data" not in merged or "class_path" not in merged.data:
        raise ValueError(f"No data.class_path in {config_paths}; the config needs a LightningCLI data section.")
    # Resolving only the data section leaves custom resolvers of other sections untouched.
    return OmegaConf.to_container(merged.data, resolve=True)


def build_datamodule(data_config: dict[str, Any]) -> CXRDataModule:
    """Import ``class_path`` and instantiate it with ``init_args``.

    Raises:
        TypeError: The class is not a `CXRDataModule`.
    """
    module_name, _, class_name = data_config["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, CXRDataModule)):
        raise TypeError(f"data.class_path {data_config['class_path']} is not a CXRDataModule.")
    return cls(**(data_config.get("init_args") or {}))


def summarize_grounding(result: GroundingReadResult | None) -> dict[str, Any] | None:
    """Summarize one grounding read: pairs per finding, boxes, skipped rows and flagged pairs."""
    if result is None:
        return None
    flagged = result.flagged_pairs()
    return {
        "source": result.source,
        "pairs": len(result.pairs),
        "pairs_per_finding": result.pairs_per_finding(),
        "boxes": sum(len(pair.boxes) for pair in result.pairs),
        "multi_box_pairs": sum(len(pair.boxes) > 1 for pair in result.pairs),
        "skipped_rows": dict(result.skipped_rows),
        "clipped_boxes": result.clipped_boxes,
        "flagged_pairs": len(flagged),
        "flagged_pair_ids": flagged[:MAX_LISTED_IDS],
        "warnings": result.warnings,
    }


def count_chexpert_positives(datamodule: CXRDataModule, pairs: pd.DataFrame) -> dict[str, int] | None:
    """Count the training studies with a positive (1.0) CheXpert label, per label.

    Returns None when ``mimic-cxr-2.0.0-chexpert.csv.gz`` is not next to the split CSV.
    """
    path = datamodule.image_root / CHEXPERT_FILE
    if datamodule.train_csv is not None or not path.is_file():
        return None

    labels = pd.read_csv(path, dtype=str, keep_default_na=False)
    studies = set(zip(pairs["subject_id"], pairs["study_id"]))
    kept = labels[[key in studies for key in zip(labels["subject_id"], labels["study_id"])]]
    columns = [name for name in labels.columns if name not in ("subject_id", "study_id")]
    return {name: int((pd.to_numeric(kept[name], errors="coerce") == 1.0).sum()) for name in columns}


def check_images(paths: list[str], workers: int) -> dict[str, Any]:
    """Decode every image and count the unreadable ones per reason."""
    reasons: Counter = Counter()
    examples: list[dict[str, str]] = []

    def decode(path: str) -> tuple[str, str | None]:
        try:
            read_grayscale(path)
        except ImageDecodeError as error:
            return path, error.reason
        return path, None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as executor:
        for path, reason in executor.map(decode, paths):
            if reason is None:
                continue
            reasons[reason] += 1
            if len(examples) < MAX_LISTED_IDS:
                examples.append({"path": path, "reason": reason})

    return {"checked": len(paths), "unreadable": sum(reasons.values()), "reasons": dict(reasons), "examples": examples}


def run_check(datamodule: CXRDataModule, decode: DecodeScope, max_train_images: int | None, workers: int) -> dict[str, Any]:
    """Read every configured data set of `datamodule` and return the summary dict."""
    datamodule.check_paths()
    if datamodule.hparams.demo:
        datamodule.write_demo_data()

    pairs, stats = datamodule.train_pair_list()
    grounding = {stage: datamodule.read_grounding(stage) for stage in ("val", "test")}
    summary: dict[str, Any] = {
        "training": {
            "source": str(datamodule.train_csv) if datamodule.train_csv else str(datamodule.image_root),
            "pair_list": str(datamodule.pair_list_path()),
            "pairs_kept": stats.kept,
            "candidates": stats.candidates,
            "pairs_skipped": stats.skipped,
            "leakage_guard": stats.leakage_guard,
            "excluded_by_leakage_guard": stats.excluded_by_leakage_guard,
            "excluded_subjects": stats.excluded_subjects,
            "chexpert_positive_studies": count_chexpert_positives(datamodule, pairs),
        },
        "grounding": {
            "source": datamodule.grounding_source.value,
            **{stage: summarize_grounding(result) for stage, result in grounding.items()},
        },
    }

    paths: list[str] = []
    if decode is not DecodeScope.NONE:
        paths += sorted({pair.image_path for result in grounding.values() if result for pair in result.pairs})
    if decode is DecodeScope.ALL:
        train_paths = list(pairs["image_path"])
        if max_train_images is not None and len(train_paths) > max_train_images:
            train_paths = random.Random(0).sample(train_paths, max_train_images)
        paths += train_paths
    summary["images"] = check_images(paths, workers)
    return summary


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the check and print the JSON summary to stdout."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", required=True, help="LightningCLI YAML file; repeat to merge several.")
    parser.add_argument(
        "--decode",
        choices=[scope.value for scope in DecodeScope],
        default=DecodeScope.GROUNDING.value,
        help="Images to decode: none, the grounding images, or those plus training images.",
    )
    parser.add_argument(
        "--max-train-images",
        type=int,
        default=1000,
        help="With --decode all, decode a seeded random sample of this many training images; -1 decodes all.",
    )
    parser.add_argument("--workers", type=int, default=4, help="Decoding threads.")
    parser.add_argument("--verbose", action="store_true", help="Log at INFO level to stderr.")
    arguments, overrides = parser.parse_known_args(argv)

    logging.basicConfig(level=logging.INFO if arguments.verbose else logging.WARNING, stream=sys.stderr)
    unknown = [item for item in overrides if not item.startswith("--data.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (overrides must look like --data.init_args.<name>=<value>)")

    max_train_images = None if arguments.max_train_images < 0 else arguments.max_train_images
    try:
        data_config = load_data_config(arguments.config, overrides)
        datamodule = build_datamodule(data_config)
        summary = run_check(datamodule, DecodeScope(arguments.decode), max_train_images, arguments.workers)
    except (FileNotFoundError, ValueError, TypeError, ImportError, AttributeError) as error:
        # Configuration and data errors already name the path or key; a traceback adds nothing.
        parser.exit(2, f"data_check: error: {error}\n")
    summary["data"] = data_config
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
