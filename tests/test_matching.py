"""Distances and fusion rules of facesvc.models.matching on hand-made descriptors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from facesvc.models.matching import (
    DEFAULT_RULES,
    Distance,
    FrameRule,
    MatchRules,
    TemplateRule,
    match,
    pairwise_distances,
)

E0 = np.array([[1.0, 0.0, 0.0]])
E1 = np.array([[0.0, 1.0, 0.0]])


def test_cosine_ignores_length_and_l2_does_not() -> None:
    a, b = np.array([[2.0, 0.0]]), np.array([[0.5, 0.0]])
    assert pairwise_distances(a, b, Distance.COSINE)[0, 0] == pytest.approx(0.0)
    assert pairwise_distances(a, b, Distance.L2)[0, 0] == pytest.approx(1.5)


def test_cosine_distances_of_known_angles() -> None:
    d = pairwise_distances(E0, np.vstack([E0, E1, -E0]), Distance.COSINE)
    np.testing.assert_allclose(d, [[0.0, 1.0, 2.0]], atol=1e-12)


def test_l2_matches_the_definition() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 5)), rng.normal(size=(3, 5))
    expected = np.linalg.norm(a[:, None] - b[None], axis=2)
    np.testing.assert_allclose(pairwise_distances(a, b, Distance.L2), expected, atol=1e-12)


FRAMES = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
"""Frame distances to template E0 under cosine: 0, 1, 1 - 1/sqrt(2)."""


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        (FrameRule.MIN, 0.0),
        (FrameRule.MAX, 1.0),
        (FrameRule.MEAN, (0.0 + 1.0 + 1 - 1 / math.sqrt(2)) / 3),
        (FrameRule.MEDIAN, 1 - 1 / math.sqrt(2)),
        # mean of unit frames is (1+s, 1+s, 0)/3 with s = 1/sqrt(2): 45 degrees from E0
        (FrameRule.MEAN_DESCRIPTOR, 1 - 1 / math.sqrt(2)),
    ],
)
def test_frame_rules(rule: FrameRule, expected: float) -> None:
    score = match(E0, FRAMES, MatchRules(Distance.COSINE, TemplateRule.MEAN, rule))
    assert score.distance == pytest.approx(expected)
    assert len(score.frame_distances) == 3
    assert score.frame_distances[0] == pytest.approx(0.0)


def test_template_rules() -> None:
    template = np.vstack([E0, E1])  # two enrolment photos at right angles
    probe = np.array([[1.0, 0.0, 0.0]])
    nearest = match(template, probe, MatchRules(template=TemplateRule.NEAREST))
    average = match(template, probe, MatchRules(template=TemplateRule.AVERAGE))
    mean = match(template, probe, MatchRules(template=TemplateRule.MEAN))
    assert nearest.distance == pytest.approx(0.0)
    assert average.distance == pytest.approx(0.5)
    assert mean.distance == pytest.approx(1 - 1 / math.sqrt(2))


def test_single_photo_single_frame_is_the_plain_distance() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(1, 128)), rng.normal(size=(1, 128))
    for distance in Distance:
        for template in TemplateRule:
            for frames in FrameRule:
                s = match(a, b, MatchRules(distance, template, frames))
                assert s.distance == pytest.approx(pairwise_distances(a, b, distance)[0, 0])


def test_accepted_is_at_or_below_threshold() -> None:
    s = match(E0, E1)
    assert s.rules == DEFAULT_RULES
    assert s.accepted(s.distance) and not s.accepted(s.distance - 1e-9)


@pytest.mark.parametrize(
    ("template", "probe", "message"),
    [
        (np.zeros((0, 3)), E0, "template"),
        (E0, np.zeros((0, 3)), "probe"),
        (E0, np.array([[np.nan, 0.0, 0.0]]), "NaN"),
        (E0, np.ones((1, 4)), "different model packs"),
        (np.ones(3), E0, "template"),
    ],
)
def test_bad_inputs_are_errors(template: np.ndarray, probe: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        match(template, probe)


def test_centre_measures_the_angle_around_it() -> None:
    # Two faces that differ only off a large common component: plain cosine calls them
    # near-identical, around the centre they are at right angles.
    common = np.array([3.0, 0.0, 0.0])
    a = common + np.array([0.0, 1.0, 0.0])
    b = common + np.array([0.0, 0.0, 1.0])
    plain = match(a[None], b[None])
    centre = np.array([3.0, 0.0, 0.0]) / math.sqrt(10.0)  # their shared unit component
    around = match(a[None], b[None], centre=centre)
    assert plain.distance == pytest.approx(0.1)
    assert around.distance == pytest.approx(1.0)
    # L2 does not depend on where the centre is
    l2 = MatchRules(distance=Distance.L2)
    assert match(a[None], b[None], l2, centre=centre).distance == pytest.approx(math.sqrt(2))


def test_centre_of_the_wrong_size_is_an_error() -> None:
    with pytest.raises(ValueError, match="centre has 2 dimensions"):
        match(E0, E1, centre=np.zeros(2))
