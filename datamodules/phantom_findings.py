"""Findings, captions and report text of the synthetic chest radiograph phantoms.

Captions follow the radiological convention: the patient's right side is on the image's left.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, unique

import numpy as np


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

@dataclass(frozen=True)
class FindingSpec:
    """One finding to draw: its category, where it is and how large."""

    category: FindingCategory
    side: Side
    zone: Zone
    severity: Severity

# Sides and zones each category can take. Cardiomegaly is central, edema is bilateral (two
# boxes), and an effusion or atelectasis always sits at the lung base.
ALLOWED_ZONES: dict[FindingCategory, tuple[Zone, ...]] = {
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
NORMAL_FINDINGS = (
    "The lungs are clear. The cardiomediastinal silhouette is normal.",
    "Heart size is normal. No focal consolidation, pleural effusion or pneumothorax.",
)


def template_words() -> list[str]:
    """Return every lower-case word the caption and report templates can produce, sorted."""
    texts: list[str] = list(NORMAL_IMPRESSIONS) + list(NORMAL_FINDINGS)
    for templates in _CAPTION_TEMPLATES.values():
        texts.extend(templates)
    for phrases in _ZONE_PHRASES.values():
        texts.extend(phrases)
    texts.extend(side.value for side in Side)
    texts.extend(severity.value for severity in Severity)
    texts.append(report_text("No other acute findings.", "", "CHEST (PA AND LAT)"))

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
        zone = Zone(rng.choice([zone.value for zone in ALLOWED_ZONES[category]]))
        side = Side(rng.choice([side.value for side in Side]))
        severity = Severity(rng.choice([severity.value for severity in Severity]))
        candidate = FindingSpec(category, side, zone, severity)
        if all(not findings_collide(candidate, other) for other in specs):
            specs.append(candidate)
    return specs


def findings_collide(first: FindingSpec, second: FindingSpec) -> bool:
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


def report_text(findings_text: str, impression_text: str, examination: str) -> str:
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
