"""Tests of the MS-CXR reader and grounding dataset against hand-computed boxes and masks."""

import csv
from pathlib import Path

import pytest
import torch

from datamodules.image_io import DecodeMode, ImageDecodeError
from datamodules.ms_cxr import (
    MS_CXR_V1_0_0_PAIR_COUNTS,
    GroundingDataset,
    collate_grounding,
    make_pair_id,
    map_ms_cxr_path,
    read_ms_cxr,
)


def pairs_by_phrase(result) -> dict:
    return {pair.phrase: pair for pair in result.pairs}


def test_reads_pairs_with_all_boxes(ms_cxr_fixture) -> None:
    result = read_ms_cxr(ms_cxr_fixture.csv_path, ms_cxr_fixture.root, image_size=32)
    pairs = pairs_by_phrase(result)

    assert len(result.pairs) == 5
    assert pairs["small bilateral effusions"].boxes == [(40.0, 8.0, 24.0, 16.0), (72.0, 40.0, 16.0, 16.0)]
    assert pairs["small bilateral effusions"].finding == "Pleural Effusion"
    assert pairs["small bilateral effusions"].split == "test"
    assert pairs["left apical pneumothorax"].boxes == [(8.0, 20.0, 16.0, 40.0), (0.0, 100.0, 20.0, 10.0)]
    assert pairs["small bilateral effusions"].image_path == str(ms_cxr_fixture.root / "files/p10/p10000100/s50000100/g1.jpg")


def test_counts_every_skip_reason(ms_cxr_fixture) -> None:
    result = read_ms_cxr(ms_cxr_fixture.csv_path, ms_cxr_fixture.root, image_size=32)

    assert result.skipped_rows == {
        "unknown category 'Fracture'": 1,
        "empty phrase": 1,
        "non-positive box width or height": 2,
        "box outside the image": 1,
        "malformed number in box or image size": 1,
        "malformed row (wrong number of fields)": 1,
    }
    assert result.clipped_boxes == 1


def test_flags_pair_outside_crop(ms_cxr_fixture) -> None:
    result = read_ms_cxr(ms_cxr_fixture.csv_path, ms_cxr_fixture.root, image_size=32)

    flagged = result.flagged_pairs()
    assert flagged == [make_pair_id("g1", "Cardiomegaly", "enlarged heart")]


def test_split_filter(ms_cxr_fixture) -> None:
    val = read_ms_cxr(ms_cxr_fixture.csv_path, ms_cxr_fixture.root, image_size=32, splits=["val"])
    test = read_ms_cxr(ms_cxr_fixture.csv_path, ms_cxr_fixture.root, image_size=32, splits=["test"])

    assert [pair.phrase for pair in val.pairs] == ["left apical pneumothorax"]
    assert len(test.pairs) == 4
    assert val.pairs_per_finding() == {"Pneumothorax": 1}


def test_pair_ids_unique_and_stable(ms_cxr_fixture) -> None:
    first = read_ms_cxr(ms_cxr_fixture.csv_path, ms_cxr_fixture.root, image_size=32)
    second = read_ms_cxr(ms_cxr_fixture.csv_path, ms_cxr_fixture.root, image_size=32)

    ids = [pair.pair_id for pair in first.pairs]
    assert len(set(ids)) == len(ids)
    assert ids == [pair.pair_id for pair in second.pairs]
    assert all(pair_id.startswith(pair.image_id + ":") for pair_id, pair in zip(ids, first.pairs))


def test_missing_column_rejected(tmp_path: Path) -> None:
    path = tmp_path / "MS_CXR_Local_Alignment_v1.1.0.csv"
    path.write_text("dicom_id,category_name,label_text,path,x,y,w,h\n")

    with pytest.raises(ValueError, match=r"lacks the columns \['image_width', 'image_height'\]"):
        read_ms_cxr(path, tmp_path, image_size=32)


def test_missing_file_names_config_key(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ms_cxr_csv"):
        read_ms_cxr(tmp_path / "absent.csv", tmp_path, image_size=32)


def test_release_counts_warning(tmp_path: Path) -> None:
    # A v1.0.0 file (no split column) with one pair per finding: far from the published 1,162.
    path = tmp_path / "MS_CXR_Local_Alignment_v1.0.0.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h", "image_width", "image_height"])
        for index, finding in enumerate(MS_CXR_V1_0_0_PAIR_COUNTS):
            writer.writerow([f"i{index}", finding, f"phrase {index}", f"files/p10/p10000001/s1/i{index}.dcm", 1, 1, 5, 5, 64, 64])

    result = read_ms_cxr(path, tmp_path, image_size=32)

    assert len(result.warnings) == 1
    assert "8 pairs instead of 1162" in result.warnings[0]
    assert "Cardiomegaly: 1 (expected 333)" in result.warnings[0]


