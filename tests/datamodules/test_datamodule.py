"""Tests of CXRDataModule on small official-format fixtures: path checks, batches and failure counts."""

from pathlib import Path

import pytest
import torch

from datamodules.datamodule import CXRDataModule, collate_training


def make_datamodule(mimic_root, tmp_path: Path, **overrides) -> CXRDataModule:
    arguments = {
        "mimic_cxr_jpg_root": str(mimic_root.root),
        "ms_cxr_csv": str(mimic_root.ms_cxr_csv),
        "image_size": 32,
        "train_batch_size": 2,
        "eval_batch_size": 2,
        "num_workers": 0,
        "pin_memory": False,
        "work_dir": str(tmp_path / "work"),
    }
    arguments.update(overrides)
    return CXRDataModule(**arguments)


def test_missing_root_names_key(tmp_path: Path) -> None:
    datamodule = CXRDataModule(mimic_cxr_jpg_root=str(tmp_path / "absent"), ms_cxr_csv=None)

    with pytest.raises(FileNotFoundError, match=r"absent.*data\.init_args\.mimic_cxr_jpg_root.*PhysioNet"):
        datamodule.check_paths()
    with pytest.raises(FileNotFoundError, match=r"absent"):
        datamodule.prepare_data()


def test_missing_ms_cxr_names_key(mimic_root, tmp_path: Path) -> None:
    datamodule = make_datamodule(mimic_root, tmp_path, ms_cxr_csv=str(tmp_path / "absent.csv"))

    with pytest.raises(FileNotFoundError, match=r"data\.init_args\.ms_cxr_csv"):
        datamodule.check_paths()


def test_chestxray14_needs_paths(mimic_root, tmp_path: Path) -> None:
    datamodule = make_datamodule(mimic_root, tmp_path, grounding_source="chestxray14")

    with pytest.raises(ValueError, match="chestxray14_csv is not set"):
        datamodule.check_paths()


