"""Tests of the data-check command on official-format fixtures."""

import json
from pathlib import Path

import pytest

from datamodules.data_check import load_data_config, main


def write_config(tmp_path: Path, mimic_root, **init_args) -> Path:
    arguments = {
        "mimic_cxr_jpg_root": str(mimic_root.root),
        "ms_cxr_csv": str(mimic_root.ms_cxr_csv),
        "image_size": 32,
        "num_workers": 0,
        "work_dir": "${trainer.default_root_dir}/data",
        **init_args,
    }
    lines = [
        "trainer:",
        f"  default_root_dir: {tmp_path / 'run'}",
        "  accumulate_grad_batches: ${unregistered_resolver:1}",
        "data:",
        "  class_path: datamodules.datamodule.CXRDataModule",
        "  init_args:",
    ]
    lines += [f"    {key}: {value}" for key, value in arguments.items()]
    path = tmp_path / "config.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_summary_counts(mimic_root, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_config(tmp_path, mimic_root)

    assert main(["--config", str(config), "--decode", "all"]) == 0
    summary = json.loads(capsys.readouterr().out)

    training = summary["training"]
    assert training["pairs_kept"] == 4
    assert training["pairs_skipped"] == {"empty caption": 1, "missing report": 1, "missing image": 1}
    assert training["excluded_by_leakage_guard"] == 2
    assert training["excluded_subjects"] == 1
    assert summary["grounding"]["test"]["pairs_per_finding"] == {"Pneumonia": 1}
    assert summary["grounding"]["test"]["boxes"] == 1
    assert summary["grounding"]["val"]["pairs"] == 0
    assert summary["images"]["checked"] == 5
    assert summary["images"]["unreadable"] == 0
    assert summary["data"]["init_args"]["work_dir"] == str(tmp_path / "run" / "data")


def test_chexpert_positives_counted(mimic_root, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import csv
    import gzip

    with gzip.open(mimic_root.root / "mimic-cxr-2.0.0-chexpert.csv.gz", "wt", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["subject_id", "study_id", "Edema", "Pleural Effusion"])
        writer.writerow(["10000001", "50000001", "1.0", "0.0"])
        writer.writerow(["10000002", "50000002", "-1.0", "1.0"])
        writer.writerow(["11000006", "50000006", "1.0", "1.0"])
    config = write_config(tmp_path, mimic_root)

    assert main(["--config", str(config), "--decode", "none"]) == 0
    summary = json.loads(capsys.readouterr().out)

    # Subject 11000006 is left out by the leakage guard, so its labels do not count.
    assert summary["training"]["chexpert_positive_studies"] == {"Edema": 1, "Pleural Effusion": 1}
    assert summary["images"]["checked"] == 0


def test_override_and_unreadable_images(mimic_root, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_config(tmp_path, mimic_root)
    broken = next(mimic_root.root.glob("files/p10/p10000001/s50000001/d1.jpg"))
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")

    assert main(["--config", str(config), "--decode", "all", "--data.init_args.leakage_guard=false"]) == 0
    summary = json.loads(capsys.readouterr().out)

    assert summary["training"]["excluded_by_leakage_guard"] == 0
    assert summary["training"]["pairs_kept"] == 6
    assert summary["images"]["unreadable"] == 1
    assert summary["images"]["examples"][0]["path"] == str(broken)


def test_missing_path_exits_with_message(mimic_root, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_config(tmp_path, mimic_root, ms_cxr_csv=str(tmp_path / "absent.csv"))

    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config)])

    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "absent.csv" in error
    assert "data.init_args.ms_cxr_csv" in error


def test_rejects_non_data_override(mimic_root, tmp_path: Path) -> None:
    config = write_config(tmp_path, mimic_root)

    with pytest.raises(SystemExit):
        main(["--config", str(config), "--trainer.max_steps=3"])


def test_config_without_data_section(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("trainer:\n  max_steps: 1\n")

    with pytest.raises(ValueError, match="No data.class_path"):
        load_data_config([str(path)], [])
