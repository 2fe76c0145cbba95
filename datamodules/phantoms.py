"""Synthetic chest radiograph phantoms written in the MIMIC-CXR-JPG and MS-CXR file formats.

The demo trains and evaluates on these files through the same readers as real data, so the
generator writes exactly the published layouts:

- ``files/p<2 digits>/p<subject_id>/s<study_id>/<dicom_id>.jpg``: 8-bit grayscale JPEG images,
- ``files/p<2 digits>/p<subject_id>/s<study_id>.txt``: free-text reports with ``FINDINGS:`` and
  ``IMPRESSION:`` sections,
- ``mimic-cxr-2.0.0-split.csv.gz`` and ``mimic-cxr-2.0.0-metadata.csv.gz``,
- ``MS_CXR_Local_Alignment_v1.1.0.csv``: one row per bounding box of a grounding pair.

Each frontal phantom shows dark lungs, a bright mediastinum and heart, ribs and clavicles, and
zero to ``max_findings_per_image`` findings whose true boxes are known. Captions follow the
radiological convention: the patient's right side is on the image's left. Everything is
deterministic given ``PhantomConfig.seed``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum, unique
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

logger = logging.getLogger(__name__)

SPLIT_FILE_NAME = "mimic-cxr-2.0.0-split.csv.gz"
METADATA_FILE_NAME = "mimic-cxr-2.0.0-metadata.csv.gz"
MS_CXR_FILE_NAME = "MS_CXR_Local_Alignment_v1.1.0.csv"
MARKER_FILE_NAME = ".phantom-dataset.json"

# Bump when the drawing or the file layout changes, so that cached data sets are regenerated.
GENERATOR_VERSION = 1

METADATA_COLUMNS = [
    "dicom_id",
    "subject_id",
    "study_id",
    "PerformedProcedureStepDescription",
    "ViewPosition",
    "Rows",
    "Columns",
    "StudyDate",
    "StudyTime",
    "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
]
MS_CXR_COLUMNS = [
    "dicom_id",
    "category_name",
    "label_text",
    "path",
    "x",
    "y",
    "w",
    "h",
    "image_width",
    "image_height",
    "split",
]


@unique
class FindingCategory(str, Enum):
    """The eight MS-CXR finding categories, spelled as in ``category_name``."""

    ATELECTASIS = "Atelectasis"
    CARDIOMEGALY = "Cardiomegaly"
    CONSOLIDATION = "Consolidation"
    EDEMA = "Edema"
    LUNG_OPACITY = "Lung Opacity"
    PLEURAL_EFFUSION = "Pleural Effusion"
    PNEUMONIA = "Pneumonia"
    PNEUMOTHORAX = "Pneumothorax"


@unique
class Side(str, Enum):
    """The patient's side. The patient's right lung is drawn on the image's left."""

    RIGHT = "right"
    LEFT = "left"


@unique
class Zone(str, Enum):
    """A vertical lung zone."""

    UPPER = "upper"
    MIDDLE = "middle"
    LOWER = "lower"


@unique
class Severity(str, Enum):
    """The size word of a caption, which also scales the drawn finding."""

    SMALL = "small"
    MODERATE = "moderate"
    LARGE = "large"


