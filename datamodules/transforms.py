"""The image transform of the model input and the matching transform of box masks.

An image of height H and width W is resized so that its shorter side equals the target size S
(bilinear, antialiased), then center-cropped to ``S x S`` and scaled to ``[-1, 1]``. Boxes are
rasterized on the original ``H x W`` grid and go through the same resize and crop, so a mask
pixel is set when at least half of it is covered by a box after resampling.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

Box = tuple[float, float, float, float]
"""A box as ``(x, y, w, h)`` in pixels: left edge, top edge, width, height."""


@dataclass(frozen=True)
class CropGeometry:
    """The resize and center crop that maps an ``H x W`` image onto an ``S x S`` model input.

    Attributes:
        height: Original image height in pixels.
        width: Original image width in pixels.
        size: Side of the square output in pixels.
        resized_height: Height after resizing the shorter side to `size`.
        resized_width: Width after resizing the shorter side to `size`.
        top: First row of the crop in the resized image.
        left: First column of the crop in the resized image.
    """

    height: int
    width: int
    size: int
    resized_height: int
    resized_width: int
    top: int
    left: int

    @classmethod
    def for_image(cls, height: int, width: int, size: int) -> "CropGeometry":
        """Compute the geometry for an image of ``height x width`` pixels.

        Raises:
            ValueError: A dimension or the size is not positive.
        """
        if height <= 0 or width <= 0:
            raise ValueError(f"Image size must be positive, got {height}x{width} (height x width).")
        if size <= 0:
            raise ValueError(f"Target size must be positive, got {size}.")

        scale = size / min(height, width)
        resized_height = size if height <= width else max(size, round(height * scale))
        resized_width = size if width <= height else max(size, round(width * scale))
        top = (resized_height - size) // 2
        left = (resized_width - size) // 2
        return cls(height, width, size, resized_height, resized_width, top, left)

    def transform_box(self, box: Box) -> Box | None:
        """Map a box from original to crop coordinates and clip it to the crop.

        Returns:
            The ``(x, y, w, h)`` box in crop pixels, or None when nothing of it is left.
        """
        x, y, w, h = box
        scale_x = self.resized_width / self.width
        scale_y = self.resized_height / self.height

        x0 = min(max(x * scale_x - self.left, 0.0), float(self.size))
        y0 = min(max(y * scale_y - self.top, 0.0), float(self.size))
        x1 = min(max((x + w) * scale_x - self.left, 0.0), float(self.size))
        y1 = min(max((y + h) * scale_y - self.top, 0.0), float(self.size))
        if x1 - x0 <= 0.0 or y1 - y0 <= 0.0:
            return None
        return (x0, y0, x1 - x0, y1 - y0)


def resize_and_crop(image: torch.Tensor, geometry: CropGeometry) -> torch.Tensor:
    """Resize the shorter side (bilinear, antialiased) and center-crop a float image.

    Args:
        image: ``FloatTensor[C, H, W]`` of the size in `geometry`. A different size is
            accepted (a JPEG decoded at reduced scale) and resized to the same output grid.

    Returns:
        ``FloatTensor[C, S, S]`` with values in the input's range (the antialiased bilinear
        filter has non-negative weights, so it cannot overshoot).
    """
    resized = F.interpolate(
        image.unsqueeze(0),
        size=(geometry.resized_height, geometry.resized_width),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    ).squeeze(0)
    return resized[:, geometry.top : geometry.top + geometry.size, geometry.left : geometry.left + geometry.size]


def to_model_input(gray: np.ndarray, size: int) -> torch.Tensor:
    """Turn a decoded grayscale radiograph into the model input.

    Args:
        gray: ``float32`` array ``[H, W]`` in ``[0, 1]``, as returned by `read_grayscale`.
        size: Side S of the square output in pixels.

    Returns:
        ``FloatTensor[3, S, S]`` in ``[-1, 1]``, the gray value repeated over three channels.
    """
    height, width = gray.shape
    geometry = CropGeometry.for_image(height, width, size)
    return to_model_input_with_geometry(gray, geometry)


def to_model_input_with_geometry(gray: np.ndarray, geometry: CropGeometry) -> torch.Tensor:
    """Like `to_model_input`, with a geometry computed from the original image size.

    A JPEG decoded at reduced scale keeps the output grid of its full-size geometry, so the
    image stays aligned with masks rasterized at the original size.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(gray, dtype=np.float32)).unsqueeze(0)
    cropped = resize_and_crop(tensor, geometry).clamp_(0.0, 1.0)
    return (cropped * 2.0 - 1.0).expand(3, -1, -1).contiguous()


def rasterize_boxes(boxes: list[Box], height: int, width: int) -> torch.Tensor:
    """Draw the union of boxes into a boolean mask at the original image size.

    A pixel ``(row, col)`` covers ``[col, col + 1) x [row, row + 1)``. A box covers the pixels
    from ``floor(x)`` to ``ceil(x + w)`` (exclusive) and likewise in y, clipped to the image, so
    integer boxes cover exactly ``w x h`` pixels.

    Args:
        boxes: Boxes as ``(x, y, w, h)`` in original pixels.
        height: Image height H.
        width: Image width W.

    Returns:
        ``BoolTensor[H, W]``.
    """
    mask = torch.zeros(height, width, dtype=torch.bool)
    for x, y, w, h in boxes:
        col0 = max(0, math.floor(x))
        row0 = max(0, math.floor(y))
        col1 = min(width, math.ceil(x + w))
        row1 = min(height, math.ceil(y + h))
        if col1 > col0 and row1 > row0:
            mask[row0:row1, col0:col1] = True
    return mask


def transform_mask(mask: torch.Tensor, geometry: CropGeometry) -> torch.Tensor:
    """Resize and crop a boolean mask exactly as the image.

    The mask is resampled as a float with the image's antialiased bilinear filter and then
    thresholded at 0.5, so a crop pixel is set when at least half of its filter weight lies
    inside the boxes.

    Args:
        mask: ``BoolTensor[H, W]`` at the original size of `geometry`.

    Returns:
        ``BoolTensor[S, S]``.
    """
    resampled = resize_and_crop(mask.to(torch.float32).unsqueeze(0), geometry).squeeze(0)
    return resampled >= 0.5


def boxes_to_crop_mask(boxes: list[Box], geometry: CropGeometry) -> torch.Tensor:
    """Rasterize boxes at the original size and transform them to a ``BoolTensor[S, S]`` mask."""
    return transform_mask(rasterize_boxes(boxes, geometry.height, geometry.width), geometry)
