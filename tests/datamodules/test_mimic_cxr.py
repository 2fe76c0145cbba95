"""Tests of the MIMIC-CXR pair list: official CSVs, report sections, skips and the leakage guard."""

from pathlib import Path

import pandas as pd
import pytest
import torch

from datamodules.image_io import DecodeMode
from datamodules.mimic_cxr import (
    CaptionImageDataset,
    build_mimic_pairs,
    caption_from_report,
    choose_caption,
    extract_sections,
    load_pair_list,
    normalize_caption,
    read_user_pairs,
    save_pair_list,
)


def test_sections_split_on_headers() -> None:
    report = " FINAL REPORT\n INDICATION: cough\n\n FINDINGS: Clear lungs.\n IMPRESSION:\n Normal.\n"

    sections = extract_sections(report)

    assert sections["INDICATION"].strip() == "cough"
    assert sections["FINDINGS"].strip() == "Clear lungs."
    assert sections["IMPRESSION"].strip() == "Normal."


def test_caption_prefers_impression() -> None:
    report = " FINDINGS: Clear lungs.\n IMPRESSION:\n No acute\n   process .\n"

    assert caption_from_report(report) == "No acute process."


def test_caption_falls_back_to_findings() -> None:
    report = " FINDINGS: Small ___ effusion.\n IMPRESSION:\n\n"

    assert caption_from_report(report) == "Small effusion."
    assert caption_from_report(report, fallback_section=None) == ""


def test_placeholder_replacement() -> None:
    assert normalize_caption("Dr. ___ was told at ___ .") == "Dr. was told at."
    assert normalize_caption("Dr. ___ was told", placeholder_replacement="[name]") == "Dr. [name] was told"


def test_builds_frontal_pairs_with_guard(mimic_root) -> None:
    pairs, stats = build_mimic_pairs(
        mimic_root.root,
        mimic_root.root,
        splits=["train"],
        views=["PA", "AP"],
        excluded_subjects={mimic_root.guarded_subject},
    )

    assert list(pairs["dicom_id"]) == mimic_root.frontal_train
    assert stats.kept == 4
    assert stats.candidates == 9
    assert stats.skipped == {"empty caption": 1, "missing report": 1, "missing image": 1}
    assert stats.excluded_by_leakage_guard == 2
    assert stats.excluded_subjects == 1
    captions = dict(zip(pairs["dicom_id"], pairs["caption"]))
    assert captions["d1"] == "No acute cardiopulmonary process."
    assert captions["d3"] == "Dr. was notified at of a small left pleural effusion."
    assert all(Path(path).is_file() for path in pairs["image_path"])


def test_guard_off_keeps_subject(mimic_root) -> None:
    pairs, stats = build_mimic_pairs(mimic_root.root, mimic_root.root, splits=["train"], views=["PA", "AP"], excluded_subjects=None)

    assert {"d7", "d8"} <= set(pairs["dicom_id"])
    assert stats.excluded_by_leakage_guard == 0
    assert not stats.leakage_guard


def test_view_and_split_choice(mimic_root) -> None:
    pairs, _ = build_mimic_pairs(mimic_root.root, mimic_root.root, splits=["validate"], views=["PA"])

    assert list(pairs["dicom_id"]) == ["d6"]


def test_separate_reports_root(mimic_root, tmp_path: Path) -> None:
    # Move every report into a separate reports tree: the pairs stay the same.
    reports = tmp_path / "reports"
    for report in mimic_root.root.glob("files/*/*/*.txt"):
        target = reports / report.relative_to(mimic_root.root)
        target.parent.mkdir(parents=True, exist_ok=True)
        report.rename(target)

    moved, _ = build_mimic_pairs(mimic_root.root, reports, splits=["train"], views=["PA", "AP"], excluded_subjects={mimic_root.guarded_subject})
    empty, stats = build_mimic_pairs(mimic_root.root, mimic_root.root, splits=["train"], views=["PA", "AP"])

    assert list(moved["dicom_id"]) == mimic_root.frontal_train
    assert len(empty) == 0
    assert stats.skipped == {"missing report": 9}


def test_missing_split_csv_names_key(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="mimic_cxr_jpg_root"):
        build_mimic_pairs(tmp_path, tmp_path, splits=["train"], views=["PA"])


def test_pair_list_roundtrip(mimic_root, tmp_path: Path) -> None:
    pairs, stats = build_mimic_pairs(mimic_root.root, mimic_root.root, splits=["train"], views=["PA", "AP"])
    path = tmp_path / "pairs.csv"

    save_pair_list(pairs, stats, path)
    loaded, loaded_stats = load_pair_list(path)

    assert loaded.equals(pairs)
    assert loaded_stats == stats


def test_pair_list_truncated_is_rebuilt(mimic_root, tmp_path: Path) -> None:
    pairs, stats = build_mimic_pairs(mimic_root.root, mimic_root.root, splits=["train"], views=["PA", "AP"])
    path = tmp_path / "pairs.csv"
    save_pair_list(pairs, stats, path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n")

    assert load_pair_list(path) is None


def test_user_csv_with_guard_and_skips(mimic_root, tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {
            "path": [
                "files/p10/p10000001/s50000001/d1.jpg",
                "files/p11/p11000006/s50000006/d7.jpg",
                "files/p10/p10000001/s50000001/absent.jpg",
                "",
                "files/p12/p12000009/s50000009/d10.jpg",
            ],
            "caption": ["first | second", "leaked", "missing image", "no path", "   "],
        }
    )
    csv_path = tmp_path / "pairs.csv"
    frame.to_csv(csv_path, index=False)

    pairs, stats = read_user_pairs(csv_path, image_root=mimic_root.root, excluded_subjects={mimic_root.guarded_subject})

    assert list(pairs["caption"]) == ["first|second"]
    assert stats.excluded_by_leakage_guard == 1
    assert stats.skipped == {"missing image": 1, "missing path": 1, "empty caption": 1}


def test_user_csv_missing_column(tmp_path: Path) -> None:
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("image,text\na.jpg,caption\n")

    with pytest.raises(ValueError, match=r"lacks the columns \['path', 'caption'\]"):
        read_user_pairs(csv_path)


def test_choose_caption_random_and_first() -> None:
    entry = "alpha|beta|gamma"

    assert choose_caption(entry, False) == "alpha"
    torch.manual_seed(0)
    drawn = {choose_caption(entry, True) for _ in range(50)}
    assert drawn == {"alpha", "beta", "gamma"}
    assert choose_caption(" | only", True) == " only"


def test_caption_dataset_lenient_and_strict(mimic_root) -> None:
    pairs, _ = build_mimic_pairs(mimic_root.root, mimic_root.root, splits=["train"], views=["PA", "AP"])
    paths = list(pairs["image_path"]) + [str(mimic_root.root / "missing.jpg")]
    captions = list(pairs["caption"]) + ["x"]

    lenient = CaptionImageDataset(paths, captions, 32, DecodeMode.LENIENT)
    items = [lenient[index] for index in range(len(lenient))]

    assert all(item["pixel_values"].shape == (3, 32, 32) for item in items[:-1])
    assert items[-1] == {"failed": (str(mimic_root.root / "missing.jpg"), "file not found")}
    strict = CaptionImageDataset(paths, captions, 32, DecodeMode.STRICT)
    with pytest.raises(Exception, match="missing.jpg"):
        strict[len(paths) - 1]
