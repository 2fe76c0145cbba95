"""Real radiographs through the training transform: 60 PNG chest X-rays stored outside the repository."""

from pathlib import Path

import pytest
import torch

from datamodules.datamodule import collate_training
from datamodules.image_io import DecodeMode
from datamodules.mimic_cxr import CaptionImageDataset

REAL_CXR = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "real-cxr"
PATHS = sorted(str(path) for path in REAL_CXR.glob("*.png"))

pytestmark = pytest.mark.skipif(len(PATHS) < 60, reason=f"the 60 real radiographs were not found under {REAL_CXR}")


def test_real_images_through_transform() -> None:
    dataset = CaptionImageDataset(PATHS, ["caption"] * len(PATHS), 128, DecodeMode.STRICT, random_caption=False)

    batch = collate_training([dataset[index] for index in range(len(dataset))], image_size=128)
    pixel_values = batch["pixel_values"]

    assert batch["failed_samples"] == []
    assert pixel_values.shape == (60, 3, 128, 128)
    assert pixel_values.min() >= -1.0
    assert pixel_values.max() <= 1.0
    # Every image keeps its contrast: a wide spread of values, not a constant or clipped image.
    spread = pixel_values[:, 0].flatten(1).std(dim=1)
    assert (spread > 0.1).all()
    clipped = ((pixel_values[:, 0] <= -1.0) | (pixel_values[:, 0] >= 1.0)).float().mean(dim=(1, 2))
    assert (clipped < 0.2).all()


def test_real_images_lungs_darker_than_mediastinum() -> None:
    dataset = CaptionImageDataset(PATHS, ["caption"] * len(PATHS), 128, DecodeMode.STRICT)
    images = torch.stack([dataset[index]["pixel_values"][0] for index in range(len(dataset))])

    # Averaged over 60 frontal views, the lung fields (upper middle of each half) are darker
    # than the mediastinum and spine in the middle columns.
    lungs = torch.cat([images[:, 30:70, 25:45], images[:, 30:70, 83:103]], dim=2).mean()
    mediastinum = images[:, 30:70, 56:72].mean()
    assert lungs < mediastinum - 0.1
