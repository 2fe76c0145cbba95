from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from callbacks.grounding_evaluation import GroundingEvaluation, _drop_padding_duplicates, _phrase_pool
from grounding.capture import CaptureError
from grounding.pipeline import center_prior_map
from lightning_modules.latent_diffusion import LatentDiffusionModule
from tests.helpers.models import phantom_datamodule, quiet_trainer

SUMMARY_ROWS = ("trained", "untrained", "center_prior", "shuffled_caption", "image_bias")


def test_center_prior_peaks_at_center() -> None:
    prior = center_prior_map((8, 8))

    assert prior.shape == (8, 8)
    assert prior.max() == pytest.approx(np.exp(-0.5 * 2 * (0.5 / 2) ** 2))
    assert np.unravel_index(prior.argmax(), prior.shape) in {(3, 3), (3, 4), (4, 3), (4, 4)}
    assert prior[0, 0] < prior[3, 3]


def test_shuffled_phrase_comes_from_other_finding() -> None:
    callback = GroundingEvaluation()
    pairs = [
        SimpleNamespace(pair_id="a", phrase="small left pleural effusion", finding="Pleural Effusion"),
        SimpleNamespace(pair_id="b", phrase="cardiomegaly", finding="Cardiomegaly"),
        SimpleNamespace(pair_id="c", phrase="right pneumothorax", finding="Pneumothorax"),
    ]
    callback._phrase_pool = _phrase_pool(SimpleNamespace(dataset=SimpleNamespace(pairs=pairs)))
    batch = {"pair_ids": ["a", "b", "c"], "findings": ["Pleural Effusion", "Cardiomegaly", "Pneumothorax"]}

    phrases = callback._shuffled_phrases(batch)

    assert phrases[0] in {"cardiomegaly", "right pneumothorax"}
    assert phrases[1] in {"small left pleural effusion", "right pneumothorax"}
    assert phrases[2] in {"small left pleural effusion", "cardiomegaly"}
    reordered = {"pair_ids": ["c", "a"], "findings": ["Pneumothorax", "Pleural Effusion"]}
    assert callback._shuffled_phrases(reordered) == [phrases[2], phrases[0]]


def test_shuffled_phrase_falls_back_to_finding_names() -> None:
    callback = GroundingEvaluation()
    callback._phrase_pool = None
    callback._batch_phrases = [("left pleural effusion", "Pleural Effusion")]

    phrases = callback._shuffled_phrases({"pair_ids": ["a"], "findings": ["Pleural Effusion"]})

    assert phrases[0] != "left pleural effusion"
    assert "effusion" not in phrases[0]


def test_padding_duplicates_keep_first_rank() -> None:
    records = [
        {"pair_id": "a", "method": "cross_attention", "zero_all/cnr": 1.0},
        {"pair_id": "a", "method": "bbm/bezier", "zero_all/cnr": 2.0},
        {"pair_id": "a", "method": "cross_attention", "zero_all/cnr": 1.0000001},
    ]

    kept = _drop_padding_duplicates(records)

    assert len(kept) == 2
    assert kept[0]["zero_all/cnr"] == 1.0


def test_invalid_options_rejected() -> None:
    with pytest.raises(ValueError, match="every_n_validations"):
        GroundingEvaluation(every_n_validations=0)
    with pytest.raises(ValueError, match="untrained_weights"):
        GroundingEvaluation(untrained_weights="pretrained")
    with pytest.raises(ValueError, match="sampling mode"):
        GroundingEvaluation(mode="ddpm")


def recording_callback(monkeypatch: pytest.MonkeyPatch, **options: object) -> tuple[GroundingEvaluation, list[list[str]]]:
    """A callback whose evaluator only records the pair ids of each scored batch."""
    callback = GroundingEvaluation(shuffled_caption=False, **options)
    scored: list[list[str]] = []

    def record(unet: object, config: object, encode: object, latents: object, batch: dict, **kwargs: object) -> list:
        scored.append(list(batch["pair_ids"]))
        return [[] for _ in batch["pair_ids"]]

    monkeypatch.setattr(callback.evaluator, "evaluate_batch", record)
    return callback, scored


def make_batch(pair_ids: list[str]) -> dict:
    """Build a grounding batch of the given pairs; the stand-in module passes its pixels through."""
    return {
        "pair_ids": pair_ids,
        "phrases": ["left effusion"] * len(pair_ids),
        "findings": ["Pleural Effusion"] * len(pair_ids),
        "pixel_values": list(range(len(pair_ids))),
    }


# A stand-in for the LightningModule, enough for `_evaluate` when the evaluator is replaced.
MODULE = SimpleNamespace(encode_images=lambda pixels: pixels, ema_unet=None, noise_scheduler=SimpleNamespace(config={}))


