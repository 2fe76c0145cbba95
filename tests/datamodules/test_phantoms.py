"""Tests of the phantom writer: official file layouts, true boxes, reuse and bad input."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from datamodules import phantoms
from datamodules.phantoms import (
    MARKER_FILE_NAME,
    METADATA_COLUMNS,
    METADATA_FILE_NAME,
    MS_CXR_COLUMNS,
    MS_CXR_FILE_NAME,
    SPLIT_FILE_NAME,
    PhantomConfig,
    write_phantom_dataset,
)

SMALL_CONFIG = PhantomConfig(
    num_train=12,
    num_validate=3,
    num_test=4,
    seed=3,
    lateral_fraction=0.5,
    min_side_pixels=96,
    max_side_pixels=128,
)
DICOM_ID_PATTERN = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}$")
MS_CXR_CATEGORIES = {
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Lung Opacity",
    "Pleural Effusion",
    "Pneumonia",
    "Pneumothorax",
}


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("phantoms") / "mimic", SMALL_CONFIG)


@pytest.fixture(scope="module")
def tables(dataset_root: Path) -> dict[str, pd.DataFrame]:
    return {
        "split": pd.read_csv(dataset_root / SPLIT_FILE_NAME),
        "metadata": pd.read_csv(dataset_root / METADATA_FILE_NAME),
        "ms_cxr": pd.read_csv(dataset_root / MS_CXR_FILE_NAME),
    }


def _directory_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != MARKER_FILE_NAME:
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_tables_have_official_columns(tables: dict[str, pd.DataFrame]) -> None:
    assert list(tables["split"].columns) == ["dicom_id", "study_id", "subject_id", "split"]
    assert list(tables["metadata"].columns) == METADATA_COLUMNS
    assert list(tables["ms_cxr"].columns) == MS_CXR_COLUMNS


def test_split_counts_and_values(tables: dict[str, pd.DataFrame]) -> None:
    frontal = tables["metadata"][tables["metadata"]["ViewPosition"].isin(["PA", "AP"])]
    split = tables["split"].set_index("dicom_id").loc[frontal["dicom_id"], "split"]

    assert set(tables["split"]["split"]) == {"train", "validate", "test"}
    assert (split == "train").sum() == SMALL_CONFIG.num_train
    assert (split == "validate").sum() == SMALL_CONFIG.num_validate
    assert (split == "test").sum() == SMALL_CONFIG.num_test


def test_ids_look_like_mimic(tables: dict[str, pd.DataFrame]) -> None:
    split = tables["split"]

    assert split["subject_id"].astype(str).str.fullmatch(r"1\d{7}").all()
    assert split["study_id"].astype(str).str.fullmatch(r"5\d{7}").all()
    assert split["dicom_id"].map(lambda value: bool(DICOM_ID_PATTERN.match(value))).all()
    assert split["dicom_id"].is_unique


def test_images_are_grayscale_jpegs(dataset_root: Path, tables: dict[str, pd.DataFrame]) -> None:
    orientations = set()
    for row in tables["metadata"].itertuples():
        subject = str(row.subject_id)
        path = dataset_root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{row.study_id}" / f"{row.dicom_id}.jpg"
        with Image.open(path) as image:
            assert image.format == "JPEG"
            assert image.mode == "L"
            assert image.size == (row.Columns, row.Rows)
        if row.Rows > row.Columns:
            orientations.add("portrait")
        elif row.Columns > row.Rows:
            orientations.add("landscape")

    assert {"portrait", "landscape"} <= orientations


def test_reports_have_mimic_sections(dataset_root: Path, tables: dict[str, pd.DataFrame]) -> None:
    for row in tables["split"].drop_duplicates("study_id").itertuples():
        subject = str(row.subject_id)
        report = (dataset_root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{row.study_id}.txt").read_text()

        assert "FINAL REPORT" in report
        assert "EXAMINATION:" in report
        assert report.index("FINDINGS:") < report.index("IMPRESSION:")
        assert report.split("IMPRESSION:")[1].strip()


def test_impression_names_each_phrase(dataset_root: Path, tables: dict[str, pd.DataFrame]) -> None:
    for row in tables["ms_cxr"].itertuples():
        report = (dataset_root / row.path).parent.with_suffix(".txt").read_text()
        impression = " ".join(report.split("IMPRESSION:")[1].split()).lower()

        assert row.label_text.lower() in impression


def test_lateral_views_present_and_excluded(tables: dict[str, pd.DataFrame]) -> None:
    metadata = tables["metadata"]
    lateral = metadata[metadata["ViewPosition"] == "LATERAL"]

    assert len(lateral) > 0
    assert set(lateral["ViewCodeSequence_CodeMeaning"]) == {"lateral"}
    assert not set(lateral["dicom_id"]) & set(tables["ms_cxr"]["dicom_id"])


def test_ms_cxr_rows_are_valid(dataset_root: Path, tables: dict[str, pd.DataFrame]) -> None:
    ms_cxr = tables["ms_cxr"]

    assert len(ms_cxr) > 0
    assert set(ms_cxr["category_name"]) <= MS_CXR_CATEGORIES
    assert set(ms_cxr["split"]) == {"val", "test"}
    for row in ms_cxr.itertuples():
        assert re.fullmatch(r"files/p1\d/p1\d{7}/s5\d{7}/[0-9a-f-]+\.dcm", row.path)
        assert (dataset_root / row.path).with_suffix(".jpg").is_file()
        assert row.w > 0
        assert row.h > 0
        assert row.x >= 0
        assert row.y >= 0
        assert row.x + row.w <= row.image_width
        assert row.y + row.h <= row.image_height


def test_ms_cxr_boxes_survive_center_crop(tables: dict[str, pd.DataFrame]) -> None:
    for row in tables["ms_cxr"].itertuples():
        short_side = min(row.image_width, row.image_height)
        left = (row.image_width - short_side) / 2
        top = (row.image_height - short_side) / 2

        assert row.x >= left
        assert row.y >= top
        assert row.x + row.w <= left + short_side
        assert row.y + row.h <= top + short_side


def test_edema_pairs_have_two_boxes(tables: dict[str, pd.DataFrame]) -> None:
    rows_per_pair = tables["ms_cxr"].groupby(["dicom_id", "label_text", "category_name"]).size()

    for (_, _, category), count in rows_per_pair.items():
        assert count == (2 if category == "Edema" else 1)


def test_held_out_subjects_not_in_train(tables: dict[str, pd.DataFrame]) -> None:
    split = tables["split"]
    train_subjects = set(split.loc[split["split"] == "train", "subject_id"])
    grounding = tables["ms_cxr"].merge(split, on="dicom_id")

    assert not set(grounding["subject_id"]) & train_subjects
    assert split.groupby("subject_id")["split"].nunique().max() == 1


def test_held_out_images_have_distractor(tables: dict[str, pd.DataFrame]) -> None:
    phrases_per_image = tables["ms_cxr"].groupby("dicom_id")["label_text"].nunique()

    assert (phrases_per_image == SMALL_CONFIG.max_findings_per_image).all()


def test_same_config_writes_same_files(tmp_path: Path) -> None:
    config = PhantomConfig(num_train=3, num_validate=1, num_test=1, seed=7, min_side_pixels=64, max_side_pixels=80)

    first = write_phantom_dataset(tmp_path / "first", config)
    second = write_phantom_dataset(tmp_path / "second", config)

    assert _directory_digest(first) == _directory_digest(second)


def test_other_seed_writes_other_files(tmp_path: Path) -> None:
    config = PhantomConfig(num_train=3, num_validate=1, num_test=1, seed=7, min_side_pixels=64, max_side_pixels=80)
    other = PhantomConfig(num_train=3, num_validate=1, num_test=1, seed=8, min_side_pixels=64, max_side_pixels=80)

    assert _directory_digest(write_phantom_dataset(tmp_path / "a", config)) != _directory_digest(
        write_phantom_dataset(tmp_path / "b", other)
    )


def test_matching_dataset_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = PhantomConfig(num_train=2, num_validate=1, num_test=1, min_side_pixels=64, max_side_pixels=80)
    root = write_phantom_dataset(tmp_path / "data", config)

    def fail_generate(directory: Path, config: PhantomConfig) -> None:
        raise AssertionError("a matching data set was regenerated")

    monkeypatch.setattr(phantoms, "_generate", fail_generate)
    assert write_phantom_dataset(root, config) == root


def test_changed_config_regenerates(tmp_path: Path) -> None:
    small = PhantomConfig(num_train=2, num_validate=1, num_test=1, min_side_pixels=64, max_side_pixels=80)
    larger = dataclasses.replace(small, num_train=4)
    root = write_phantom_dataset(tmp_path / "data", small)

    write_phantom_dataset(root, larger)

    split = pd.read_csv(root / SPLIT_FILE_NAME)
    metadata = pd.read_csv(root / METADATA_FILE_NAME).merge(split, on=["dicom_id", "study_id", "subject_id"])
    frontal_train = metadata[(metadata["split"] == "train") & (metadata["ViewPosition"] != "LATERAL")]
    assert len(frontal_train) == 4
    assert not list(tmp_path.glob(".data.*"))


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(directory: Path, config: PhantomConfig) -> None:
        (directory / "files").mkdir()
        raise OSError("disk full")

    monkeypatch.setattr(phantoms, "_generate", crash)
    with pytest.raises(OSError, match="disk full"):
        write_phantom_dataset(tmp_path / "data", PhantomConfig(num_train=1, num_validate=0, num_test=0))

    assert not (tmp_path / "data").exists()
    assert list(tmp_path.iterdir()) == []


def test_abandoned_temporary_is_removed(tmp_path: Path) -> None:
    # Find a process id that is not running, as a crashed writer's would be.
    dead_pid = 4_000_000
    while True:
        try:
            os.kill(dead_pid, 0)
            dead_pid += 1
        except ProcessLookupError:
            break
        except PermissionError:
            dead_pid += 1
    abandoned = tmp_path / f".data.tmp-{dead_pid}-0123abcd"
    (abandoned / "files").mkdir(parents=True)

    write_phantom_dataset(tmp_path / "data", PhantomConfig(num_train=1, num_validate=0, num_test=0))

    assert not abandoned.exists()
    assert (tmp_path / "data" / MARKER_FILE_NAME).is_file()


def test_foreign_directory_is_rejected(tmp_path: Path) -> None:
    root = tmp_path / "mimic"
    root.mkdir()
    (root / "notes.txt").write_text("not ours")

    with pytest.raises(FileExistsError, match="not a phantom data set"):
        write_phantom_dataset(root, PhantomConfig(num_train=1, num_validate=0, num_test=0))
    assert (root / "notes.txt").read_text() == "not ours"


def test_file_root_is_rejected(tmp_path: Path) -> None:
    root = tmp_path / "mimic"
    root.write_text("a file")

    with pytest.raises(NotADirectoryError, match="is a file"):
        write_phantom_dataset(root, PhantomConfig(num_train=1, num_validate=0, num_test=0))


def test_empty_directory_is_filled(tmp_path: Path) -> None:
    root = tmp_path / "mimic"
    root.mkdir()

    write_phantom_dataset(root, PhantomConfig(num_train=1, num_validate=1, num_test=0))

    assert (root / MS_CXR_FILE_NAME).is_file()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_train", -1, "num_train"),
        ("normal_fraction", 1.5, "normal_fraction"),
        ("two_finding_fraction", -0.1, "two_finding_fraction"),
        ("lateral_fraction", 2.0, "lateral_fraction"),
        ("max_findings_per_image", 3, "max_findings_per_image"),
        ("min_side_pixels", 16, "min_side_pixels"),
        ("max_aspect_ratio", 0.5, "max_aspect_ratio"),
        ("jpeg_quality", 0, "jpeg_quality"),
    ],
)
def test_config_rejects_bad_values(field: str, value: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PhantomConfig(**{field: value})
