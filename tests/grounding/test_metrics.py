import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from grounding.metrics import (
    EmptyMaskPolicy,
    MetricConvention,
    auc_roc,
    contrast_to_noise,
    foreground_background_miou,
    jaccard_index,
    multi_threshold_iou,
    rasterize_boxes,
    score_pair,
    top1_hit,
)


def _top_left_gt(size: int = 4) -> np.ndarray:
    gt_mask = np.zeros((size, size), bool)
    gt_mask[:2, :2] = True
    return gt_mask


def test_miou_hand_computed() -> None:
    gt_mask = _top_left_gt()
    mask = np.zeros((4, 4), bool)
    mask[:2, :3] = True

    # Foreground 4/6, background 10/12.
    assert foreground_background_miou(mask, gt_mask) == pytest.approx((4 / 6 + 10 / 12) / 2)


def test_miou_both_full_counts_empty_background() -> None:
    full = np.ones((3, 3), bool)

    assert jaccard_index(~full, ~full) == 1.0
    assert foreground_background_miou(full, full) == 1.0


def test_cnr_hand_computed() -> None:
    gt_mask = _top_left_gt()
    activation_map = np.zeros((4, 4))
    activation_map[0, :2] = 1.0
    activation_map[3, 2:] = 1.0

    # Inside {1, 1, 0, 0}: mean 1/2, var 1/4. Outside: two 1s in 12, mean 1/6, var 5/36.
    expected = (1 / 2 - 1 / 6) / math.sqrt(1 / 4 + 5 / 36)
    assert contrast_to_noise(activation_map, gt_mask, ~gt_mask) == pytest.approx(expected)
    assert contrast_to_noise(1.0 - activation_map, gt_mask, ~gt_mask) == pytest.approx(-expected)


def test_cnr_undefined_cases_nan() -> None:
    gt_mask = _top_left_gt()

    assert math.isnan(contrast_to_noise(np.zeros((4, 4)), gt_mask, ~gt_mask))
    assert math.isnan(contrast_to_noise(np.eye(4), np.ones((4, 4), bool), np.zeros((4, 4), bool)))


def test_top1_hit_and_miss() -> None:
    gt_mask = _top_left_gt()
    activation_map = np.zeros((4, 4))
    activation_map[1, 1] = 1.0

    assert top1_hit(activation_map, gt_mask) == 1.0
    activation_map[3, 3] = 2.0
    assert top1_hit(activation_map, gt_mask) == 0.0


def test_top1_tie_uses_first_argmax() -> None:
    gt_mask = np.zeros((2, 2), bool)
    gt_mask[1, 1] = True

    assert top1_hit(np.array([[1.0, 0.0], [0.0, 1.0]]), gt_mask) == 0.0


def test_auc_hand_computed() -> None:
    gt_mask = np.array([[True, False], [True, False]])

    # Positives 0.9, 0.3 against negatives 0.4, 0.1: 3 of 4 pairs ordered correctly.
    assert auc_roc(np.array([[0.9, 0.4], [0.3, 0.1]]), gt_mask) == pytest.approx(0.75)
    # A tie between a positive and a negative counts one half.
    assert auc_roc(np.array([[0.5, 0.5], [0.9, 0.1]]), gt_mask) == pytest.approx(0.875)


def test_auc_single_class_nan() -> None:
    assert math.isnan(auc_roc(np.eye(3), np.ones((3, 3), bool)))


def test_multi_threshold_iou_hand_computed() -> None:
    gt_mask = _top_left_gt()
    normalized = np.zeros((4, 4))
    normalized[0, 0], normalized[0, 1], normalized[1, 0], normalized[1, 1] = 1.0, 0.45, 0.25, 0.15
    normalized[3, 3] = 0.35

    # IoU at 0.1 .. 0.5: 4/5, 3/5, 2/5, 2/4, 1/4.
    assert multi_threshold_iou(normalized, gt_mask) == pytest.approx((0.8 + 0.6 + 0.4 + 0.5 + 0.25) / 5)


