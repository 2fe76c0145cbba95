"""GroundingEvaluator on a tiny module: failures stay per pair, and configs stay as given."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from grounding.engine import GroundingConfig
from grounding.pipeline import MAIN_METHOD, EvaluationSettings, GroundingEvaluator
from lightning_modules.latent_diffusion import LatentDiffusionModule

SIDE = 32


@pytest.fixture
def module(tiny_module_kwargs: dict[str, Any]) -> LatentDiffusionModule:
    torch.manual_seed(0)
    return LatentDiffusionModule(**tiny_module_kwargs).eval()


def make_batch(phrases: list[str], findings: list[str]) -> dict[str, Any]:
    gt_masks = torch.zeros(len(phrases), SIDE, SIDE, dtype=torch.bool)
    gt_masks[:, 8:20, 4:14] = True
    return {
        "phrases": phrases,
        "findings": findings,
        "pair_ids": [f"pair-{index}" for index in range(len(phrases))],
        "gt_masks": gt_masks,
        "boxes": [[(4.0, 8.0, 10.0, 12.0)] for _ in phrases],
    }


def engine_config() -> GroundingConfig:
    return GroundingConfig(num_inference_steps=4, timestep_window=2, steps_per_forward=2)


def evaluate(
    module: LatentDiffusionModule,
    evaluator: GroundingEvaluator,
    batch: dict[str, Any],
    latents: torch.Tensor,
    **kwargs: Any,
) -> list[list[Any]]:
    def encode(texts: list[str]) -> tuple[torch.Tensor, Any]:
        return module.encode_text(texts, use_ema=True)

    return evaluator.evaluate_batch(module.ema_unet, module.noise_scheduler.config, encode, latents, batch, **kwargs)


def count_unet_rows(unet: torch.nn.Module) -> tuple[list[int], Any]:
    rows: list[int] = []
    handle = unet.register_forward_pre_hook(lambda _, inputs: rows.append(inputs[0].shape[0]))
    return rows, handle


def test_untokenizable_phrase_fails_alone(module: LatentDiffusionModule) -> None:
    evaluator = GroundingEvaluator(engine_config(), EvaluationSettings(bbm_variants=[]))
    batch = make_batch(["", "small left pleural effusion"], ["Pleural Effusion", "Pleural Effusion"])

    results = evaluate(module, evaluator, batch, torch.randn(2, 3, SIDE, SIDE))

    assert results[0] == []
    assert [pair_id for pair_id, _ in evaluator.failed_pairs] == ["pair-0"]
    assert results[1][0].record["method"] == MAIN_METHOD
    assert results[1][0].record["pair_id"] == "pair-1"


def test_unknown_finding_is_scored(module: LatentDiffusionModule) -> None:
    evaluator = GroundingEvaluator(engine_config(), EvaluationSettings(bbm_variants=[]))
    batch = make_batch(["nodule in the right lung", "left lung opacity"], ["Nodule", "Unlisted Finding"])

    results = evaluate(module, evaluator, batch, torch.randn(2, 3, SIDE, SIDE))

    assert evaluator.failed_pairs == []
    disease = {row[0].record["pair_id"]: item.record for row in results for item in row if item.method == "tokens/disease"}
    # Words repeat once per subword token, because disease filtering keeps all of them.
    assert set(disease["pair-0"]["words"].split()) == {"nodule"}
    assert set(disease["pair-1"]["words"].split()) == {"left", "lung", "opacity"}
    assert disease["pair-1"]["token_fallback"] == "finding 'Unlisted Finding' has no disease keywords"
    assert disease["pair-0"]["token_fallback"] == ""


def test_non_finite_pair_keeps_bbm_methods(module: LatentDiffusionModule) -> None:
    evaluator = GroundingEvaluator(engine_config(), EvaluationSettings(bbm_variants=["bezier", "linear"]))
    plain = GroundingEvaluator(engine_config(), EvaluationSettings(bbm_variants=[]))
    batch = make_batch(["small left pleural effusion"] * 2, ["Pleural Effusion"] * 2)
    latents = torch.randn(2, 3, SIDE, SIDE)
    latents[0] = float("nan")

    results = evaluate(module, evaluator, batch, latents)
    plain_results = evaluate(module, plain, batch, latents)

    assert evaluator.failed_pairs == []
    methods = [item.method for item in results[0]]
    assert methods == [item.method for item in results[1]]
    assert {"bbm/bezier", "bbm/linear"} <= set(methods)
    merged = next(item.record for item in results[0] if item.method == "bbm/bezier")
    assert merged["mask_flag"] == "non_finite_map"
    assert math.isnan(merged["bbm_similarity"])
    assert merged["zero_all/miou"] == 0.0
    assert next(item.record for item in results[1] if item.method == "bbm/bezier")["mask_flag"] == "ok"
    assert [item.method for item in plain_results[0]] == [method for method in methods if not method.startswith("bbm/")]


def test_evaluator_leaves_config_unchanged(module: LatentDiffusionModule) -> None:
    config = engine_config()

    evaluator = GroundingEvaluator(config, EvaluationSettings())

    assert config.bimodal_bias_merging is False
    assert config.extra_timestep_windows == []
    assert evaluator.engine_config.bimodal_bias_merging is True
    assert 4 in evaluator.engine_config.timestep_windows


def test_control_pass_skips_text_run(module: LatentDiffusionModule) -> None:
    evaluator = GroundingEvaluator(engine_config(), EvaluationSettings())
    batch = make_batch(["small left pleural effusion"], ["Pleural Effusion"])
    rows, handle = count_unet_rows(module.ema_unet)

    try:
        results = evaluate(module, evaluator, batch, torch.randn(1, 3, SIDE, SIDE), main_method="shuffled", only_main=True)
    finally:
        handle.remove()

    # The window of 2 steps in one forward of 2 rows, without the Gaussian text run of BBM.
    assert rows == [2]
    assert [item.method for item in results[0]] == ["shuffled"]
    assert np.isfinite(results[0][0].latent_map).all()


def test_layer_ablations_scored(module: LatentDiffusionModule) -> None:
    settings = EvaluationSettings(bbm_variants=[], layer_subsets={"first": [0], "outer": [0, -1]})
    evaluator = GroundingEvaluator(engine_config(), settings)
    batch = make_batch(["small left pleural effusion"], ["Pleural Effusion"])

    results = evaluate(module, evaluator, batch, torch.randn(1, 3, SIDE, SIDE))

    methods = [item.method for item in results[0]]
    # The tiny U-Net has attn2 layers at 32x32 and 16x16.
    assert [method for method in methods if method.startswith("layers/")] == [
        "layers/res16",
        "layers/res32",
        "layers/first",
        "layers/outer",
    ]
    maps_by_method = {item.method: item.latent_map for item in results[0]}
    assert not np.allclose(maps_by_method["layers/res16"], maps_by_method["layers/res32"])


def test_layer_subset_outside_capture_rejected(module: LatentDiffusionModule) -> None:
    config = GroundingConfig(num_inference_steps=4, timestep_window=2, layers=[0])
    evaluator = GroundingEvaluator(config, EvaluationSettings(layer_subsets={"last": [-1]}))

    with pytest.raises(ValueError, match="Layer subset 'last' needs layers"):
        evaluator.check_layers(module.ema_unet)
    with pytest.raises(ValueError, match="Layer subset 'bad'"):
        GroundingEvaluator(config, EvaluationSettings(layer_subsets={"bad": [99]})).check_layers(module.ema_unet)
    with pytest.raises(ValueError, match="is empty"):
        EvaluationSettings(layer_subsets={"none": []})


def test_multi_threshold_convention_recorded(module: LatentDiffusionModule) -> None:
    settings = EvaluationSettings(bbm_variants=[], metric_convention="multi_threshold", compare_token_strategies=False)
    evaluator = GroundingEvaluator(engine_config(), settings)
    batch = make_batch(["small left pleural effusion"], ["Pleural Effusion"])
    # Two boxes, so the per-box CNR averages two values.
    batch["boxes"] = [[(4.0, 8.0, 10.0, 12.0), (18.0, 2.0, 8.0, 8.0)]]
    batch["gt_masks"][0, 2:10, 18:26] = True

    results = evaluate(module, evaluator, batch, torch.randn(1, 3, SIDE, SIDE))

    records = [item.record for item in results[0]]
    assert {record["convention"] for record in records} == {"multi_threshold"}

    # The main record against the two formulas applied by hand to its image-size map.
    main = results[0][0]
    image_map = main.image_map.astype(np.float64)
    normalized = (image_map - image_map.min()) / (image_map.max() - image_map.min())
    gt_mask = batch["gt_masks"][0].numpy()
    ious = []
    for threshold in (0.1, 0.2, 0.3, 0.4, 0.5):
        predicted = normalized > threshold
        ious.append((predicted & gt_mask).sum() / (predicted | gt_mask).sum())
    boxes = [np.zeros_like(gt_mask), np.zeros_like(gt_mask)]
    boxes[0][8:20, 4:14] = True
    boxes[1][2:10, 18:26] = True
    outside = ~(boxes[0] | boxes[1])
    per_box = [
        abs(image_map[box].mean() - image_map[outside].mean()) / np.sqrt(image_map[box].var() + image_map[outside].var())
        for box in boxes
    ]
    assert main.record["keep_threshold_free/miou"] == pytest.approx(np.mean(ious), abs=1e-6)
    assert main.record["keep_threshold_free/cnr"] == pytest.approx(np.mean(per_box), abs=1e-5)
