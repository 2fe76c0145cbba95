"""Synthetic chest radiograph phantoms written in the MIMIC-CXR-JPG and MS-CXR file formats.

The demo trains and evaluates on these files through the same readers as real data, so the
generator writes exactly the published layouts:

- ``files/p<2 digits>/p<subject_id>/s<study_id>/<dicom_id>.jpg``: 8-bit grayscale JPEG images,
- ``files/p<2 digits>/p<subject_id>/s<study_id>.txt``: free-text reports with ``FINDINGS:`` and
  ``IMPRESSION:`` sections,
- ``mimic-cxr-2.0.0-split.csv.gz`` and ``mimic-cxr-2.0.0-metadata.csv.gz``,
- ``MS_CXR_Local_Alignment_v1.1.0.csv``: one row per bounding box of a grounding pair.

Each frontal phantom shows dark lungs, a bright mediastinum and heart, ribs and clavicles, and
zero to ``max_findings_per_image`` findings whose true boxes are known. Captions follow the
radiological convention: the patient's right side is on the image's left. Everything is
deterministic given ``PhantomConfig.seed``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from datamodules.phantom_drawing import render_frontal_phantom, render_lateral_phantom
from datamodules.phantom_findings import (
    NORMAL_FINDINGS,
    NORMAL_IMPRESSIONS,
    caption_for,
    report_text,
    sample_finding_specs,
)

logger = logging.getLogger(__name__)

SPLIT_FILE_NAME = "mimic-cxr-2.0.0-split.csv.gz"
METADATA_FILE_NAME = "mimic-cxr-2.0.0-metadata.csv.gz"
MS_CXR_FILE_NAME = "MS_CXR_Local_Alignment_v1.1.0.csv"
MARKER_FILE_NAME = ".phantom-dataset.json"

# Bump when the drawing or the file layout changes, so that cached data sets are regenerated.
GENERATOR_VERSION = 2

METADATA_COLUMNS = [
    "dicom_id",
    "subject_id",
    "study_id",
    "PerformedProcedureStepDescription",
    "ViewPosition",
    "Rows",
    "Columns",
    "StudyDate",
    "StudyTime",
    "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
]
MS_CXR_COLUMNS = [
    "dicom_id",
    "category_name",
    "label_text",
    "path",
    "x",
    "y",
    "w",
    "h",
    "image_width",
    "image_height",
    "split",
]

@dataclass
class PhantomConfig:
    """Sizes and finding mix of a phantom data set.

    Attributes:
        num_train: Frontal studies in the MIMIC-CXR ``train`` split.
        num_validate: Frontal studies in the ``validate`` split; their findings become MS-CXR
            pairs with split ``val``.
        num_test: Frontal studies in the ``test`` split; their findings become MS-CXR pairs
            with split ``test``.
        seed: Seed of every random choice; the same config always writes the same files.
        normal_fraction: Fraction of training studies without findings, in [0, 1].
        two_finding_fraction: Fraction of abnormal studies with two findings in different
            places, in [0, 1]. Held-out studies always have ``max_findings_per_image``
            findings, so that the phrase, not the image alone, picks out the region.
        max_findings_per_image: 1 or 2.
        lateral_fraction: Fraction of studies that also get a lateral view, which readers
            must filter out, in [0, 1].
        min_side_pixels: Smallest side of a written image, in pixels.
        max_side_pixels: Largest side of a written image, in pixels.
        max_aspect_ratio: Largest ratio of the long side to the short side, at least 1.
        jpeg_quality: JPEG quality of the written images, 1 to 95.
    """

    num_train: int = 2000
    num_validate: int = 48
    num_test: int = 96
    seed: int = 0
    normal_fraction: float = 0.1
    two_finding_fraction: float = 0.5
    max_findings_per_image: int = 2
    lateral_fraction: float = 0.1
    min_side_pixels: int = 224
    max_side_pixels: int = 320
    max_aspect_ratio: float = 1.25
    jpeg_quality: int = 92

    def __post_init__(self) -> None:
        for name in ("num_train", "num_validate", "num_test"):
            if getattr(self, name) < 0:
                raise ValueError(f"PhantomConfig.{name} must be >= 0, got {getattr(self, name)}.")
        for name in ("normal_fraction", "two_finding_fraction", "lateral_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"PhantomConfig.{name} must be in [0, 1], got {getattr(self, name)}.")
        if self.max_findings_per_image not in (1, 2):
            raise ValueError(
                f"PhantomConfig.max_findings_per_image must be 1 or 2, got {self.max_findings_per_image}."
            )
        if not 32 <= self.min_side_pixels <= self.max_side_pixels:
            raise ValueError(
                "PhantomConfig needs 32 <= min_side_pixels <= max_side_pixels, got "
                f"{self.min_side_pixels} and {self.max_side_pixels}."
            )
        if self.max_aspect_ratio < 1.0:
            raise ValueError(f"PhantomConfig.max_aspect_ratio must be >= 1, got {self.max_aspect_ratio}.")
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"PhantomConfig.jpeg_quality must be in [1, 95], got {self.jpeg_quality}.")

def _sentence(phrase: str) -> str:
    return phrase[0].upper() + phrase[1:] + "."


def _mimic_dicom_id(rng: np.random.Generator) -> str:
    """Return an id shaped like MIMIC-CXR's: five groups of eight hex digits joined by dashes."""
    return "-".join(f"{int(rng.integers(0, 2**32)):08x}" for _ in range(5))


