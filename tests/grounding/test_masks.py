import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from grounding.masks import (
    MapFlag,
    OrphanFilter,
    gmm_mask,
    min_max_normalize,
    remove_orphans,
    upsample_map,
    upsample_mask,
)
from grounding.metrics import score_pair

REAL_CXR_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "real-cxr"


def _block_map(low: float = 0.1, high: float = 0.9) -> np.ndarray:
    activation_map = np.full((8, 8), low)
    activation_map[2:6, 2:6] = high
    return activation_map


def test_gmm_threshold_is_midpoint_of_means() -> None:
    result = gmm_mask(_block_map(), seed=0)

    assert result.flag is MapFlag.OK
    assert result.component_means[0] == pytest.approx(0.1, abs=1e-6)
    assert result.component_means[1] == pytest.approx(0.9, abs=1e-6)
    assert result.threshold == pytest.approx(0.5, abs=1e-6)


def test_gmm_foreground_is_higher_component() -> None:
    expected = np.zeros((8, 8), bool)
    expected[2:6, 2:6] = True
    # The 3x3 mean at a corner of a 4x4 block is 4/9 < 0.5, so orphan removal clears the corners.
    for corner in [(2, 2), (2, 5), (5, 2), (5, 5)]:
        expected[corner] = False

    for seed in range(4):
        result = gmm_mask(_block_map(), seed=seed)
        np.testing.assert_array_equal(result.mask, expected)


def test_gmm_inverted_map_selects_outside() -> None:
    result = gmm_mask(1.0 - _block_map(), seed=0, orphan_filter=OrphanFilter.NONE)

    assert not result.mask[2:6, 2:6].any()
    assert result.mask[:2].all()
    assert result.threshold == pytest.approx(0.5, abs=1e-6)


def test_gmm_same_seed_same_mask() -> None:
    rng = np.random.default_rng(3)
    activation_map = rng.random((64, 64)) ** 3

    first = gmm_mask(activation_map, seed=7)
    second = gmm_mask(activation_map, seed=7)

    np.testing.assert_array_equal(first.mask, second.mask)
    assert first.threshold == second.threshold


def test_gmm_constant_map_empty_flagged() -> None:
    result = gmm_mask(np.full((64, 64), 0.3))

    assert result.flag is MapFlag.CONSTANT_MAP
    assert not result.mask.any()
    assert result.mask.shape == (64, 64)
    assert math.isnan(result.threshold)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_gmm_non_finite_map_flagged(bad_value: float) -> None:
    activation_map = _block_map()
    activation_map[0, 0] = bad_value

    result = gmm_mask(activation_map)

    assert result.flag is MapFlag.NON_FINITE_MAP
    assert not result.mask.any()
    assert math.isnan(result.threshold)


def test_gmm_only_orphans_left_flagged_empty() -> None:
    activation_map = np.zeros((8, 8))
    activation_map[4, 4] = 1.0

    result = gmm_mask(activation_map)

    assert result.flag is MapFlag.EMPTY_MASK
    assert not result.mask.any()
    assert result.threshold == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("shape", [(64,), (2, 8, 8), (0, 4)])
def test_gmm_rejects_non_2d(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="2-D"):
        gmm_mask(np.zeros(shape))


def test_orphans_isolated_interior_pixel_removed() -> None:
    mask = np.zeros((5, 5), bool)
    mask[2, 2] = True

    assert not remove_orphans(mask).any()


def test_orphans_border_pixels_unchanged() -> None:
    mask = np.zeros((5, 5), bool)
    mask[0, 0] = True
    mask[4, 2] = True

    cleaned = remove_orphans(mask)

    np.testing.assert_array_equal(cleaned, mask)


def test_orphans_remove_keeps_holes() -> None:
    mask = np.ones((5, 5), bool)
    mask[2, 2] = False

    np.testing.assert_array_equal(remove_orphans(mask, OrphanFilter.REMOVE), mask)


def test_orphans_majority_fills_holes() -> None:
    mask = np.ones((5, 5), bool)
    mask[2, 2] = False

    assert remove_orphans(mask, OrphanFilter.MAJORITY).all()