@dataclass
class PhantomConfig:
    """Sizes and finding mix of a phantom data set.

    Attributes:
        num_train: Frontal studies in the MIMIC-CXR ``train`` split.
        num_validate: Frontal studies in the ``validate`` split; their findings become MS-CXR
            pairs with split ``val``.
        num_test: Frontal studies in the ``test`` split; their findings become MS-CXR pairs
            with split ``test``.
        seed: Seed of every random choice; the same config always writes the same files.
        normal_fraction: Fraction of training studies without findings, in [0, 1].
        two_finding_fraction: Fraction of abnormal studies with two findings in different
            places, in [0, 1]. Held-out studies always have ``max_findings_per_image``
            findings, so that the phrase, not the image alone, says which region is meant.
        max_findings_per_image: 1 or 2.
        lateral_fraction: Fraction of studies that also get a lateral view, which readers
            must filter out, in [0, 1].
        min_side_pixels: Smallest side of a written image, in pixels.
        max_side_pixels: Largest side of a written image, in pixels.
        max_aspect_ratio: Largest ratio of the long side to the short side, at least 1.
        jpeg_quality: JPEG quality of the written images, 1 to 95.
    """

    num_train: int = 2000
    num_validate: int = 48
    num_test: int = 96
    seed: int = 0
    normal_fraction: float = 0.1
    two_finding_fraction: float = 0.5
    max_findings_per_image: int = 2
    lateral_fraction: float = 0.1
    min_side_pixels: int = 224
    max_side_pixels: int = 320
    max_aspect_ratio: float = 1.25
    jpeg_quality: int = 92

    def __post_init__(self) -> None:
        for name in ("num_train", "num_validate", "num_test"):
            if getattr(self, name) < 0:
                raise ValueError(f"PhantomConfig.{name} must be >= 0, got {getattr(self, name)}.")
        for name in ("normal_fraction", "two_finding_fraction", "lateral_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"PhantomConfig.{name} must be in [0, 1], got {getattr(self, name)}.")
        if self.max_findings_per_image not in (1, 2):
            raise ValueError(
                f"PhantomConfig.max_findings_per_image must be 1 or 2, got {self.max_findings_per_image}."
            )
        if not 32 <= self.min_side_pixels <= self.max_side_pixels:
            raise ValueError(
                "PhantomConfig needs 32 <= min_side_pixels <= max_side_pixels, got "
                f"{self.min_side_pixels} and {self.max_side_pixels}."
            )
        if self.max_aspect_ratio < 1.0:
            raise ValueError(f"PhantomConfig.max_aspect_ratio must be >= 1, got {self.max_aspect_ratio}.")
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"PhantomConfig.jpeg_quality must be in [1, 95], got {self.jpeg_quality}.")


@dataclass(frozen=True)
class FindingSpec:
    """One finding to draw: its category, where it is and how large."""

    category: FindingCategory
    side: Side
    zone: Zone
    severity: Severity


@dataclass(frozen=True)
class DrawnFinding:
    """A finding as drawn: its MS-CXR phrase and its boxes ``(x, y, w, h)`` in image pixels."""

    spec: FindingSpec
    phrase: str
    boxes: tuple[tuple[float, float, float, float], ...]


# Sides and zones each category can take. Cardiomegaly is central, edema is bilateral (two
# boxes), and an effusion or atelectasis always sits at the lung base.
_ALLOWED_ZONES: dict[FindingCategory, tuple[Zone, ...]] = {
    FindingCategory.ATELECTASIS: (Zone.LOWER,),
    FindingCategory.CARDIOMEGALY: (Zone.LOWER,),
    FindingCategory.CONSOLIDATION: (Zone.UPPER, Zone.MIDDLE, Zone.LOWER),
    FindingCategory.EDEMA: (Zone.MIDDLE,),
    FindingCategory.LUNG_OPACITY: (Zone.UPPER, Zone.MIDDLE, Zone.LOWER),
    FindingCategory.PLEURAL_EFFUSION: (Zone.LOWER,),
    FindingCategory.PNEUMONIA: (Zone.UPPER, Zone.MIDDLE, Zone.LOWER),
    FindingCategory.PNEUMOTHORAX: (Zone.UPPER,),
}

_ZONE_PHRASES: dict[Zone, tuple[str, ...]] = {
    Zone.UPPER: ("{side} upper lobe", "{side} apical", "{side} upper lung"),
    Zone.MIDDLE: ("{side} mid lung", "{side} perihilar", "{side} middle lung"),
    Zone.LOWER: ("{side} lower lobe", "{side} basilar", "{side} lung base"),
}

