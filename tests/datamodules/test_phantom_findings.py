"""Tests of phantom finding sampling, captions and the template vocabulary."""

from __future__ import annotations

import numpy as np
import pytest

from datamodules.phantom_findings import (
    FindingCategory,
    FindingSpec,
    Severity,
    Side,
    Zone,
    caption_for,
    findings_collide,
    report_text,
    sample_finding_specs,
    template_words,
)


def test_sampled_findings_are_distinct() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        first, second = sample_finding_specs(rng, 2)

        assert first.category != second.category
        assert not findings_collide(first, second)


def test_sample_rejects_three_findings() -> None:
    with pytest.raises(ValueError, match="num_findings"):
        sample_finding_specs(np.random.default_rng(0), 3)


def test_caption_names_side() -> None:
    spec = FindingSpec(FindingCategory.PLEURAL_EFFUSION, Side.RIGHT, Zone.LOWER, Severity.SMALL)
    for seed in range(10):
        caption = caption_for(spec, np.random.default_rng(seed))

        assert "right" in caption.split()
        assert "effusion" in caption


def test_sample_is_deterministic() -> None:
    first = [sample_finding_specs(np.random.default_rng(seed), 2) for seed in range(20)]
    second = [sample_finding_specs(np.random.default_rng(seed), 2) for seed in range(20)]

    assert first == second


def test_template_words_cover_captions() -> None:
    words = set(template_words())
    rng = np.random.default_rng(0)
    for _ in range(300):
        for spec in sample_finding_specs(rng, 2):
            for word in caption_for(spec, rng).split():
                assert word in words, word


def test_report_text_sections() -> None:
    report = report_text("Small left pleural effusion.", "Small left pleural effusion.", "CHEST (PA)")

    assert report.splitlines()[0].strip() == "FINAL REPORT"
    assert "EXAMINATION:  CHEST (PA)" in report
    assert report.index("FINDINGS:") < report.index("IMPRESSION:")