def test_orphans_uses_input_not_scan_order() -> None:
    # A 2-pixel line: each pixel's 3x3 mean is 2/9, so both go, whatever the scan order.
    mask = np.zeros((6, 6), bool)
    mask[2, 2:4] = True
    # A full 3x3 block: its centre has mean 1 and its edges 6/9, its corners 4/9.
    mask_block = np.zeros((7, 7), bool)
    mask_block[2:5, 2:5] = True

    assert not remove_orphans(mask).any()
    cleaned_block = remove_orphans(mask_block)
    assert cleaned_block[3, 3]
    assert cleaned_block[2, 3]
    assert not cleaned_block[2, 2]
    assert int(cleaned_block.sum()) == 5


def test_orphans_input_not_modified() -> None:
    mask = np.zeros((5, 5), bool)
    mask[2, 2] = True

    remove_orphans(mask)

    assert mask[2, 2]


def test_min_max_normalize_range() -> None:
    normalized = min_max_normalize(np.array([[2.0, 4.0], [6.0, 10.0]]))

    assert normalized.flag is MapFlag.OK
    np.testing.assert_allclose(normalized.values, [[0.0, 0.25], [0.5, 1.0]])
    assert normalized.values.dtype == np.float32


def test_min_max_normalize_constant_zeros() -> None:
    normalized = min_max_normalize(np.full((3, 3), 5.0))

    assert normalized.flag is MapFlag.CONSTANT_MAP
    assert not normalized.values.any()


def test_min_max_normalize_nan_flagged() -> None:
    normalized = min_max_normalize(np.array([[0.0, np.nan], [1.0, 2.0]]))

    assert normalized.flag is MapFlag.NON_FINITE_MAP
    assert not normalized.values.any()


def test_upsample_map_bilinear_half_pixel() -> None:
    activation_map = np.array([[0.0, 1.0], [0.0, 1.0]])

    resized = upsample_map(activation_map, (4, 4))

    np.testing.assert_allclose(resized[0], [0.0, 0.25, 0.75, 1.0])
    np.testing.assert_allclose(resized[:, 1], [0.25, 0.25, 0.25, 0.25])
    assert resized.dtype == np.float32


def test_upsample_map_accepts_tensor() -> None:
    resized = upsample_map(torch.ones(64, 64, dtype=torch.float64), (512, 512))

    assert resized.shape == (512, 512)
    np.testing.assert_allclose(resized, 1.0)


def test_upsample_mask_rounds() -> None:
    mask = np.array([[False, True], [False, True]])

    resized = upsample_mask(mask, (4, 4))

    assert resized.dtype == bool
    np.testing.assert_array_equal(resized[0], [False, False, True, True])


def test_upsample_mask_half_rounds_to_background() -> None:
    # The middle output column of a width-2 to width-3 resize samples at 0.5 exactly.
    resized = upsample_mask(np.array([[False, True]]), (1, 3))

    np.testing.assert_array_equal(resized[0], [False, False, True])


@pytest.mark.parametrize("size", [(0, 4), (4,), (-1, 3)])
def test_upsample_rejects_bad_size(size: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="size"):
        upsample_map(np.zeros((4, 4)), size)


def test_gmm_on_real_radiograph() -> None:
    paths = sorted(REAL_CXR_DIR.glob("*.png"))[:3]
    if not paths:
        pytest.skip(f"No real radiographs (PNG) found in {REAL_CXR_DIR}.")
    gt_mask = np.zeros((512, 512), bool)
    gt_mask[150:350, 60:240] = True

    for path in paths:
        # The radiograph's intensities stand in for an activation map with a realistic histogram.
        with Image.open(path) as image:
            activation_map = np.asarray(image.convert("L").resize((64, 64), Image.Resampling.BILINEAR), np.float64)
        normalized = min_max_normalize(activation_map)
        result = gmm_mask(normalized.values, seed=0)
        scores = score_pair(
            upsample_map(normalized.values, (512, 512)), gt_mask, upsample_mask(result.mask, (512, 512))
        ).keep_threshold_free

        assert result.flag is MapFlag.OK, path.name
        assert 0.0 < result.threshold < 1.0, path.name
        assert np.all(normalized.values[result.mask] > result.threshold), path.name
        assert 0.0 < result.mask.mean() < 1.0, path.name
        assert 0.0 <= scores.miou <= 1.0, path.name
        assert 0.0 <= scores.auc_roc <= 1.0, path.name
        assert math.isfinite(scores.cnr), path.name