# Caption templates per category. ``{where}`` is a zone phrase, ``{side}`` and ``{size}`` are
# single words. Every word here must be in the tiny demo BERT's vocabulary.
_CAPTION_TEMPLATES: dict[FindingCategory, tuple[str, ...]] = {
    FindingCategory.ATELECTASIS: (
        "{side} basilar atelectasis",
        "plate like atelectasis at the {side} lung base",
        "{side} lower lobe atelectasis",
    ),
    FindingCategory.CARDIOMEGALY: (
        "cardiomegaly",
        "{size} cardiomegaly",
        "enlarged cardiac silhouette",
        "the heart is enlarged",
    ),
    FindingCategory.CONSOLIDATION: (
        "{where} consolidation",
        "dense consolidation in the {where}",
        "focal {where} consolidation",
    ),
    FindingCategory.EDEMA: (
        "{size} pulmonary edema",
        "pulmonary edema",
        "{size} interstitial edema",
    ),
    FindingCategory.LUNG_OPACITY: (
        "{where} opacity",
        "hazy opacity in the {where}",
        "{size} {where} opacity",
    ),
    FindingCategory.PLEURAL_EFFUSION: (
        "{size} {side} pleural effusion",
        "{side} pleural effusion",
        "{size} {side} effusion",
    ),
    FindingCategory.PNEUMONIA: (
        "{where} pneumonia",
        "patchy opacities concerning for {where} pneumonia",
        "multifocal {where} pneumonia",
    ),
    FindingCategory.PNEUMOTHORAX: (
        "{size} {side} pneumothorax",
        "{side} apical pneumothorax",
        "{size} {side} apical pneumothorax",
    ),
}

NORMAL_IMPRESSIONS = (
    "No acute cardiopulmonary process.",
    "No acute intrathoracic abnormality.",
    "Normal chest radiograph.",
)
_NORMAL_FINDINGS = (
    "The lungs are clear. The cardiomediastinal silhouette is normal.",
    "Heart size is normal. No focal consolidation, pleural effusion or pneumothorax.",
)


def template_words() -> list[str]:
    """Return every lower-case word the caption and report templates can produce, sorted."""
    texts: list[str] = list(NORMAL_IMPRESSIONS) + list(_NORMAL_FINDINGS)
    for templates in _CAPTION_TEMPLATES.values():
        texts.extend(templates)
    for phrases in _ZONE_PHRASES.values():
        texts.extend(phrases)
    texts.extend(side.value for side in Side)
    texts.extend(severity.value for severity in Severity)
    texts.append(_report_text("No other acute findings.", "", "CHEST (PA AND LAT)"))

    words: set[str] = set()
    for text in texts:
        for token in text.lower().replace("{", " ").replace("}", " ").split():
            word = token.strip(".,:;()/_-")
            if len(word) > 1 and word.isalpha() and word not in ("where", "side", "size"):
                words.add(word)
    return sorted(words)


def sample_finding_specs(rng: np.random.Generator, num_findings: int) -> list[FindingSpec]:
    """Draw ``num_findings`` findings of different categories in non-overlapping places.

    Two findings never share a category, and two lung findings never share a side and zone,
    so their boxes are apart and a phrase picks out one of them.

    Raises:
        ValueError: If ``num_findings`` is not 0, 1 or 2.
    """
    if num_findings not in (0, 1, 2):
        raise ValueError(f"num_findings must be 0, 1 or 2, got {num_findings}.")

    specs: list[FindingSpec] = []
    while len(specs) < num_findings:
        category = FindingCategory(rng.choice([category.value for category in FindingCategory]))
        zone = Zone(rng.choice([zone.value for zone in _ALLOWED_ZONES[category]]))
        side = Side(rng.choice([side.value for side in Side]))
        severity = Severity(rng.choice([severity.value for severity in Severity]))
        candidate = FindingSpec(category, side, zone, severity)
        if all(not _findings_collide(candidate, other) for other in specs):
            specs.append(candidate)
    return specs


def _findings_collide(first: FindingSpec, second: FindingSpec) -> bool:
    if first.category == second.category:
        return True

    # Edema covers both mid lungs and cardiomegaly the heart, next to which only the other
    # central finding would be hard to tell apart.
    if FindingCategory.EDEMA in (first.category, second.category):
        other = second if first.category == FindingCategory.EDEMA else first
        return other.zone == Zone.MIDDLE or other.category == FindingCategory.CARDIOMEGALY
    if FindingCategory.CARDIOMEGALY in (first.category, second.category):
        return False
    return first.side == second.side and (first.zone == second.zone or Zone.LOWER in (first.zone, second.zone))


