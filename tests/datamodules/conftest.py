"""Fixtures in the official file formats: MIMIC-CXR-JPG CSVs and tree, reports, MS-CXR and ChestX-ray14 CSVs."""

import csv
import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SPLIT_COLUMNS = ["dicom_id", "study_id", "subject_id", "split"]
METADATA_COLUMNS = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns"]
MS_CXR_COLUMNS = ["dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h", "image_width", "image_height", "split"]

REPORT_FULL = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough

 FINDINGS:  The lungs are clear.  No pleural effusion.

 IMPRESSION:
 No acute cardiopulmonary
 process .
"""
REPORT_FINDINGS_ONLY = """ FINAL REPORT
 FINDINGS:  Dr. ___ was notified at ___ of a small
 left pleural effusion.
"""
REPORT_EMPTY = """ FINAL REPORT
 INDICATION: cough
 IMPRESSION:
"""


@dataclass
class MimicFixture:
    """Paths of a small MIMIC-CXR-JPG copy and the expected outcome of building its pair list."""

    root: Path
    ms_cxr_csv: Path
    frontal_train: list[str]
    guarded_subject: str


def write_gzip_csv(path: Path, columns: list[str], rows: list[list]) -> None:
    with gzip.open(path, "wt", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)


def write_image(path: Path, height: int, width: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(30, 220, (height, width), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=95)


def study_dir(root: Path, subject: str, study: str) -> Path:
    return root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"


@pytest.fixture()
def mimic_root(tmp_path: Path) -> MimicFixture:
    """A MIMIC-CXR-JPG tree with reports, covering every skip reason and the leakage guard.

    Subjects and images (dicom_id, view, split):
    - 10000001/50000001: d1 PA train (IMPRESSION), d2 LATERAL train (filtered by view).
    - 10000002/50000002: d3 AP train (FINDINGS only, with ___ placeholders).
    - 10000003/50000003: d4 PA train (empty IMPRESSION, no FINDINGS: empty caption).
    - 10000004/50000004: d5 PA train (no report file: missing report).
    - 10000005/50000005: d6 PA validate (other split).
    - 11000006/50000006 and 50000007: d7 and d8 PA train; MS-CXR annotates d7 only, so the
      guard removes both.
    - 10000008/50000008: d9 PA train, image file missing.
    - 12000009/50000009: d10 PA train (portrait image), d11 AP train (landscape image).
    """
    root = tmp_path / "mimic-cxr-jpg"
    images = [
        ("d1", "50000001", "10000001", "train", "PA", REPORT_FULL, True),
        ("d2", "50000001", "10000001", "train", "LATERAL", REPORT_FULL, True),
        ("d3", "50000002", "10000002", "train", "AP", REPORT_FINDINGS_ONLY, True),
        ("d4", "50000003", "10000003", "train", "PA", REPORT_EMPTY, True),
        ("d5", "50000004", "10000004", "train", "PA", None, True),
        ("d6", "50000005", "10000005", "validate", "PA", REPORT_FULL, True),
        ("d7", "50000006", "11000006", "train", "PA", REPORT_FULL, True),
        ("d8", "50000007", "11000006", "train", "PA", REPORT_FULL, True),
        ("d9", "50000008", "10000008", "train", "PA", REPORT_FULL, False),
        ("d10", "50000009", "12000009", "train", "PA", REPORT_FULL, True),
        ("d11", "50000009", "12000009", "train", "AP", REPORT_FULL, True),
    ]

    root.mkdir(parents=True)
    split_rows, metadata_rows = [], []
    for index, (dicom, study, subject, split, view, report, has_image) in enumerate(images):
        split_rows.append([dicom, study, subject, split])
        height, width = (80, 48) if dicom == "d10" else (48, 80)
        metadata_rows.append([dicom, subject, study, "CHEST (PA AND LAT)", view, height, width])
        folder = study_dir(root, subject, study)
        if has_image:
            write_image(folder / f"{dicom}.jpg", height, width, seed=index)
        if report is not None:
            folder.parent.mkdir(parents=True, exist_ok=True)
            folder.with_suffix(".txt").write_text(report)

    write_gzip_csv(root / "mimic-cxr-2.0.0-split.csv.gz", SPLIT_COLUMNS, split_rows)
    write_gzip_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", METADATA_COLUMNS, metadata_rows)

    ms_cxr_csv = tmp_path / "MS_CXR_Local_Alignment_v1.1.0.csv"
    with ms_cxr_csv.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(MS_CXR_COLUMNS)
        writer.writerow(["d7", "Pneumonia", "right lower lobe pneumonia", "files/p11/p11000006/s50000006/d7.dcm", 10, 10, 20, 20, 80, 48, "test"])

    return MimicFixture(root, ms_cxr_csv, frontal_train=["d1", "d3", "d10", "d11"], guarded_subject="11000006")


@dataclass
class GroundingFixture:
    """Paths of an MS-CXR CSV with valid and invalid rows and its images under a MIMIC-CXR-JPG root."""

    root: Path
    csv_path: Path


def ms_cxr_path(dicom: str) -> str:
    return f"files/p10/p10000100/s50000100/{dicom}.dcm"


@pytest.fixture()
def ms_cxr_fixture(tmp_path: Path) -> GroundingFixture:
    """An MS-CXR v1.1.0 CSV at image size 32 with hand-computable boxes.

    - g1 (64 x 128, landscape; scale 1/2, crop from column 16): "small bilateral effusions",
      two boxes -> crop boxes (4, 4, 12, 8) and (20, 20, 8, 8), split test; "enlarged heart"
      (Cardiomegaly) left of the crop -> flagged, split test.
    - g2 (128 x 64, portrait; scale 1/2, crop from row 16): "left apical pneumothorax",
      box (8, 20, 16, 40) -> (4, 0, 8, 14) after clipping at the crop's top, split val.
    - g3: row for an image that does not exist, split test.
    - g4: a truncated JPEG, split test.
    - invalid rows: unknown category, empty phrase, zero width, negative height, box outside
      the image, malformed number, missing field; one box partly outside the image is clipped.
    """
    root = tmp_path / "mimic-cxr-jpg"
    folder = root / "files" / "p10" / "p10000100" / "s50000100"
    write_image(folder / "g1.jpg", 64, 128, seed=1)
    write_image(folder / "g2.jpg", 128, 64, seed=2)
    write_image(folder / "g4.jpg", 64, 64, seed=4)
    data = (folder / "g4.jpg").read_bytes()
    (folder / "g4.jpg").write_bytes(data[: len(data) // 3])

    rows = [
        ["g1", "Pleural Effusion", "small bilateral effusions", ms_cxr_path("g1"), 40, 8, 24, 16, 128, 64, "test"],
        ["g1", "Pleural Effusion", "small bilateral effusions", ms_cxr_path("g1"), 72, 40, 16, 16, 128, 64, "test"],
        ["g1", "Cardiomegaly", "enlarged heart", ms_cxr_path("g1"), 0, 0, 20, 64, 128, 64, "test"],
        ["g2", "Pneumothorax", "left apical pneumothorax", ms_cxr_path("g2"), 8, 20, 16, 40, 64, 128, "val"],
        ["g2", "Pneumothorax", "left apical pneumothorax", ms_cxr_path("g2"), -10, 100, 30, 10, 64, 128, "val"],
        ["g3", "Edema", "mild pulmonary edema", ms_cxr_path("g3"), 0, 0, 10, 10, 64, 64, "test"],
        ["g4", "Atelectasis", "bibasilar atelectasis", ms_cxr_path("g4"), 0, 40, 64, 20, 64, 64, "test"],
        ["g1", "Fracture", "rib fracture", ms_cxr_path("g1"), 0, 0, 10, 10, 128, 64, "test"],
        ["g1", "Edema", "   ", ms_cxr_path("g1"), 0, 0, 10, 10, 128, 64, "test"],
        ["g1", "Edema", "edema", ms_cxr_path("g1"), 0, 0, 0, 10, 128, 64, "test"],
        ["g1", "Edema", "edema", ms_cxr_path("g1"), 0, 0, 10, -4, 128, 64, "test"],
        ["g1", "Edema", "edema", ms_cxr_path("g1"), 500, 0, 10, 10, 128, 64, "test"],
        ["g1", "Edema", "edema", ms_cxr_path("g1"), "abc", 0, 10, 10, 128, 64, "test"],
    ]
    csv_path = tmp_path / "MS_CXR_Local_Alignment_v1.1.0.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(MS_CXR_COLUMNS)
        writer.writerows(rows)
        handle.write("g1,Edema,edema\n")
    return GroundingFixture(root, csv_path)