def _image_size(config: PhantomConfig, rng: np.random.Generator) -> tuple[int, int]:
    """Draw a (width, height) in portrait or landscape within the configured limits."""
    short_side = int(rng.integers(config.min_side_pixels, config.max_side_pixels + 1))
    long_side = min(int(round(short_side * rng.uniform(1.0, config.max_aspect_ratio))), config.max_side_pixels)
    long_side = max(long_side, short_side)
    if rng.random() < 0.5:
        return short_side, long_side
    return long_side, short_side


@dataclass
class _Tables:
    split_rows: list[dict[str, object]] = dataclasses.field(default_factory=list)
    metadata_rows: list[dict[str, object]] = dataclasses.field(default_factory=list)
    ms_cxr_rows: list[dict[str, object]] = dataclasses.field(default_factory=list)


_MS_CXR_SPLITS = {"validate": "val", "test": "test"}
_MAX_DRAW_ATTEMPTS = 10

# A fixed gzip header time keeps the compressed tables byte-identical between runs.
_GZIP_OPTIONS = {"method": "gzip", "mtime": 0}


def _write_study(
    directory: Path,
    config: PhantomConfig,
    split: str,
    subject_id: int,
    study_id: int,
    study_index: int,
    tables: _Tables,
) -> None:
    """Render one study (frontal view, maybe a lateral view, report) and add its table rows."""
    rng = np.random.default_rng([config.seed, study_index])

    # Findings: held-out studies always carry the maximum, so each pair has a distractor.
    if split != "train":
        num_findings = config.max_findings_per_image
    elif rng.random() < config.normal_fraction:
        num_findings = 0
    elif config.max_findings_per_image == 2 and rng.random() < config.two_finding_fraction:
        num_findings = 2
    else:
        num_findings = 1

    # Frontal image. A finding that the heart hides completely has no box, so such a draw is
    # replaced by a new one. The retries draw from the study's own rng, so they are deterministic.
    width, height = _image_size(config, rng)
    for attempt in range(_MAX_DRAW_ATTEMPTS):
        specs = sample_finding_specs(rng, num_findings)
        try:
            pixels, boxes_per_spec = render_frontal_phantom(specs, width, height, rng)
            break
        except ValueError as error:
            if attempt == _MAX_DRAW_ATTEMPTS - 1:
                raise
            logger.debug("Redrawing study %d: %s", study_index, error)
    phrases = [caption_for(spec, rng) for spec in specs]
    study_directory = directory / "files" / f"p{str(subject_id)[:2]}" / f"p{subject_id}" / f"s{study_id}"
    study_directory.mkdir(parents=True, exist_ok=True)
    frontal_id = _mimic_dicom_id(rng)
    Image.fromarray(pixels).save(study_directory / f"{frontal_id}.jpg", quality=config.jpeg_quality)

    # Optional lateral view, which readers of frontal images must skip.
    has_lateral = rng.random() < config.lateral_fraction
    view_position = "PA" if has_lateral or rng.random() < 0.6 else "AP"
    examination = "CHEST (PA AND LAT)" if has_lateral else f"CHEST ({'PA' if view_position == 'PA' else 'PORTABLE AP'})"
    study_date = 21000101 + int(rng.integers(0, 80)) * 10000 + int(rng.integers(0, 12)) * 100 + int(rng.integers(0, 28))
    study_time = round(float(rng.uniform(0, 235959)), 3)
    images = [(frontal_id, view_position, width, height)]
    if has_lateral:
        lateral_width, lateral_height = _image_size(config, rng)
        lateral_id = _mimic_dicom_id(rng)
        lateral = render_lateral_phantom(lateral_width, lateral_height, rng)
        Image.fromarray(lateral).save(study_directory / f"{lateral_id}.jpg", quality=config.jpeg_quality)
        images.append((lateral_id, "LATERAL", lateral_width, lateral_height))

    # Report: findings as sentences, impression as the caption the model trains on.
    if specs:
        order = rng.permutation(len(specs))
        findings_text = " ".join(_sentence(phrases[index]) for index in order) + " No other acute findings."
        impression_text = " ".join(_sentence(phrases[index]) for index in order)
    else:
        findings_text = str(rng.choice(NORMAL_FINDINGS))
        impression_text = str(rng.choice(NORMAL_IMPRESSIONS))
    report = report_text(findings_text, impression_text, examination)
    (study_directory.parent / f"s{study_id}.txt").write_text(report, encoding="utf-8")

    # Table rows.
    view_meanings = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral"}
    for dicom_id, view, image_width, image_height in images:
        tables.split_rows.append(
            {"dicom_id": dicom_id, "study_id": study_id, "subject_id": subject_id, "split": split}
        )
        tables.metadata_rows.append(
            {
                "dicom_id": dicom_id,
                "subject_id": subject_id,
                "study_id": study_id,
                "PerformedProcedureStepDescription": examination,
                "ViewPosition": view,
                "Rows": image_height,
                "Columns": image_width,
                "StudyDate": study_date,
                "StudyTime": study_time,
                "ProcedureCodeSequence_CodeMeaning": examination,
                "ViewCodeSequence_CodeMeaning": view_meanings[view],
                "PatientOrientationCodeSequence_CodeMeaning": "Erect" if view != "AP" else "Recumbent",
            }
        )
    if split in _MS_CXR_SPLITS:
        relative_path = study_directory.relative_to(directory) / f"{frontal_id}.dcm"
        for spec, phrase, boxes in zip(specs, phrases, boxes_per_spec, strict=True):
            for x, y, box_width, box_height in boxes:
                tables.ms_cxr_rows.append(
                    {
                        "dicom_id": frontal_id,
                        "category_name": spec.category.value,
                        "label_text": phrase,
                        "path": relative_path.as_posix(),
                        "x": x,
                        "y": y,
                        "w": box_width,
                        "h": box_height,
                        "image_width": width,
                        "image_height": height,
                        "split": _MS_CXR_SPLITS[split],
                    }
                )