def test_invalid_arguments_rejected(mimic_root, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        make_datamodule(mimic_root, tmp_path, image_size=30)
    with pytest.raises(ValueError, match="train_batch_size must be positive"):
        make_datamodule(mimic_root, tmp_path, train_batch_size=0)
    with pytest.raises(ValueError, match="vae_name_or_path"):
        make_datamodule(mimic_root, tmp_path, use_latent_cache=True)


def test_training_batches_follow_contract(mimic_root, tmp_path: Path) -> None:
    datamodule = make_datamodule(mimic_root, tmp_path)
    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.setup("fit")

    batches = list(datamodule.train_dataloader())

    assert len(datamodule.train_dataset) == 4
    assert datamodule.train_stats.excluded_by_leakage_guard == 2
    assert len(batches) == 2
    for batch in batches:
        batch = datamodule.on_before_batch_transfer(batch, 0)
        assert set(batch) == {"pixel_values", "captions"}
        assert batch["pixel_values"].shape == (2, 3, 32, 32)
        assert batch["pixel_values"].dtype == torch.float32
        assert batch["pixel_values"].min() >= -1.0
        assert batch["pixel_values"].max() <= 1.0
        assert len(batch["captions"]) == 2


def test_pair_list_built_once(mimic_root, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_datamodule(mimic_root, tmp_path).prepare_data()
    assert len(list((tmp_path / "work").glob("train_pairs_*.csv"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("the pair list was built again")

    monkeypatch.setattr("datamodules.datamodule.build_mimic_pairs", fail)
    datamodule = make_datamodule(mimic_root, tmp_path)
    datamodule.setup("fit")
    assert len(datamodule.train_dataset) == 4


def test_pair_list_key_follows_settings(mimic_root, tmp_path: Path) -> None:
    make_datamodule(mimic_root, tmp_path).prepare_data()
    make_datamodule(mimic_root, tmp_path, leakage_guard=False).prepare_data()

    assert len(list((tmp_path / "work").glob("train_pairs_*.csv"))) == 2


def test_guard_off_keeps_ms_cxr_subjects(mimic_root, tmp_path: Path) -> None:
    datamodule = make_datamodule(mimic_root, tmp_path, leakage_guard=False)
    datamodule.setup("fit")

    assert len(datamodule.train_dataset) == 6
    assert datamodule.train_stats.excluded_by_leakage_guard == 0


def test_grounding_test_batches(mimic_root, tmp_path: Path) -> None:
    datamodule = make_datamodule(mimic_root, tmp_path)
    datamodule.setup("test")

    batch = next(iter(datamodule.test_dataloader()))
    batch = datamodule.on_before_batch_transfer(batch, 0)

    assert set(batch) == {"pixel_values", "phrases", "findings", "pair_ids", "gt_masks", "boxes"}
    assert batch["phrases"] == ["right lower lobe pneumonia"]
    assert batch["findings"] == ["Pneumonia"]
    assert batch["gt_masks"].shape == (1, 32, 32)
    assert batch["gt_masks"].any()


def test_failed_images_counted(mimic_root, tmp_path: Path) -> None:
    datamodule = make_datamodule(mimic_root, tmp_path, train_batch_size=4)
    datamodule.setup("fit")
    broken = Path(datamodule.train_dataset.image_paths[1])
    broken.write_bytes(broken.read_bytes()[:40])

    batches = [datamodule.on_before_batch_transfer(batch, 0) for batch in datamodule.train_dataloader()]

    assert [batch["pixel_values"].shape[0] for batch in batches] == [3]
    assert [len(batch["captions"]) for batch in batches] == [3]
    assert sum(datamodule.failed_samples.values()) == 1
    assert datamodule.failed_examples[0][0] == str(broken)
    assert datamodule.state_dict() == {"failed_samples": dict(datamodule.failed_samples)}


def test_setup_after_state_restore(mimic_root, tmp_path: Path) -> None:
    datamodule = make_datamodule(mimic_root, tmp_path)
    datamodule.load_state_dict({"failed_samples": {"file not found": 3}})

    assert datamodule.failed_samples["file not found"] == 3


def test_max_subsets(mimic_root, tmp_path: Path) -> None:
    datamodule = make_datamodule(mimic_root, tmp_path, max_train_pairs=2, leakage_guard=False)
    datamodule.setup("fit")
    again = make_datamodule(mimic_root, tmp_path, max_train_pairs=2, leakage_guard=False)
    again.setup("fit")

    assert len(datamodule.train_dataset) == 2
    assert datamodule.train_dataset.image_paths == again.train_dataset.image_paths


def test_user_csv_training(mimic_root, tmp_path: Path) -> None:
    csv_path = tmp_path / "user.csv"
    csv_path.write_text("path,caption\nfiles/p10/p10000001/s50000001/d1.jpg,a|b\nfiles/p11/p11000006/s50000006/d7.jpg,c\n")
    datamodule = make_datamodule(mimic_root, tmp_path, train_csv=str(csv_path))
    datamodule.setup("fit")

    assert len(datamodule.train_dataset) == 1
    assert datamodule.train_stats.excluded_by_leakage_guard == 1


def test_collate_training_empty_batch() -> None:
    batch = collate_training([{"failed": ("x.jpg", "file not found")}], image_size=16)

    assert batch["pixel_values"].shape == (0, 3, 16, 16)
    assert batch["captions"] == []


def test_demo_phantoms_through_readers(tmp_path: Path) -> None:
    datamodule = CXRDataModule(
        demo=True,
        demo_root=str(tmp_path / "phantoms"),
        demo_options={"num_train": 12, "num_validate": 4, "num_test": 4},
        image_size=32,
        train_batch_size=4,
        eval_batch_size=4,
        num_workers=0,
        pin_memory=False,
        work_dir=str(tmp_path / "work"),
    )
    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.setup("test")

    train_batch = datamodule.on_before_batch_transfer(next(iter(datamodule.train_dataloader())), 0)
    val_batch = datamodule.on_before_batch_transfer(next(iter(datamodule.val_dataloader())), 0)

    assert train_batch["pixel_values"].shape == (4, 3, 32, 32)
    assert 0 < len(datamodule.train_dataset) <= 12
    assert val_batch["gt_masks"].shape[1:] == (32, 32)
    assert all(mask.any() for mask in val_batch["gt_masks"])
    assert len(datamodule.grounding["val"].pairs) > 0
    assert len(datamodule.grounding["test"].pairs) > 0
    assert datamodule.grounding["val"].skipped_rows == {}
    assert sum(datamodule.failed_samples.values()) == 0


def test_demo_warns_once_about_ignored_real_paths(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    datamodule = CXRDataModule(demo=True, demo_root=str(tmp_path / "phantoms"), ms_cxr_csv=str(tmp_path / "mine.csv"))

    with caplog.at_level("WARNING", logger="datamodules.datamodule"):
        datamodule.check_paths()
        datamodule.check_paths()

    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1
    assert "mine.csv" in warnings[0]
    assert "demo=false" in warnings[0]


def test_demo_with_default_paths_does_not_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    datamodule = CXRDataModule(demo=True, demo_root=str(tmp_path / "phantoms"))

    with caplog.at_level("WARNING", logger="datamodules.datamodule"):
        datamodule.check_paths()

    assert caplog.records == []


def test_cli_parses_signature() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(CXRDataModule, "data")
    config = parser.parse_args(["--data.views=[PA]", "--data.latent_dtype=bfloat16", "--data.decode_mode=strict", "--data.demo_options={num_train: 3}"])

    assert tuple(config.data.views) == ("PA",)
    assert config.data.latent_dtype == "bfloat16"
    assert config.data.decode_mode == "strict"
    assert config.data.demo_options == {"num_train": 3}


def test_invalid_choice_names_key(mimic_root, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data\.init_args\.decode_mode must be one of strict, lenient; got 'loose'"):
        make_datamodule(mimic_root, tmp_path, decode_mode="loose")


class BatchRecorder:
    """Builds a minimal LightningModule that records the batches it receives."""

    @staticmethod
    def build():
        import lightning as L

        class Recorder(L.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.weight = torch.nn.Parameter(torch.zeros(1))
                self.train_batches: list[dict] = []
                self.val_batches: list[dict] = []

            def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
                self.train_batches.append(batch)
                return self.weight.sum() * 0.0 + self.weight.square().sum()

            def validation_step(self, batch: dict, batch_idx: int) -> None:
                self.val_batches.append(batch)

            def configure_optimizers(self) -> torch.optim.Optimizer:
                return torch.optim.SGD(self.parameters(), lr=0.1)

        return Recorder()


def test_trainer_with_workers_drops_failed(mimic_root, tmp_path: Path) -> None:
    import lightning as L

    # The fixture's only MS-CXR pair is in the test split, so validation reads that split.
    datamodule = make_datamodule(
        mimic_root, tmp_path, num_workers=1, persistent_workers=False, leakage_guard=False, train_batch_size=3, val_splits=("test",)
    )
    datamodule.setup("fit")
    Path(datamodule.train_dataset.image_paths[0]).write_bytes(b"corrupt")
    model = BatchRecorder.build()
    trainer = L.Trainer(
        max_steps=2,
        limit_val_batches=1,
        val_check_interval=2,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )

    trainer.fit(model, datamodule=datamodule)

    assert len(model.train_batches) == 2
    assert all("failed_samples" not in batch for batch in model.train_batches)
    assert sum(len(batch["captions"]) for batch in model.train_batches) == 5
    assert sum(datamodule.failed_samples.values()) == 1
    assert len(model.val_batches) == 1
    assert len(model.val_batches[0]["pair_ids"]) == 1
    assert "failed_samples" not in model.val_batches[0]


def test_guard_resolves_dicom_without_subject_path(mimic_root, tmp_path: Path) -> None:
    # A path without p<subject>/s<study> is resolved through the split CSV's dicom_id. The
    # malformed d1 row still names its image, so its subject is left out too (the safe side).
    csv_path = tmp_path / "ms_cxr_flat.csv"
    header = "dicom_id,category_name,label_text,path,x,y,w,h,image_width,image_height,split\n"
    csv_path.write_text(header + "d8,Edema,mild edema,d8.dcm,1,1,5,5,80,48,test\n" + "d1,Edema,too,many,fields,1,1,5,5,80,48,test,extra\n")
    datamodule = make_datamodule(mimic_root, tmp_path, ms_cxr_csv=str(csv_path))
    datamodule.setup("fit")

    assert datamodule.train_stats.excluded_subjects == 2
    assert datamodule.train_stats.excluded_by_leakage_guard == 3


def test_guard_needs_ms_cxr_columns(mimic_root, tmp_path: Path) -> None:
    csv_path = tmp_path / "ms_cxr_bad.csv"
    csv_path.write_text("image,label\nd7,Edema\n")
    datamodule = make_datamodule(mimic_root, tmp_path, ms_cxr_csv=str(csv_path))

    with pytest.raises(ValueError, match="lacks the dicom_id or path column"):
        datamodule.prepare_data()
