"""Figure helpers: caption bands and padding to one size."""

from __future__ import annotations

import numpy as np
from PIL import Image

from callbacks.overlays import add_caption, pad_to_common_size


def test_caption_band_above_image() -> None:
    image = Image.new("RGB", (200, 50), (255, 0, 0))

    # 200 pixels hold 33 characters of the default font, so the second line wraps once.
    captioned = add_caption(image, ["pair-1 | Pleural Effusion", "small left pleural effusion with atelectasis"])

    pixels = np.asarray(captioned)
    band = captioned.height - image.height
    assert captioned.width == 200
    # Three lines of 14 pixels plus the margin.
    assert band == 3 * 14 + 4
    assert (pixels[band:] == [255, 0, 0]).all()
    assert (pixels[:band] < 128).any()


def test_padding_keeps_content_at_top_left() -> None:
    small = Image.new("RGB", (10, 20), (0, 0, 255))
    large = Image.new("RGB", (30, 15), (0, 255, 0))

    padded = pad_to_common_size([small, large])

    assert [image.size for image in padded] == [(30, 20), (30, 20)]
    assert padded[0].getpixel((9, 19)) == (0, 0, 255)
    assert padded[0].getpixel((29, 19)) == (255, 255, 255)
