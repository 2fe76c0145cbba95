"""Tests of the resize and center-crop transform of images, boxes and masks, against hand computations."""

import numpy as np
import pytest
import torch

from datamodules.transforms import CropGeometry, boxes_to_crop_mask, rasterize_boxes, to_model_input


def expected_mask(size: int, rows: tuple[int, int], cols: tuple[int, int]) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = True
    return mask


def test_geometry_landscape() -> None:
    geometry = CropGeometry.for_image(height=1024, width=2048, size=256)

    assert (geometry.resized_height, geometry.resized_width) == (256, 512)
    assert (geometry.top, geometry.left) == (0, 128)


def test_geometry_portrait() -> None:
    geometry = CropGeometry.for_image(height=2048, width=1024, size=256)

    assert (geometry.resized_height, geometry.resized_width) == (512, 256)
    assert (geometry.top, geometry.left) == (128, 0)


def test_geometry_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="positive"):
        CropGeometry.for_image(0, 100, 64)
    with pytest.raises(ValueError, match="Target size"):
        CropGeometry.for_image(100, 100, 0)


def test_box_inside_crop_landscape() -> None:
    # Scale 1/4, crop starts at column 128 of the resized image:
    # x 600..800 -> 150..200 -> 22..72, y 100..500 -> 25..125.
    geometry = CropGeometry.for_image(1024, 2048, 256)
    box = (600.0, 100.0, 200.0, 400.0)

    assert geometry.transform_box(box) == pytest.approx((22.0, 25.0, 50.0, 100.0))
    mask = boxes_to_crop_mask([box], geometry)
    assert torch.equal(mask, expected_mask(256, (25, 125), (22, 72)))


def test_box_crossing_crop_is_clipped() -> None:
    # x 400..600 -> 100..150 -> -28..22, so only columns 0..22 stay.
    geometry = CropGeometry.for_image(1024, 2048, 256)
    box = (400.0, 0.0, 200.0, 1024.0)

    assert geometry.transform_box(box) == pytest.approx((0.0, 0.0, 22.0, 256.0))
    mask = boxes_to_crop_mask([box], geometry)
    assert torch.equal(mask, expected_mask(256, (0, 256), (0, 22)))


def test_box_touching_crop_edge() -> None:
    # The crop covers original columns 512..1536; x 1400..1536 -> 222..256 in crop pixels.
    geometry = CropGeometry.for_image(1024, 2048, 256)
    box = (1400.0, 200.0, 136.0, 100.0)

    assert geometry.transform_box(box) == pytest.approx((222.0, 50.0, 34.0, 25.0))
    mask = boxes_to_crop_mask([box], geometry)
    assert torch.equal(mask, expected_mask(256, (50, 75), (222, 256)))


def test_box_outside_crop_vanishes() -> None:
    geometry = CropGeometry.for_image(1024, 2048, 256)
    box = (0.0, 0.0, 400.0, 1024.0)

    assert geometry.transform_box(box) is None
    assert not boxes_to_crop_mask([box], geometry).any()


def test_portrait_boxes_union() -> None:
    # Portrait 2048 x 1024 at scale 1/4, crop starts at row 128 of the resized image.
    geometry = CropGeometry.for_image(2048, 1024, 256)
    boxes = [(100.0, 600.0, 100.0, 200.0), (800.0, 1400.0, 200.0, 400.0)]

    # Box 1: x 25..50, y 150..200 -> 22..72. Box 2: x 200..250, y 350..450 -> 222..322, clipped to 256.
    mask = boxes_to_crop_mask(boxes, geometry)
    expected = expected_mask(256, (22, 72), (25, 50)) | expected_mask(256, (222, 256), (200, 250))
    assert torch.equal(mask, expected)


def test_rasterize_fractional_and_outside() -> None:
    mask = rasterize_boxes([(1.5, 2.2, 2.0, 1.0), (-5.0, -5.0, 6.0, 6.0), (20.0, 20.0, 5.0, 5.0)], height=10, width=10)

    expected = torch.zeros(10, 10, dtype=torch.bool)
    expected[2:4, 1:4] = True
    expected[0:1, 0:1] = True
    assert torch.equal(mask, expected)


def test_model_input_range_and_channels() -> None:
    gray = np.tile(np.linspace(0.0, 1.0, 300, dtype=np.float32), (200, 1))
    pixel_values = to_model_input(gray, 64)

    assert pixel_values.shape == (3, 64, 64)
    assert pixel_values.dtype == torch.float32
    assert torch.equal(pixel_values[0], pixel_values[1])
    assert torch.equal(pixel_values[0], pixel_values[2])
    assert pixel_values.min() >= -1.0
    assert pixel_values.max() <= 1.0
    # A horizontal ramp stays a strictly increasing ramp after resize and crop.
    assert (pixel_values[0, 0, 1:] > pixel_values[0, 0, :-1]).all()


def test_model_input_center_crop() -> None:
    # Left half black, right half white; the crop keeps the middle, so both halves remain.
    gray = np.zeros((100, 200), dtype=np.float32)
    gray[:, 100:] = 1.0
    pixel_values = to_model_input(gray, 50)

    assert torch.allclose(pixel_values[0, :, :20], torch.tensor(-1.0))
    assert torch.allclose(pixel_values[0, :, 30:], torch.tensor(1.0))


def test_model_input_extremes_map_to_unit_range() -> None:
    assert torch.allclose(to_model_input(np.zeros((40, 40), dtype=np.float32), 32), torch.tensor(-1.0))
    assert torch.allclose(to_model_input(np.ones((40, 40), dtype=np.float32), 32), torch.tensor(1.0))