def test_dicom_path_maps_to_jpeg(tmp_path: Path) -> None:
    mapped = map_ms_cxr_path("files/p10/p10000032/s50414267/abc.dcm", tmp_path)

    assert mapped == tmp_path / "files/p10/p10000032/s50414267/abc.jpg"
    assert map_ms_cxr_path("/mimic-cxr-jpg/2.0.0/files/p10/p1/s2/abc.DCM", tmp_path) == tmp_path / "files/p10/p1/s2/abc.jpg"
    assert map_ms_cxr_path("files/p10/p1/s2/abc.jpg", tmp_path) == tmp_path / "files/p10/p1/s2/abc.jpg"


def test_dataset_masks_and_boxes(ms_cxr_fixture) -> None:
    result = read_ms_cxr(ms_cxr_fixture.csv_path, ms_cxr_fixture.root, image_size=32)
    pairs = pairs_by_phrase(result)
    dataset = GroundingDataset([pairs["small bilateral effusions"], pairs["left apical pneumothorax"], pairs["enlarged heart"]], 32, DecodeMode.STRICT)

    effusion, pneumothorax, heart = dataset[0], dataset[1], dataset[2]

    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[4:12, 4:16] = True
    expected[20:28, 20:28] = True
    assert torch.equal(effusion["gt_mask"], expected)
    # pytest 9.2 rejects nested sequences in approx, so the boxes are compared as flat lists.
    flat_boxes = [value for box in effusion["boxes"] for value in box]
    assert flat_boxes == pytest.approx([4.0, 4.0, 12.0, 8.0, 20.0, 20.0, 8.0, 8.0])
    assert effusion["pixel_values"].shape == (3, 32, 32)

    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[0:14, 4:12] = True
    assert torch.equal(pneumothorax["gt_mask"], expected)
    assert [value for box in pneumothorax["boxes"] for value in box] == pytest.approx([4.0, 0.0, 8.0, 14.0])

    assert not heart["gt_mask"].any()
    assert heart["boxes"] == []


def test_lenient_collate_drops_bad_images(ms_cxr_fixture) -> None:
    result = read_ms_cxr(ms_cxr_fixture.csv_path, ms_cxr_fixture.root, image_size=32, splits=["test"])
    dataset = GroundingDataset(result.pairs, 32, DecodeMode.LENIENT)

    batch = collate_grounding([dataset[index] for index in range(len(dataset))], image_size=32)

    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["gt_masks"].shape == (2, 32, 32)
    assert batch["gt_masks"].dtype == torch.bool
    assert batch["phrases"] == ["small bilateral effusions", "enlarged heart"]
    assert batch["findings"] == ["Pleural Effusion", "Cardiomegaly"]
    assert len(batch["pair_ids"]) == 2
    assert len(batch["boxes"]) == 2
    failed = dict(batch["failed_samples"])
    assert len(failed) == 2
    assert any(path.endswith("g3.jpg") and reason == "file not found" for path, reason in failed.items())
    assert any(path.endswith("g4.jpg") for path in failed)


def test_strict_mode_raises_with_path(ms_cxr_fixture) -> None:
    result = read_ms_cxr(ms_cxr_fixture.csv_path, ms_cxr_fixture.root, image_size=32)
    missing = [pair for pair in result.pairs if pair.image_id == "g3"]
    dataset = GroundingDataset(missing, 32, DecodeMode.STRICT)

    with pytest.raises(ImageDecodeError, match="g3.jpg"):
        dataset[0]


def test_collate_all_failed_gives_empty_batch() -> None:
    batch = collate_grounding([{"failed": ("a.jpg", "file not found")}], image_size=16)

    assert batch["pixel_values"].shape == (0, 3, 16, 16)
    assert batch["gt_masks"].shape == (0, 16, 16)
    assert batch["pair_ids"] == []
    assert batch["failed_samples"] == [("a.jpg", "file not found")]