def test_score_pair_gmm_convention() -> None:
    gt_mask = _top_left_gt()
    activation_map = np.zeros((4, 4))
    activation_map[:2, :2] = [[1.0, 0.8], [0.6, 0.9]]
    activation_map[2, 2] = 0.7
    mask = activation_map > 0.5

    scores = score_pair(activation_map, gt_mask, mask)
    threshold_free = scores.keep_threshold_free

    assert threshold_free.convention is MetricConvention.GMM_MIOU
    assert threshold_free.empty_mask_policy is EmptyMaskPolicy.KEEP_THRESHOLD_FREE
    # Foreground 4/5; background: 11 pixels of both, 12 of either.
    assert threshold_free.miou == pytest.approx((4 / 5 + 11 / 12) / 2)
    assert threshold_free.top1 == 1.0
    # Of 48 (positive, negative) pairs only 0.6 < 0.7 is ordered wrongly.
    assert threshold_free.auc_roc == pytest.approx(47 / 48)
    assert threshold_free.cnr == pytest.approx(contrast_to_noise(activation_map, gt_mask, ~gt_mask))
    assert threshold_free.cnr_signed == threshold_free.cnr
    assert threshold_free.issues == ()
    assert not threshold_free.mask_empty
    assert scores.zero_all.values() == threshold_free.values()
    assert scores.zero_all.empty_mask_policy is EmptyMaskPolicy.ZERO_ALL


def test_score_pair_empty_mask_policies() -> None:
    gt_mask = _top_left_gt()
    activation_map = np.zeros((4, 4))
    activation_map[0, 0] = 1.0
    activation_map[3, 3] = 0.5

    scores = score_pair(activation_map, gt_mask, np.zeros((4, 4), bool))

    assert scores.zero_all.values() == {"miou": 0.0, "cnr": 0.0, "cnr_signed": 0.0, "top1": 0.0, "auc_roc": 0.0}
    threshold_free = scores.keep_threshold_free
    assert threshold_free.mask_empty
    assert "mask_empty" in threshold_free.issues
    # Foreground IoU 0; background IoU 12/16.
    assert threshold_free.miou == pytest.approx(12 / 16 / 2)
    assert threshold_free.top1 == 1.0
    # Positive 1.0 beats all 12 negatives; each positive 0 ties 11 zeros and loses to 0.5.
    assert threshold_free.auc_roc == pytest.approx((12 + 3 * 11 * 0.5) / 48)
    assert threshold_free.cnr > 0


def test_score_pair_signed_cnr_negative() -> None:
    gt_mask = _top_left_gt()
    activation_map = np.ones((4, 4))
    activation_map[:2, :2] = [[0.0, 0.2], [0.1, 0.3]]
    mask = activation_map < 0.5

    threshold_free = score_pair(activation_map, gt_mask, mask).keep_threshold_free

    assert threshold_free.cnr_signed < 0
    assert threshold_free.cnr == pytest.approx(-threshold_free.cnr_signed)
    assert threshold_free.top1 == 0.0
    assert threshold_free.auc_roc == 0.0


def test_score_pair_constant_map_counted() -> None:
    gt_mask = _top_left_gt()

    threshold_free = score_pair(np.zeros((4, 4)), gt_mask, np.zeros((4, 4), bool)).keep_threshold_free

    assert math.isnan(threshold_free.top1)
    assert math.isnan(threshold_free.cnr)
    assert threshold_free.auc_roc == 0.5
    assert "constant_map" in threshold_free.issues
    assert "cnr_undefined" in threshold_free.issues


def test_score_pair_full_gt_auc_nan() -> None:
    full = np.ones((4, 4), bool)

    threshold_free = score_pair(np.eye(4), full, full).keep_threshold_free

    assert math.isnan(threshold_free.auc_roc)
    assert "auc_single_class" in threshold_free.issues
    assert threshold_free.miou == 1.0


def _corner_map() -> np.ndarray:
    activation_map = np.zeros((4, 4))
    activation_map[0, 0] = 1.0
    activation_map[3, 3] = 0.5
    return activation_map


def test_empty_gt_nonempty_mask_gmm() -> None:
    empty_gt = np.zeros((4, 4), bool)
    mask = np.zeros((4, 4), bool)
    mask[0, :2] = True

    scores = score_pair(_corner_map(), empty_gt, mask)

    threshold_free = scores.keep_threshold_free
    # Foreground IoU 0 / 2, and background IoU 14 / 16 (the unmasked pixels of the image).
    assert threshold_free.miou == pytest.approx((0.0 + 14 / 16) / 2)
    assert threshold_free.top1 == 0.0
    assert math.isnan(threshold_free.auc_roc)
    assert math.isnan(threshold_free.cnr)
    assert math.isnan(threshold_free.cnr_signed)
    assert not threshold_free.mask_empty
    assert threshold_free.issues == ("empty_gt", "auc_single_class", "cnr_undefined")
    # A mask with pixels is not zeroed, so the reference policy keeps the NaNs.
    zeroed = scores.zero_all
    assert zeroed.miou == threshold_free.miou
    assert zeroed.top1 == 0.0
    assert math.isnan(zeroed.auc_roc)
    assert math.isnan(zeroed.cnr)
    assert zeroed.issues == threshold_free.issues


