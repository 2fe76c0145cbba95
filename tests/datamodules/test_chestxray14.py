"""Tests of the ChestX-ray14 box list reader: header quirk, image search and bad rows."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.chestxray14 import index_chestxray14_images, read_chestxray14_boxes

HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"


@pytest.fixture()
def chestxray14(tmp_path: Path) -> tuple[Path, Path]:
    """Images spread over images_001/images and images_002/images, and a box list with bad rows."""
    images_dir = tmp_path / "ChestX-ray14"
    for folder, name in (("images_001", "00000001_000.png"), ("images_002", "00000002_000.png")):
        target = images_dir / folder / "images" / name
        target.parent.mkdir(parents=True)
        Image.fromarray(np.zeros((64, 64), dtype=np.uint8)).save(target)

    csv_path = tmp_path / "BBox_List_2017.csv"
    csv_path.write_text(
        HEADER
        + "00000001_000.png,Effusion,100.5,200.25,300,150,\n"
        + "00000001_000.png,Effusion,600,200,100,100,\n"
        + "00000001_000.png,Nodule,10,10,20,20,\n"
        + "00000002_000.png,Infiltrate,1000,1000,100,100,\n"
        + "00000002_000.png,Fracture,10,10,20,20,\n"
        + "00000002_000.png,Mass,10,10,0,20,\n"
        + "00000002_000.png,Mass,2000,10,10,20,\n"
        + "00000002_000.png,Mass,x,10,10,20,\n"
        + "00000002_000.png,Mass,10,10\n"
        + "00000003_000.png,Atelectasis,10,10,20,20,\n"
    )
    return csv_path, images_dir


def test_index_searches_release_folders(chestxray14) -> None:
    _, images_dir = chestxray14

    index = index_chestxray14_images(images_dir)

    assert index["00000001_000.png"] == images_dir / "images_001" / "images" / "00000001_000.png"
    assert index["00000002_000.png"] == images_dir / "images_002" / "images" / "00000002_000.png"


def test_reads_pairs_by_image_and_finding(chestxray14) -> None:
    csv_path, images_dir = chestxray14

    result = read_chestxray14_boxes(csv_path, images_dir, image_size=256, phrase_template="{finding} in the chest")
    pairs = {(pair.image_id, pair.finding): pair for pair in result.pairs}

    assert len(result.pairs) == 4
    assert pairs[("00000001_000.png", "Effusion")].boxes == [(100.5, 200.25, 300.0, 150.0), (600.0, 200.0, 100.0, 100.0)]
    assert pairs[("00000001_000.png", "Effusion")].phrase == "effusion in the chest"
    assert pairs[("00000002_000.png", "Infiltrate")].boxes == [(1000.0, 1000.0, 24.0, 24.0)]
    assert pairs[("00000001_000.png", "Effusion")].image_width == 1024
    assert pairs[("00000003_000.png", "Atelectasis")].image_path == str(images_dir / "00000003_000.png")
    assert result.clipped_boxes == 1


def test_counts_bad_rows(chestxray14) -> None:
    csv_path, images_dir = chestxray14

    result = read_chestxray14_boxes(csv_path, images_dir, image_size=256)

    assert result.skipped_rows == {
        "unknown finding 'Fracture'": 1,
        "non-positive box width or height": 1,
        "box outside the image": 1,
        "malformed number in box": 1,
        "malformed row (expected image, finding and four box values)": 1,
    }
    assert "gave 5 boxes on 3 images" in result.warnings[0]


def test_wrong_header_rejected(tmp_path: Path) -> None:
    csv_path = tmp_path / "boxes.csv"
    csv_path.write_text("image,label,x,y,w,h\n")
    (tmp_path / "images").mkdir()

    with pytest.raises(ValueError, match="Image Index,Finding Label"):
        read_chestxray14_boxes(csv_path, tmp_path / "images", image_size=256)


def test_template_needs_finding(chestxray14) -> None:
    csv_path, images_dir = chestxray14

    with pytest.raises(ValueError, match="phrase_template"):
        read_chestxray14_boxes(csv_path, images_dir, image_size=256, phrase_template="a finding")


def test_missing_images_dir_names_key(tmp_path: Path) -> None:
    csv_path = tmp_path / "BBox_List_2017.csv"
    csv_path.write_text(HEADER)

    with pytest.raises(FileNotFoundError, match="chestxray14_images_dir"):
        read_chestxray14_boxes(csv_path, tmp_path / "absent", image_size=256)
