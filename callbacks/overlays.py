"""Overlay images of grounding results: image, heat map, true boxes and mask outline."""

from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image, ImageDraw
from skimage.segmentation import find_boundaries

# Anchor colours of a blue-cyan-yellow-red heat map, evenly spaced over [0, 1].
_HEAT_ANCHORS = np.array(
    [[0, 0, 128], [0, 80, 255], [0, 220, 255], [255, 230, 0], [255, 80, 0], [160, 0, 0]], dtype=np.float64
)
BOX_COLOUR = (255, 255, 255)
MASK_COLOUR = (0, 255, 0)


def colourize(activation_map: np.ndarray) -> np.ndarray:
    """Map ``[H, W]`` values in ``[0, 1]`` to ``[H, W, 3]`` uint8 heat-map colours (low blue, high red)."""
    values = np.clip(np.nan_to_num(activation_map, nan=0.0), 0.0, 1.0) * (len(_HEAT_ANCHORS) - 1)
    lower = np.floor(values).astype(int).clip(0, len(_HEAT_ANCHORS) - 2)
    fraction = (values - lower)[..., None]
    colours = _HEAT_ANCHORS[lower] * (1 - fraction) + _HEAT_ANCHORS[lower + 1] * fraction
    return colours.round().astype(np.uint8)


def to_gray_rgb(pixel_values: np.ndarray) -> np.ndarray:
    """Turn a ``[3, H, W]`` or ``[H, W]`` image in ``[-1, 1]`` into ``[H, W, 3]`` uint8 gray."""
    image = pixel_values.mean(axis=0) if pixel_values.ndim == 3 else pixel_values
    gray = ((np.clip(image, -1.0, 1.0) + 1.0) * 127.5).round().astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


def render_overlay(
    pixel_values: np.ndarray,
    activation_map: np.ndarray,
    mask: np.ndarray | None,
    boxes: list[tuple[float, float, float, float]],
    alpha: float = 0.45,
    min_side: int = 256,
) -> Image.Image:
    """Render the image beside the heat map blended over it, with boxes and the mask outline.

    Args:
        pixel_values: ``[3, H, W]`` image in ``[-1, 1]``.
        activation_map: ``[H, W]`` map in ``[0, 1]``.
        mask: ``[H, W]`` binary mask whose outline is drawn in green, or ``None``.
        boxes: true boxes ``(x, y, w, h)`` in pixels of the ``H x W`` image, drawn in white.
        alpha: opacity of the heat map.
        min_side: small images are enlarged by an integer factor to at least this height.

    Returns:
        An RGB image of size ``2kW x kH`` with ``k = max(1, ceil(min_side / H))``.
    """
    gray = to_gray_rgb(pixel_values)
    heat = colourize(activation_map)
    blended = (gray * (1 - alpha) + heat * alpha).round().astype(np.uint8)
    if mask is not None and mask.any():
        blended[find_boundaries(mask.astype(bool), mode="inner")] = MASK_COLOUR

    panels = [Image.fromarray(gray), Image.fromarray(blended)]
    for panel in panels:
        draw = ImageDraw.Draw(panel)
        for x, y, w, h in boxes:
            draw.rectangle([x, y, x + w - 1, y + h - 1], outline=BOX_COLOUR, width=max(1, gray.shape[0] // 128))

    canvas = Image.new("RGB", (2 * gray.shape[1], gray.shape[0]))
    canvas.paste(panels[0], (0, 0))
    canvas.paste(panels[1], (gray.shape[1], 0))
    factor = max(1, -(-min_side // gray.shape[0]))
    if factor > 1:
        canvas = canvas.resize((canvas.width * factor, canvas.height * factor), Image.Resampling.NEAREST)
    return canvas


def side_by_side(images: list[Image.Image]) -> Image.Image:
    """Concatenate images of equal height horizontally."""
    width = sum(image.width for image in images)
    canvas = Image.new("RGB", (width, images[0].height))
    offset = 0
    for image in images:
        canvas.paste(image, (offset, 0))
        offset += image.width
    return canvas


def add_caption(image: Image.Image, lines: list[str], line_height: int = 14) -> Image.Image:
    """Return the image below a white band with the given text lines, wrapped to its width.

    Saved PNGs then name the pair and the methods they show, as the W&B caption does.
    """
    # PIL's default bitmap font is about 6 pixels per character.
    characters = max(20, image.width // 6)
    wrapped = [piece for line in lines for piece in textwrap.wrap(line, characters) or [""]]
    band = line_height * len(wrapped) + 4
    canvas = Image.new("RGB", (image.width, image.height + band), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for index, line in enumerate(wrapped):
        draw.text((4, 2 + index * line_height), line, fill=(0, 0, 0))
    canvas.paste(image.convert("RGB"), (0, band))
    return canvas


def pad_to_common_size(images: list[Image.Image], fill: tuple[int, int, int] = (255, 255, 255)) -> list[Image.Image]:
    """Pad images at the right and bottom to the largest width and height among them.

    W&B shows a list of images under one key correctly only when they share a size, and word-map
    figures are as wide as their phrase has words.
    """
    width = max(image.width for image in images)
    height = max(image.height for image in images)
    padded = []
    for image in images:
        canvas = Image.new("RGB", (width, height), fill)
        canvas.paste(image.convert("RGB"), (0, 0))
        padded.append(canvas)
    return padded


def render_word_maps(
    pixel_values: np.ndarray,
    main_map: np.ndarray,
    word_maps: list[tuple[str, np.ndarray]],
    min_side: int = 256,
) -> Image.Image:
    """Render the image, the main map and one labelled heat map per word token, side by side.

    Args:
        pixel_values: ``[3, H, W]`` image in ``[-1, 1]``.
        main_map: ``[H, W]`` main map in ``[0, 1]``.
        word_maps: per word token, its text and its map at any resolution (min-max scaled here).
        min_side: small images are enlarged by an integer factor to at least this height, before
            the labels are drawn, so that the labels stay readable.

    Returns:
        An RGB image of ``2 + len(word_maps)`` square panels.
    """
    from grounding.masks import min_max_normalize, upsample_map

    gray = to_gray_rgb(pixel_values)
    size = gray.shape[:2]
    factor = max(1, -(-min_side // size[0]))
    maps = [("", main_map)] + [(word, upsample_map(min_max_normalize(word_map).values, size)) for word, word_map in word_maps]

    panels = [Image.fromarray(gray)]
    for word, activation_map in maps:
        blended = (gray * 0.5 + colourize(activation_map) * 0.5).astype(np.uint8)
        panels.append(Image.fromarray(blended))
    panels = [panel.resize((panel.width * factor, panel.height * factor), Image.Resampling.NEAREST) for panel in panels]
    for panel, (word, _) in zip(panels[1:], maps):
        ImageDraw.Draw(panel).text((4, 4), word, fill=(255, 255, 255))
    return side_by_side(panels)