def caption_for(spec: FindingSpec, rng: np.random.Generator) -> str:
    """Write a lower-case radiology phrase for ``spec`` from a random template."""
    template = str(rng.choice(_CAPTION_TEMPLATES[spec.category]))
    where = str(rng.choice(_ZONE_PHRASES[spec.zone])).format(side=spec.side.value)
    return template.format(where=where, side=spec.side.value, size=spec.severity.value)


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
    center = (
        lung_u + rng.uniform(-0.035, 0.035),
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
        band_center = (lung_u + rng.uniform(-0.02, 0.02), 0.63 + rng.uniform(-0.02, 0.02))
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


def _report_text(findings_text: str, impression_text: str, examination: str) -> str:
    """Lay out a report like a MIMIC-CXR free-text report."""
    return (
        "                                 FINAL REPORT\n"
        f" EXAMINATION:  {examination}\n"
        " \n"
        " INDICATION:  ___ with shortness of breath, evaluate for acute process.\n"
        " \n"
        " TECHNIQUE:  Chest radiographs.\n"
        " \n"
        " COMPARISON:  None.\n"
        " \n"
        " FINDINGS: \n"
        " \n"
        f" {findings_text}\n"
        " \n"
        " IMPRESSION: \n"
        " \n"
        f" {impression_text}\n"
    )


def _sentence(phrase: str) -> str:
    return phrase[0].upper() + phrase[1:] + "."


def _mimic_dicom_id(rng: np.random.Generator) -> str:
    """Return an id shaped like MIMIC-CXR's: five groups of eight hex digits joined by dashes."""
    return "-".join(f"{int(rng.integers(0, 2**32)):08x}" for _ in range(5))


def _image_size(config: PhantomConfig, rng: np.random.Generator) -> tuple[int, int]:
    """Draw a (width, height) in portrait or landscape within the configured limits."""
    short_side = int(rng.integers(config.min_side_pixels, config.max_side_pixels + 1))
    long_side = min(int(round(short_side * rng.uniform(1.0, config.max_aspect_ratio))), config.max_side_pixels)
    long_side = max(long_side, short_side)
    if rng.random() < 0.5:
        return short_side, long_side
    return long_side, short_side


@dataclass
class _Tables:
    split_rows: list[dict[str, object]] = dataclasses.field(default_factory=list)
    metadata_rows: list[dict[str, object]] = dataclasses.field(default_factory=list)
    ms_cxr_rows: list[dict[str, object]] = dataclasses.field(default_factory=list)


_MS_CXR_SPLITS = {"validate": "val", "test": "test"}


def _write_study(
    directory: Path,
    config: PhantomConfig,
    split: str,
    subject_id: int,
    study_id: int,
    study_index: int,
    tables: _Tables,
) -> None:
    """Render one study (frontal view, maybe a lateral view, report) and add its table rows."""
    rng = np.random.default_rng([config.seed, study_index])

    # Findings: held-out studies always carry the maximum, so each pair has a distractor.
    if split != "train":
        num_findings = config.max_findings_per_image
    elif rng.random() < config.normal_fraction:
        num_findings = 0
    elif config.max_findings_per_image == 2 and rng.random() < config.two_finding_fraction:
        num_findings = 2
    else:
        num_findings = 1
    specs = sample_finding_specs(rng, num_findings)
    phrases = [caption_for(spec, rng) for spec in specs]

    # Frontal image.
    study_directory = directory / "files" / f"p{str(subject_id)[:2]}" / f"p{subject_id}" / f"s{study_id}"
    study_directory.mkdir(parents=True, exist_ok=True)
    width, height = _image_size(config, rng)
    pixels, boxes_per_spec = render_frontal_phantom(specs, width, height, rng)
    frontal_id = _mimic_dicom_id(rng)
    Image.fromarray(pixels).save(study_directory / f"{frontal_id}.jpg", quality=config.jpeg_quality)

    # Optional lateral view, which readers of frontal images must skip.
    has_lateral = rng.random() < config.lateral_fraction
    view_position = "PA" if has_lateral or rng.random() < 0.6 else "AP"
    examination = "CHEST (PA AND LAT)" if has_lateral else f"CHEST ({'PA' if view_position == 'PA' else 'PORTABLE AP'})"
    study_date = 21000101 + int(rng.integers(0, 80)) * 10000 + int(rng.integers(0, 12)) * 100 + int(rng.integers(0, 28))
    study_time = round(float(rng.uniform(0, 235959)), 3)
    images = [(frontal_id, view_position, width, height)]
    if has_lateral:
        lateral_width, lateral_height = _image_size(config, rng)
        lateral_id = _mimic_dicom_id(rng)
        lateral = render_lateral_phantom(lateral_width, lateral_height, rng)
        Image.fromarray(lateral).save(study_directory / f"{lateral_id}.jpg", quality=config.jpeg_quality)
        images.append((lateral_id, "LATERAL", lateral_width, lateral_height))

    # Report: findings as sentences, impression as the caption the model trains on.
    if specs:
        order = rng.permutation(len(specs))
        findings_text = " ".join(_sentence(phrases[index]) for index in order) + " No other acute findings."
        impression_text = " ".join(_sentence(phrases[index]) for index in order)
    else:
        findings_text = str(rng.choice(_NORMAL_FINDINGS))
        impression_text = str(rng.choice(NORMAL_IMPRESSIONS))
    report = _report_text(findings_text, impression_text, examination)
    (study_directory.parent / f"s{study_id}.txt").write_text(report, encoding="utf-8")

    # Table rows.
    view_meanings = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral"}
    for dicom_id, view, image_width, image_height in images:
        tables.split_rows.append(
            {"dicom_id": dicom_id, "study_id": study_id, "subject_id": subject_id, "split": split}
        )
        tables.metadata_rows.append(
            {
                "dicom_id": dicom_id,
                "subject_id": subject_id,
                "study_id": study_id,
                "PerformedProcedureStepDescription": examination,
                "ViewPosition": view,
                "Rows": image_height,
                "Columns": image_width,
                "StudyDate": study_date,
                "StudyTime": study_time,
                "ProcedureCodeSequence_CodeMeaning": examination,
                "ViewCodeSequence_CodeMeaning": view_meanings[view],
                "PatientOrientationCodeSequence_CodeMeaning": "Erect" if view != "AP" else "Recumbent",
            }
        )
    if split in _MS_CXR_SPLITS:
        relative_path = study_directory.relative_to(directory) / f"{frontal_id}.dcm"
        for spec, phrase, boxes in zip(specs, phrases, boxes_per_spec, strict=True):
            for x, y, box_width, box_height in boxes:
                tables.ms_cxr_rows.append(
                    {
                        "dicom_id": frontal_id,
                        "category_name": spec.category.value,
                        "label_text": phrase,
                        "path": relative_path.as_posix(),
                        "x": x,
                        "y": y,
                        "w": box_width,
                        "h": box_height,
                        "image_width": width,
                        "image_height": height,
                        "split": _MS_CXR_SPLITS[split],
                    }
                )


def _generate(directory: Path, config: PhantomConfig) -> None:
    """Write the whole data set into an empty ``directory``."""
    rng = np.random.default_rng(config.seed)
    split_sizes = {"train": config.num_train, "validate": config.num_validate, "test": config.num_test}
    total = sum(split_sizes.values())

    # Unique 8-digit ids: subjects start with 1, studies with 5. A subject has one or two
    # studies, all in one split, so held-out subjects never appear in training.
    subject_ids = rng.choice(10_000_000, size=max(total, 1), replace=False) + 10_000_000
    study_ids = rng.choice(10_000_000, size=max(total, 1), replace=False) + 50_000_000
    tables = _Tables()
    study_index = 0
    subject_index = 0
    for split, size in split_sizes.items():
        written = 0
        while written < size:
            subject_id = int(subject_ids[subject_index])
            subject_index += 1
            for _ in range(min(int(rng.integers(1, 3)), size - written)):
                _write_study(directory, config, split, subject_id, int(study_ids[study_index]), study_index, tables)
                study_index += 1
                written += 1
        logger.info("Wrote %d %s phantom studies to %s", size, split, directory)

    pd.DataFrame(tables.split_rows, columns=["dicom_id", "study_id", "subject_id", "split"]).to_csv(
        directory / SPLIT_FILE_NAME, index=False, compression="gzip"
    )
    pd.DataFrame(tables.metadata_rows, columns=METADATA_COLUMNS).to_csv(
        directory / METADATA_FILE_NAME, index=False, compression="gzip"
    )
    pd.DataFrame(tables.ms_cxr_rows, columns=MS_CXR_COLUMNS).to_csv(directory / MS_CXR_FILE_NAME, index=False)


def phantom_config_hash(config: PhantomConfig) -> str:
    """Return a SHA-256 hex digest of the config and the generator version."""
    payload = json.dumps({"version": GENERATOR_VERSION, "config": dataclasses.asdict(config)}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _read_marker_hash(root: Path) -> str | None:
    marker = root / MARKER_FILE_NAME
    if not marker.is_file():
        return None
    try:
        return str(json.loads(marker.read_text(encoding="utf-8"))["config_hash"])
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        logger.warning("Ignoring unreadable phantom marker %s: %s", marker, error)
        return ""


def _remove_abandoned_temporaries(root: Path) -> None:
    """Delete temporary directories of earlier writers whose process no longer runs."""
    for candidate in root.parent.glob(f".{root.name}.tmp-*"):
        try:
            pid = int(candidate.name.rsplit("-", 2)[-2])
            os.kill(pid, 0)
        except ProcessLookupError:
            logger.info("Removing abandoned partial phantom data set %s", candidate)
            shutil.rmtree(candidate, ignore_errors=True)
        except (ValueError, IndexError, PermissionError, OSError):
            continue


def write_phantom_dataset(root: str | Path, config: PhantomConfig) -> Path:
    """Write a phantom data set in the MIMIC-CXR-JPG and MS-CXR layouts, or reuse a matching one.

    The data set is generated in a temporary sibling directory and moved into place with a
    marker file that contains a hash of ``config``. A later call with the same config returns
    at once; a call with another config replaces the data set. An interrupted write leaves no
    marker in ``root``, so the next call starts over.

    Args:
        root: Directory of the data set. It must be missing, empty, or an earlier phantom
            data set.
        config: Sizes, finding mix and seed.

    Returns:
        ``root`` as a ``Path``.

    Raises:
        FileExistsError: If ``root`` exists, is not empty and holds no phantom marker, so it
            may contain data that is not ours to replace.
        NotADirectoryError: If ``root`` is a file.
    """
    root = Path(root).expanduser().absolute()
    expected_hash = phantom_config_hash(config)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"Phantom data set root {root} is a file; pass a directory path.")

    found_hash = _read_marker_hash(root)
    if found_hash == expected_hash:
        logger.info("Reusing phantom data set at %s", root)
        return root
    if found_hash is None and root.is_dir() and any(root.iterdir()):
        raise FileExistsError(
            f"{root} is not empty and is not a phantom data set (no {MARKER_FILE_NAME}); "
            "pass an empty or new directory."
        )

    # Generate next to the root, so that the final rename stays on one file system.
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_temporaries(root)
    temporary = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temporary.mkdir()
    try:
        logger.info("Writing phantom data set to %s (config hash %s)", root, expected_hash[:12])
        _generate(temporary, config)
        marker = {"config_hash": expected_hash, "config": dataclasses.asdict(config), "version": GENERATOR_VERSION}
        (temporary / MARKER_FILE_NAME).write_text(json.dumps(marker, indent=2), encoding="utf-8")

        # Swap: move an old data set aside, move the new one in, then delete the old one.
        retired = None
        if root.exists():
            retired = root.parent / f".{root.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            root.rename(retired)
        try:
            temporary.rename(root)
        except OSError:
            # Another process finished first. Keep its data set if it matches this config.
            if _read_marker_hash(root) != expected_hash:
                raise
            logger.info("Another process wrote the phantom data set at %s first; using it", root)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
    return root