def _generate(directory: Path, config: PhantomConfig) -> None:
    """Write the whole data set into an empty ``directory``."""
    rng = np.random.default_rng(config.seed)
    split_sizes = {"train": config.num_train, "validate": config.num_validate, "test": config.num_test}
    total = sum(split_sizes.values())

    # Unique 8-digit ids: subjects start with 1, studies with 5. A subject has one or two
    # studies, all in one split, so held-out subjects never appear in training.
    subject_ids = rng.choice(10_000_000, size=max(total, 1), replace=False) + 10_000_000
    study_ids = rng.choice(10_000_000, size=max(total, 1), replace=False) + 50_000_000
    tables = _Tables()
    study_index = 0
    subject_index = 0
    for split, size in split_sizes.items():
        written = 0
        while written < size:
            subject_id = int(subject_ids[subject_index])
            subject_index += 1
            for _ in range(min(int(rng.integers(1, 3)), size - written)):
                _write_study(directory, config, split, subject_id, int(study_ids[study_index]), study_index, tables)
                study_index += 1
                written += 1
        logger.info("Wrote %d %s phantom studies to %s", size, split, directory)

    pd.DataFrame(tables.split_rows, columns=["dicom_id", "study_id", "subject_id", "split"]).to_csv(
        directory / SPLIT_FILE_NAME, index=False, compression=_GZIP_OPTIONS
    )
    pd.DataFrame(tables.metadata_rows, columns=METADATA_COLUMNS).to_csv(
        directory / METADATA_FILE_NAME, index=False, compression=_GZIP_OPTIONS
    )
    pd.DataFrame(tables.ms_cxr_rows, columns=MS_CXR_COLUMNS).to_csv(directory / MS_CXR_FILE_NAME, index=False)


