"""Drawing of frontal and lateral chest radiograph phantoms with findings whose boxes are known."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from datamodules.phantom_findings import FindingCategory, FindingSpec, Severity, Side, Zone


# Anatomy in chest units: ``u`` runs from 0 at the image's left to 1 at its right over the
# central square of side ``min(width, height)``, ``v`` from 0 at the top to 1 at the bottom.
# Keeping the chest inside that square means that a shorter-side resize and a center crop
# keep every finding box.
_LUNG_CENTERS_U = {Side.RIGHT: 0.31, Side.LEFT: 0.69}
_LUNG_CENTER_V = 0.46
_LUNG_AXES = {Side.RIGHT: (0.155, 0.31), Side.LEFT: (0.15, 0.30)}
_ZONE_CENTERS_V = {Zone.UPPER: 0.28, Zone.MIDDLE: 0.45, Zone.LOWER: 0.62}
_SEVERITY_SCALES = {Severity.SMALL: 0.8, Severity.MODERATE: 1.0, Severity.LARGE: 1.2}


def _smoothstep(values: np.ndarray) -> np.ndarray:
    clipped = np.clip(values, 0.0, 1.0)
    return clipped * clipped * (3.0 - 2.0 * clipped)


def _ellipse_radius(
    u: np.ndarray, v: np.ndarray, center: tuple[float, float], axes: tuple[float, float], angle: float = 0.0
) -> np.ndarray:
    du = u - center[0]
    dv = v - center[1]
    cos_angle, sin_angle = np.cos(angle), np.sin(angle)
    along = (du * cos_angle + dv * sin_angle) / axes[0]
    across = (-du * sin_angle + dv * cos_angle) / axes[1]
    return np.sqrt(along * along + across * across)


def _soft_ellipse(
    u: np.ndarray,
    v: np.ndarray,
    center: tuple[float, float],
    axes: tuple[float, float],
    edge: float = 0.1,
    angle: float = 0.0,
) -> np.ndarray:
    """Return a mask in [0, 1] that is 1 inside the ellipse and falls to 0 over ``edge`` radii."""
    return _smoothstep((1.0 - _ellipse_radius(u, v, center, axes, angle)) / edge)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Return low-pass Gaussian noise with unit standard deviation."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma=max(sigma, 0.5))
    return noise / max(float(noise.std()), 1e-6)


def _box_of(region: np.ndarray) -> tuple[float, float, float, float] | None:
    rows = np.flatnonzero(region.any(axis=1))
    columns = np.flatnonzero(region.any(axis=0))
    if rows.size == 0:
        return None
    return (
        float(columns[0]),
        float(rows[0]),
        float(columns[-1] - columns[0] + 1),
        float(rows[-1] - rows[0] + 1),
    )


def _segment_distance(
    u: np.ndarray, v: np.ndarray, start: tuple[float, float], end: tuple[float, float]
) -> np.ndarray:
    direction = np.array(end) - np.array(start)
    length_squared = float(direction @ direction)
    fraction = np.clip(((u - start[0]) * direction[0] + (v - start[1]) * direction[1]) / length_squared, 0.0, 1.0)
    return np.hypot(u - start[0] - fraction * direction[0], v - start[1] - fraction * direction[1])


def _finding_region(
    spec: FindingSpec,
    u: np.ndarray,
    v: np.ndarray,
    lungs: dict[Side, np.ndarray],
    lung_centers: dict[Side, tuple[float, float]],
    rng: np.random.Generator,
) -> tuple[list[np.ndarray], float]:
    """Return the soft regions in [0, 1] of a lung finding and the intensity to blend into them.

    Edema returns one region per lung; every other lung finding returns one region.
    """
    scale = _SEVERITY_SCALES[spec.severity]
    lung = lungs[spec.side]
    lung_u, lung_v = lung_centers[spec.side]
    lung_axes = _LUNG_AXES[spec.side]
    lateral_sign = -1.0 if spec.side == Side.RIGHT else 1.0
    # Lower-zone findings sit laterally, where the heart does not hide them.
    lateral_shift = 0.05 * lateral_sign if spec.zone == Zone.LOWER else 0.0
    center = (
        lung_u + lateral_shift + rng.uniform(-0.035, 0.035),
        _ZONE_CENTERS_V[spec.zone] + rng.uniform(-0.025, 0.025),
    )

    if spec.category == FindingCategory.CONSOLIDATION:
        axes = (0.085 * scale * rng.uniform(0.9, 1.1), 0.085 * scale * rng.uniform(0.9, 1.1))
        return [_soft_ellipse(u, v, center, axes, edge=0.15) * lung], 0.62

    if spec.category == FindingCategory.LUNG_OPACITY:
        axes = (0.09 * scale * rng.uniform(0.9, 1.1), 0.095 * scale * rng.uniform(0.9, 1.1))
        return [_soft_ellipse(u, v, center, axes, edge=0.45) * lung], 0.5

    if spec.category == FindingCategory.PNEUMONIA:
        patches = np.zeros_like(u)
        for _ in range(5):
            offset = rng.uniform(-0.06, 0.06, size=2) * scale
            patch_center = (center[0] + offset[0], center[1] + offset[1])
            patches = np.maximum(patches, _soft_ellipse(u, v, patch_center, (0.05, 0.05), edge=0.5))
        return [patches * lung], 0.56

    if spec.category == FindingCategory.ATELECTASIS:
        band_center = (lung_u + lateral_shift + rng.uniform(-0.02, 0.02), 0.63 + rng.uniform(-0.02, 0.02))
        axes = (0.105 * scale, 0.028 * scale)
        angle = rng.uniform(-0.25, 0.25)
        return [_soft_ellipse(u, v, band_center, axes, edge=0.3, angle=angle) * lung], 0.6

    if spec.category == FindingCategory.PLEURAL_EFFUSION:
        # Fluid fills the lung base up to a meniscus that climbs toward the lateral chest wall.
        height = {Severity.SMALL: 0.1, Severity.MODERATE: 0.16, Severity.LARGE: 0.23}[spec.severity]
        base = lung_v + lung_axes[1]
        lateral_distance = np.clip(lateral_sign * (u - lung_u) / lung_axes[0] + 1.0, 0.0, 2.0)
        level = base - height - 0.05 * lateral_distance
        return [_smoothstep((v - level) / 0.02) * lung], 0.6

    if spec.category == FindingCategory.PNEUMOTHORAX:
        # Air collects along the upper lateral wall, as a crescent without lung markings.
        width = {Severity.SMALL: 0.2, Severity.MODERATE: 0.28, Severity.LARGE: 0.36}[spec.severity]
        radius = _ellipse_radius(u, v, (lung_u, lung_v), lung_axes)
        upper_lateral = (v < lung_v - 0.02) & (lateral_sign * (u - lung_u) > -0.05)
        crescent = _smoothstep((radius - (1.0 - width)) / 0.03) * upper_lateral * lung
        return [crescent], 0.02

    if spec.category == FindingCategory.EDEMA:
        regions = []
        for side in Side:
            side_u, side_v = lung_centers[side]
            medial_sign = 1.0 if side == Side.RIGHT else -1.0
            hilum = (side_u + medial_sign * 0.05, side_v + rng.uniform(-0.02, 0.02))
            axes = (0.09 * scale, 0.15 * scale)
            regions.append(_soft_ellipse(u, v, hilum, axes, edge=0.5) * lungs[side])
        return regions, 0.42

    raise ValueError(f"{spec.category.value} is not a lung finding.")


def render_frontal_phantom(
    specs: Sequence[FindingSpec], width: int, height: int, rng: np.random.Generator
) -> tuple[np.ndarray, list[list[tuple[float, float, float, float]]]]:
    """Draw a frontal chest radiograph phantom with the given findings.

    Args:
        specs: Findings to draw, from ``sample_finding_specs``.
        width: Image width in pixels.
        height: Image height in pixels.
        rng: Source of the anatomy jitter, texture and noise.

    Returns:
        The image as ``uint8[height, width]`` and, per spec, its boxes ``(x, y, w, h)`` in
        pixels (two boxes for edema, one otherwise).

    Raises:
        ValueError: If a finding ends up with no visible pixels, which would give an empty box.
    """
    # Chest square with a little zoom and shift per image.
    side_pixels = min(width, height) * rng.uniform(0.93, 1.0)
    origin_x = (width - side_pixels) / 2 + rng.uniform(-0.02, 0.02) * side_pixels
    origin_y = (height - side_pixels) / 2 + rng.uniform(-0.02, 0.02) * side_pixels
    columns, rows = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    u = (columns + 0.5 - origin_x) / side_pixels
    v = (rows + 0.5 - origin_y) / side_pixels
    texture_sigma = 0.01 * side_pixels

    # Soft tissue, with air around the body and the brighter abdomen below the lungs.
    body = _soft_ellipse(u, v, (0.5, 0.56), (0.47, 0.58), edge=0.06)
    image = 0.05 + 0.27 * body
    image = image + 0.25 * body * _smoothstep((v - 0.74) / 0.06)

    # Lungs: dark, with vessel markings that thin out toward the periphery.
    lung_centers = {
        side: (_LUNG_CENTERS_U[side] + rng.uniform(-0.01, 0.01), _LUNG_CENTER_V + rng.uniform(-0.01, 0.01))
        for side in Side
    }
    lungs = {side: _soft_ellipse(u, v, lung_centers[side], _LUNG_AXES[side], edge=0.05) for side in Side}
    lung_union = np.maximum(lungs[Side.RIGHT], lungs[Side.LEFT])
    hilar_distance = np.minimum(
        np.hypot(u - 0.4, v - _LUNG_CENTER_V), np.hypot(u - 0.6, v - _LUNG_CENTER_V)
    )
    markings = 0.035 * _smooth_noise(rng, u.shape, texture_sigma) * np.clip(1.0 - 3.0 * hilar_distance, 0.2, 1.0)
    lung_intensity = 0.1 + markings
    image = image * (1.0 - lung_union) + lung_intensity * lung_union

    # Ribs: curved bands, a little brighter where they cross the lungs.
    rib_phase = (v + 0.5 * (u - 0.5) ** 2) / 0.075
    ribs = _smoothstep((np.cos(2.0 * np.pi * rib_phase) - 0.55) / 0.3)
    image = image + 0.06 * ribs * lung_union

    # Lung findings blend towards their own intensity. The heart and mediastinum, drawn
    # afterwards, hide what lies behind them, so boxes are taken after those are known.
    heart_scale = (1.0, 1.0)
    for spec in specs:
        if spec.category == FindingCategory.CARDIOMEGALY:
            enlargement = {Severity.SMALL: 1.35, Severity.MODERATE: 1.5, Severity.LARGE: 1.65}[spec.severity]
            heart_scale = (enlargement, 1.0 + 0.5 * (enlargement - 1.0))
    heart_center = (0.55 + rng.uniform(-0.01, 0.01), 0.63 + rng.uniform(-0.01, 0.01))
    heart_axes = (0.13 * heart_scale[0], 0.11 * heart_scale[1])
    heart = _soft_ellipse(u, v, heart_center, heart_axes, edge=0.08)
    mediastinum = _smoothstep((0.055 - np.abs(u - 0.5)) / 0.015) * _smoothstep((0.76 - v) / 0.03)
    hidden = np.maximum(heart, mediastinum)

    regions_per_spec: dict[int, list[np.ndarray]] = {}
    for index, spec in enumerate(specs):
        if spec.category == FindingCategory.CARDIOMEGALY:
            continue
        regions, intensity = _finding_region(spec, u, v, lungs, lung_centers, rng)
        for region in regions:
            texture = 0.04 * _smooth_noise(rng, u.shape, texture_sigma)
            image = image * (1.0 - region) + (intensity + texture) * region
        regions_per_spec[index] = regions

    # Mediastinum, heart and clavicles lie in front of the lungs.
    image = image * (1.0 - mediastinum) + 0.62 * mediastinum
    image = image * (1.0 - heart) + 0.68 * heart
    for start, end in (((0.12, 0.14), (0.45, 0.2)), ((0.88, 0.14), (0.55, 0.2))):
        clavicle = _smoothstep((0.018 - _segment_distance(u, v, start, end)) / 0.008)
        image = image + 0.25 * clavicle

    # Blur, quantum noise and a display curve, as a detector and viewer would add.
    image = ndimage.gaussian_filter(image, sigma=0.004 * side_pixels)
    image = image + 0.015 * rng.standard_normal(image.shape)
    image = np.clip(image, 0.0, 1.0) ** 0.9
    pixels = np.round(image * 255.0).astype(np.uint8)

    # Boxes cover the visible part of each finding.
    boxes_per_spec: list[list[tuple[float, float, float, float]]] = []
    for index, spec in enumerate(specs):
        if spec.category == FindingCategory.CARDIOMEGALY:
            regions = [heart]
        else:
            regions = [region * (1.0 - hidden) for region in regions_per_spec[index]]
        boxes = [_box_of(region > 0.5) for region in regions]
        if any(box is None for box in boxes):
            raise ValueError(f"Finding {spec} has no visible pixels in a {width}x{height} phantom.")
        boxes_per_spec.append([box for box in boxes if box is not None])
    return pixels, boxes_per_spec


def render_lateral_phantom(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Draw a lateral chest view (spine behind, heart in front) as ``uint8[height, width]``."""
    columns, rows = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    side_pixels = min(width, height)
    u = (columns + 0.5 - (width - side_pixels) / 2) / side_pixels
    v = (rows + 0.5 - (height - side_pixels) / 2) / side_pixels

    body = _soft_ellipse(u, v, (0.5, 0.55), (0.4, 0.55), edge=0.06)
    lung = _soft_ellipse(u, v, (0.5, 0.45), (0.3, 0.32), edge=0.1)
    heart = _soft_ellipse(u, v, (0.38, 0.6), (0.16, 0.14), edge=0.15)
    spine = _smoothstep((0.05 - np.abs(u - 0.8 - 0.05 * (v - 0.5))) / 0.02) * body

    image = 0.05 + 0.3 * body
    image = image * (1.0 - lung) + 0.2 * lung
    image = image * (1.0 - heart) + 0.5 * heart
    image = image + 0.35 * spine
    image = ndimage.gaussian_filter(image, sigma=0.004 * side_pixels)
    image = np.clip(image + 0.015 * rng.standard_normal(image.shape), 0.0, 1.0)
    return np.round(image * 255.0).astype(np.uint8)