def test_empty_gt_empty_mask_gmm() -> None:
    empty_gt = np.zeros((4, 4), bool)

    scores = score_pair(_corner_map(), empty_gt, np.zeros((4, 4), bool))

    threshold_free = scores.keep_threshold_free
    # Both foregrounds empty (0/0 counts 1.0) and both backgrounds the whole image.
    assert threshold_free.miou == 1.0
    assert threshold_free.top1 == 0.0
    assert math.isnan(threshold_free.auc_roc)
    assert math.isnan(threshold_free.cnr)
    assert threshold_free.mask_empty
    assert threshold_free.issues == ("empty_gt", "auc_single_class", "cnr_undefined", "mask_empty")
    assert scores.zero_all.values() == {"miou": 0.0, "cnr": 0.0, "cnr_signed": 0.0, "top1": 0.0, "auc_roc": 0.0}
    assert scores.zero_all.issues == threshold_free.issues


def test_empty_gt_constant_map_top1_zero() -> None:
    threshold_free = score_pair(np.ones((4, 4)), np.zeros((4, 4), bool), np.zeros((4, 4), bool)).keep_threshold_free

    assert threshold_free.top1 == 0.0
    assert threshold_free.issues == ("empty_gt", "constant_map", "auc_single_class", "cnr_undefined", "mask_empty")


def test_empty_gt_multi_threshold() -> None:
    empty_gt = np.zeros((4, 4), bool)
    # A box wholly outside the 4x4 image rasterizes to no pixel.
    outside_box = rasterize_boxes([(5.0, 5.0, 2.0, 2.0)], (4, 4))

    scores = score_pair(_corner_map(), empty_gt, convention="multi_threshold", box_masks=outside_box)
    constant = score_pair(np.full((4, 4), 0.3), empty_gt, convention="multi_threshold").keep_threshold_free

    threshold_free = scores.keep_threshold_free
    # The min-max map reaches 1.0 at (0, 0), above every threshold, so each IoU is 0 / n.
    assert threshold_free.miou == 0.0
    assert threshold_free.top1 == 0.0
    assert math.isnan(threshold_free.auc_roc)
    assert math.isnan(threshold_free.cnr)
    assert math.isnan(threshold_free.cnr_signed)
    assert threshold_free.issues == ("empty_gt", "auc_single_class", "cnr_undefined")
    assert scores.zero_all.miou == 0.0
    assert math.isnan(scores.zero_all.auc_roc)
    # A constant map has no pixel above any threshold, so every IoU is 0/0 = 1.0.
    assert constant.miou == 1.0
    assert constant.top1 == 0.0
    assert "constant_map" in constant.issues


def test_empty_gt_nan_map_flagged() -> None:
    activation_map = np.full((4, 4), np.nan)

    threshold_free = score_pair(activation_map, np.zeros((4, 4), bool), np.zeros((4, 4), bool)).keep_threshold_free

    assert threshold_free.issues == ("empty_gt", "non_finite_map")
    assert math.isnan(threshold_free.top1)


def test_empty_gt_record_issues() -> None:
    record = score_pair(_corner_map(), np.zeros((4, 4), bool), np.zeros((4, 4), bool)).as_record()

    assert record["issues"].split(";")[0] == "empty_gt"
    assert math.isnan(record["keep_threshold_free/auc_roc"])
    assert record["zero_all/auc_roc"] == 0.0


def test_score_pair_nan_map_not_raising() -> None:
    gt_mask = _top_left_gt()
    activation_map = np.full((4, 4), np.nan)

    scores = score_pair(activation_map, gt_mask, np.zeros((4, 4), bool))

    assert all(math.isnan(value) for value in scores.keep_threshold_free.values().values())
    assert scores.keep_threshold_free.issues == ("non_finite_map",)
    assert scores.zero_all.miou == 0.0


