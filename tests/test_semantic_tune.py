"""The tuner: threshold picking and a full fit on a constructed labelled set."""

from __future__ import annotations

import math

import numpy as np

from thrifty.cache.semantic.tune import curve, exact_neighbours, learn_from_vectors, pick_threshold


def test_pick_threshold_lowest_that_meets_target() -> None:
    scores = [0.99, 0.95, 0.90, 0.80, 0.70, 0.60]
    correct = [True, True, True, True, False, True]
    # 4/4 down to 0.80; adding 0.70 drops to 4/5 = 0.8; adding 0.60 gives 5/6 = 0.833.
    assert pick_threshold(scores, correct, 1.0) == 0.80
    assert pick_threshold(scores, correct, 0.8) == 0.60
    assert math.isinf(pick_threshold([0.9], [False], 0.99))


def test_pick_threshold_keeps_ties_together() -> None:
    # Two entries tied at 0.9, one wrong: no cut can separate them, so 1.0 precision needs > 0.9.
    assert pick_threshold([0.95, 0.9, 0.9], [True, True, False], 1.0) == 0.95


def test_curve_counts_guarded_lookups_as_misses() -> None:
    [point] = curve([0.9, 0.9, 0.1], [True, False, True], [True, False, True], [0.5])
    assert point.hit_rate == 1 / 3
    assert point.precision == 1.0
    assert point.false_hit_rate == 0.0


def test_learn_from_vectors_separates_tight_and_overlapping_clusters() -> None:
    rng = np.random.default_rng(0)
    dim = 16
    centres = np.eye(dim, dtype=np.float32)
    vectors, labels = [], []
    # Classes 0-3: tight clusters on their own axes. Classes 4 and 5: share one centre, so their
    # neighbours disagree and a hit is a coin toss; the tuner must learn to miss there.
    for label in range(6):
        centre = centres[min(label, 4)]
        for _ in range(150):
            v = centre + 0.15 * rng.standard_normal(dim).astype(np.float32)
            vectors.append(v / np.linalg.norm(v))
            labels.append(f"c{label}")
    x = np.asarray(vectors, dtype=np.float32)
    # Identical texts: the content guards pass, so only the neighbour features decide.
    texts = ["a question"] * len(labels)
    result = learn_from_vectors(x, labels, texts, target_precision=0.99, z=1.645)
    assert result.fit_precision >= 0.99
    # The four clean classes are two thirds of the data and all of them should hit.
    assert 0.6 <= result.fit_hit_rate <= 0.75
    assert 0.0 < result.params.threshold < 1.0


def test_pick_threshold_with_confidence_needs_enough_evidence() -> None:
    # 100 correct hits: the point estimate is 100%, but the 95% lower bound is only ~97.4%.
    scores = [1.0 - i / 1000 for i in range(100)]
    assert pick_threshold(scores, [True] * 100, 0.99) == scores[-1]
    assert math.isinf(pick_threshold(scores, [True] * 100, 0.99, z=1.645))
    # 1,000 correct hits are enough for a 99% lower bound.
    many = [1.0 - i / 10_000 for i in range(1000)]
    assert pick_threshold(many, [True] * 1000, 0.99, z=1.645) == many[-1]


def test_leave_one_out_neighbours_skip_self_and_verbatim_repeats() -> None:
    v = np.array([[1, 0, 0], [1, 0, 0], [1, 0, 0], [0.8, 0.6, 0]], dtype=np.float32)
    texts = ["reset pin", "reset pin", "Reset my PIN", "change pin"]
    labels = ["pin", "pin", "pin", "pin_change"]
    lists = exact_neighbours(v, v, labels, texts, k=3, leave_one_out=True)
    # Row 0: itself and its verbatim repeat (row 1) are left out; the same vector with other text stays.
    assert [n.text for n in lists[0]] == ["Reset my PIN", "change pin"]
    assert [n.text for n in lists[2]][:2] == ["reset pin", "reset pin"]
    assert all(len(row) <= 3 for row in lists)