@pytest.mark.parametrize(("error", "reraised"), [(CaptureError("layer lost"), True), (RuntimeError("out of memory"), False)])
def test_capture_error_stops_evaluation(error: Exception, reraised: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    callback = GroundingEvaluation(shuffled_caption=False)
    callback._phrase_pool = []

    def fail(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(callback.evaluator, "evaluate_batch", fail)
    batch = make_batch(["a"])

    if reraised:
        with pytest.raises(CaptureError):
            callback._evaluate(SimpleNamespace(world_size=1), MODULE, batch, with_controls=True)
    else:
        callback._evaluate(SimpleNamespace(world_size=1), MODULE, batch, with_controls=True)
        assert callback._failed_batches == 1


@pytest.mark.parametrize(("world_size", "expected"), [(1, [["a", "b"], ["c"]]), (2, [["a", "b"]])])
def test_max_pairs_budget_per_rank(world_size: int, expected: list, monkeypatch: pytest.MonkeyPatch) -> None:
    callback, scored = recording_callback(monkeypatch, max_pairs=3)
    trainer = SimpleNamespace(world_size=world_size, is_global_zero=True)
    callback._start(trainer)

    for pair_ids in (["a", "b"], ["c", "d"], ["e"]):
        callback._evaluate(trainer, MODULE, make_batch(pair_ids), with_controls=True)

    # Each rank scores ceil(3 / world_size) pairs.
    assert scored == expected


def test_every_n_validations_skips_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    callback, scored = recording_callback(monkeypatch, every_n_validations=2)
    trainer = SimpleNamespace(world_size=1, is_global_zero=True, sanity_checking=False, val_dataloaders=None)
    active = []

    for run in range(5):
        callback.on_validation_epoch_start(trainer, MODULE)
        active.append(callback._active)
        callback.on_validation_batch_end(trainer, MODULE, None, make_batch([f"run{run}"]), 0)
        callback._active = False

    assert active == [True, False, True, False, True]
    assert scored == [["run0"], ["run2"], ["run4"]]


def test_wandb_logging_pads_figures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.loggers import WandbLogger
    from PIL import Image

    logged_images: dict[str, list] = {}
    tables: dict[str, object] = {}

    def log_image(key: str, images: list, caption: list, step: int) -> None:
        logged_images[key] = images

    def log_table(key: str, dataframe: object, step: int) -> None:
        tables[key] = dataframe

    wandb_logger = WandbLogger(offline=True, save_dir=str(tmp_path))
    monkeypatch.setattr(wandb_logger, "log_image", log_image)
    monkeypatch.setattr(wandb_logger, "log_table", log_table)

    callback = GroundingEvaluation()
    callback._overlays = [(Image.new("RGB", (64, 32)), "a"), (Image.new("RGB", (96, 32)), "b")]
    callback._token_figures = [(Image.new("RGB", (40, 50)), "c")]
    records = [{"pair_id": "a", "method": "cross_attention"}, {"pair_id": "a", "method": "bbm/bezier"}]

    callback._log_overlays(SimpleNamespace(loggers=[wandb_logger], global_step=3), "val", tmp_path / "out", records)

    assert [image.size for image in logged_images["val/grounding/overlays"]] == [(96, 32), (96, 32)]
    assert [image.size for image in logged_images["val/grounding/token_maps"]] == [(40, 50)]
    assert list(tables["val/grounding/pairs"]["method"]) == ["cross_attention"]
    assert sorted(path.name for path in (tmp_path / "out" / "overlays").iterdir()) == ["00.png", "01.png"]
    assert Image.open(tmp_path / "out" / "overlays" / "01.png").size == (96, 32)


def test_fit_writes_summary_and_results(tmp_path: Path, tiny_module_kwargs: dict) -> None:
    module = LatentDiffusionModule(**tiny_module_kwargs)
    datamodule = phantom_datamodule(
        tmp_path,
        {"num_train": 8, "num_validate": 2, "num_test": 0, "min_side_pixels": 48, "max_side_pixels": 64},
        train_batch_size=4,
        eval_batch_size=4,
    )
    grounding = GroundingEvaluation(
        num_inference_steps=4,
        timestep_window=3,
        steps_per_forward=4,
        evaluate_untrained=True,
        untrained_weights="random",
        num_overlays=3,
    )
    trainer = quiet_trainer(
        tmp_path / "run", max_steps=2, val_check_interval=2, num_sanity_val_steps=0, callbacks=[grounding]
    )

    trainer.fit(module, datamodule=datamodule)

    summary = json.loads((tmp_path / "run" / "grounding" / "summary.json").read_text())
    assert set(summary) == set(SUMMARY_ROWS)
    for row in SUMMARY_ROWS:
        for name in ("miou", "cnr", "top1", "auc_roc"):
            assert isinstance(summary[row][name], float)
    assert (summary["trained"]["split"], summary["trained"]["step"]) == ("val", 2)
    assert (summary["untrained"]["split"], summary["untrained"]["step"]) == ("val", 0)
    results = tmp_path / "run" / "grounding" / "val-step000002"
    for name in ("pairs.csv", "summary.json", "findings.md", "findings_threshold_free.csv", "ablations.json"):
        assert (results / name).is_file()
    assert len(list((results / "overlays").glob("*.png"))) == 3
    assert len(list((results / "token_maps").glob("*.png"))) == 2

    # A later validate of the saved checkpoint names its folder by the checkpoint's step, not 0.
    checkpoint = tmp_path / "step2.ckpt"
    trainer.save_checkpoint(checkpoint)
    validate_trainer = quiet_trainer(tmp_path / "validate", callbacks=[GroundingEvaluation(num_inference_steps=4, timestep_window=3)])
    validate_trainer.validate(LatentDiffusionModule(**tiny_module_kwargs), datamodule=datamodule, ckpt_path=checkpoint)
    assert (tmp_path / "validate" / "grounding" / "val-step000002" / "pairs.csv").is_file()
    assert not (tmp_path / "validate" / "grounding" / "val-step000000").exists()