def phantom_config_hash(config: PhantomConfig) -> str:
    """Return a SHA-256 hex digest of the config and the generator version."""
    payload = json.dumps({"version": GENERATOR_VERSION, "config": dataclasses.asdict(config)}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _read_marker_hash(root: Path) -> str | None:
    marker = root / MARKER_FILE_NAME
    if not marker.is_file():
        return None
    try:
        return str(json.loads(marker.read_text(encoding="utf-8"))["config_hash"])
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        logger.warning("Ignoring unreadable phantom marker %s: %s", marker, error)
        return ""


def _remove_abandoned_temporaries(root: Path) -> None:
    """Delete temporary directories of earlier writers whose process no longer runs."""
    for candidate in root.parent.glob(f".{root.name}.tmp-*"):
        try:
            pid = int(candidate.name.rsplit("-", 2)[-2])
            os.kill(pid, 0)
        except ProcessLookupError:
            logger.info("Removing abandoned partial phantom data set %s", candidate)
            shutil.rmtree(candidate, ignore_errors=True)
        except (ValueError, IndexError, PermissionError, OSError):
            continue


def write_phantom_dataset(root: str | Path, config: PhantomConfig) -> Path:
    """Write a phantom data set in the MIMIC-CXR-JPG and MS-CXR layouts, or reuse a matching one.

    The data set is generated in a temporary sibling directory and moved into place with a
    marker file that contains a hash of ``config``. A later call with the same config returns
    at once; a call with another config replaces the data set. An interrupted write leaves no
    marker in ``root``, so the next call starts over.

    Args:
        root: Directory of the data set. It must be missing, empty, or an earlier phantom
            data set.
        config: Sizes, finding mix and seed.

    Returns:
        ``root`` as a ``Path``.

    Raises:
        FileExistsError: If ``root`` exists, is not empty and contains no phantom marker, so it
            may contain data that is not ours to replace.
        NotADirectoryError: If ``root`` is a file.
    """
    root = Path(root).expanduser().absolute()
    expected_hash = phantom_config_hash(config)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"Phantom data set root {root} is a file; pass a directory path.")

    found_hash = _read_marker_hash(root)
    if found_hash == expected_hash:
        logger.info("Reusing phantom data set at %s", root)
        return root
    if found_hash is None and root.is_dir() and any(root.iterdir()):
        raise FileExistsError(
            f"{root} is not empty and is not a phantom data set (no {MARKER_FILE_NAME}); "
            "pass an empty or new directory."
        )

    # Generate next to the root, so that the final rename stays on one file system.
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_temporaries(root)
    temporary = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temporary.mkdir()
    try:
        logger.info("Writing phantom data set to %s (config hash %s)", root, expected_hash[:12])
        _generate(temporary, config)
        marker = {"config_hash": expected_hash, "config": dataclasses.asdict(config), "version": GENERATOR_VERSION}
        (temporary / MARKER_FILE_NAME).write_text(json.dumps(marker, indent=2), encoding="utf-8")

        # Swap: move an old data set aside, move the new one in, then delete the old one.
        retired = None
        if root.exists():
            retired = root.parent / f".{root.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            root.rename(retired)
        try:
            temporary.rename(root)
        except OSError:
            # Another process finished first. Keep its data set if it matches this config.
            if _read_marker_hash(root) != expected_hash:
                raise
            logger.info("Another process wrote the phantom data set at %s first; using it", root)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
    return root
