"""Tests of the phantom drawing: side convention, boxes that mark the drawn findings."""

from __future__ import annotations

import numpy as np
import pytest

from datamodules.phantom_drawing import render_frontal_phantom, render_lateral_phantom
from datamodules.phantom_findings import ALLOWED_ZONES, FindingCategory, FindingSpec, Severity, Side, Zone


@pytest.mark.parametrize(
    "category",
    [
        FindingCategory.ATELECTASIS,
        FindingCategory.CONSOLIDATION,
        FindingCategory.LUNG_OPACITY,
        FindingCategory.PLEURAL_EFFUSION,
        FindingCategory.PNEUMONIA,
        FindingCategory.PNEUMOTHORAX,
    ],
)
def test_patient_right_is_image_left(category: FindingCategory) -> None:
    zone = ALLOWED_ZONES[category][0]
    for side, on_left in ((Side.RIGHT, True), (Side.LEFT, False)):
        spec = FindingSpec(category, side, zone, Severity.MODERATE)
        _, boxes = render_frontal_phantom([spec], 200, 180, np.random.default_rng(0))
        x, _, width, _ = boxes[0][0]

        assert (x + width / 2 < 100) == on_left


def test_box_marks_drawn_finding() -> None:
    spec = FindingSpec(FindingCategory.CONSOLIDATION, Side.LEFT, Zone.MIDDLE, Severity.LARGE)
    with_finding, boxes = render_frontal_phantom([spec], 160, 160, np.random.default_rng(5))
    without_finding, _ = render_frontal_phantom([], 160, 160, np.random.default_rng(5))
    x, y, width, height = (int(value) for value in boxes[0][0])

    inside_difference = with_finding[y : y + height, x : x + width].astype(float) - without_finding[y : y + height, x : x + width]
    assert inside_difference.mean() > 40


def test_cardiomegaly_enlarges_heart_box() -> None:
    normal_heart = FindingSpec(FindingCategory.CARDIOMEGALY, Side.LEFT, Zone.LOWER, Severity.SMALL)
    large_heart = FindingSpec(FindingCategory.CARDIOMEGALY, Side.LEFT, Zone.LOWER, Severity.LARGE)
    _, small_boxes = render_frontal_phantom([normal_heart], 200, 200, np.random.default_rng(1))
    _, large_boxes = render_frontal_phantom([large_heart], 200, 200, np.random.default_rng(1))

    assert large_boxes[0][0][2] > small_boxes[0][0][2] * 1.15


def test_hidden_finding_raises() -> None:
    # In a one-pixel-high image the chest square is one pixel wide, so no lung pixel is left.
    spec = FindingSpec(FindingCategory.PNEUMONIA, Side.LEFT, Zone.UPPER, Severity.SMALL)

    with pytest.raises(ValueError, match="no visible pixels"):
        render_frontal_phantom([spec], 64, 1, np.random.default_rng(0))


def test_lateral_view_shape_and_type() -> None:
    image = render_lateral_phantom(90, 110, np.random.default_rng(0))

    assert image.shape == (110, 90)
    assert image.dtype == np.uint8
    assert image.std() > 10