def test_score_pair_multi_threshold_boxes() -> None:
    gt_boxes = rasterize_boxes([(0, 0, 2, 1), (2, 0, 2, 1)], (1, 8))
    gt_mask = gt_boxes.any(axis=0)
    activation_map = np.array([[1.0, 0.0, 0.5, 0.5, 0.0, 0.0, 0.5, 0.5]])

    per_box = score_pair(activation_map, gt_mask, convention="multi_threshold", box_masks=gt_boxes)
    union = score_pair(activation_map, gt_mask, convention=MetricConvention.MULTI_THRESHOLD)

    # Outside: mean 1/4, var 1/16. Box A: mean 1/2, var 1/4. Box B: mean 1/2, var 0.
    box_a = 0.25 / math.sqrt(0.25 + 0.0625)
    box_b = 0.25 / math.sqrt(0.0625)
    assert per_box.keep_threshold_free.cnr == pytest.approx((box_a + box_b) / 2)
    assert per_box.keep_threshold_free.convention is MetricConvention.MULTI_THRESHOLD
    # The union of both boxes: mean 1/2, var 1/8.
    assert union.keep_threshold_free.cnr == pytest.approx(0.25 / math.sqrt(0.125 + 0.0625))
    # Foreground IoU at 0.1 .. 0.4 is 3/6 and at 0.5 it is 1/4 (`>` is strict).
    assert per_box.keep_threshold_free.miou == pytest.approx((4 * 0.5 + 0.25) / 5)
    assert not per_box.keep_threshold_free.mask_empty
    assert per_box.zero_all.values() == per_box.keep_threshold_free.values()


def test_multi_threshold_cnr_abs_per_box() -> None:
    gt_boxes = rasterize_boxes([(0, 0, 1, 2), (1, 0, 1, 2)], (2, 4))
    activation_map = np.array([[1.0, 0.0, 0.5, 0.4], [0.8, 0.1, 0.6, 0.5]])

    threshold_free = score_pair(activation_map, gt_boxes.any(axis=0), convention="multi_threshold", box_masks=gt_boxes)
    threshold_free = threshold_free.keep_threshold_free

    outside = ~gt_boxes.any(axis=0)
    box_values = [contrast_to_noise(activation_map, box, outside) for box in gt_boxes]
    assert box_values[0] > 0 > box_values[1]
    assert threshold_free.cnr_signed == pytest.approx(np.mean(box_values))
    assert threshold_free.cnr == pytest.approx(np.mean(np.abs(box_values)))


def test_rasterize_boxes_pixel_centres() -> None:
    masks = rasterize_boxes([(0.5, 1.0, 2.0, 1.0), (3.0, 0.0, 5.0, 9.0)], (3, 4))

    expected_first = np.zeros((3, 4), bool)
    expected_first[1, 0:2] = True
    np.testing.assert_array_equal(masks[0], expected_first)
    assert masks[1][:, 3].all()
    assert int(masks[1].sum()) == 3


@pytest.mark.parametrize("box", [(0, 0, -1, 2), (0, 0, float("nan"), 2)])
def test_rasterize_boxes_rejects_invalid(box: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="Box 0"):
        rasterize_boxes([box], (4, 4))


def test_score_pair_input_guards() -> None:
    gt_mask = _top_left_gt()

    with pytest.raises(ValueError, match="upsample"):
        score_pair(np.zeros((2, 2)), gt_mask, gt_mask)
    with pytest.raises(ValueError, match="pass mask"):
        score_pair(np.eye(4), gt_mask)
    with pytest.raises(ValueError, match="mask shape"):
        score_pair(np.eye(4), gt_mask, np.zeros((2, 2), bool))
    with pytest.raises(ValueError, match="box_masks"):
        score_pair(np.eye(4), gt_mask, convention="multi_threshold", box_masks=gt_mask)
    with pytest.raises(ValueError, match="not a valid MetricConvention"):
        score_pair(np.eye(4), gt_mask, gt_mask, convention="bogus")


def test_as_record_keys() -> None:
    gt_mask = _top_left_gt()

    record = score_pair(np.eye(4), gt_mask, gt_mask).as_record()

    assert record["convention"] == "gmm_miou"
    assert record["mask_empty"] is False
    for policy in ("zero_all", "keep_threshold_free"):
        for name in ("miou", "cnr", "cnr_signed", "top1", "auc_roc"):
            assert f"{policy}/{name}" in record


def test_auc_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(0)
    activation_map = np.round(rng.random((512, 512)), 2).astype(np.float32)
    gt_mask = np.zeros((512, 512), bool)
    gt_mask[100:260, 40:300] = True
    activation_map[gt_mask] += 0.1

    expected = roc_auc_score(gt_mask.ravel(), activation_map.ravel())

    assert auc_roc(activation_map, gt_mask) == pytest.approx(expected, abs=1e-12)
    assert 0.5 < expected < 1.0
