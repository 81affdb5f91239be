"""The tuner: threshold picking and a full fit on a constructed labelled set."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from thrifty.cache.semantic.decision import decide
from thrifty.cache.semantic.tune import (
    curve,
    exact_neighbours,
    learn_from_vectors,
    load_labelled,
    pick_threshold,
    subset_lookups,
)
from thrifty.errors import InvalidData


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
    result = learn_from_vectors(x, labels, texts, target_precision=0.99, z=1.645, sizes=())
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


def _sibling_world(seed: int, pairs: int = 20, per: int = 25, dim: int = 64) -> tuple[np.ndarray, list[str]]:
    """Intents in pairs of siblings (centres at cosine ~0.8): in a full cache a query's own intent is
    nearest; in a sparse one its sibling is often the only entry nearby, far from any other."""
    rng = np.random.default_rng(seed)
    vectors, labels = [], []
    for i in range(pairs):
        a = np.zeros(dim)
        a[i] = 1.0
        b = a.copy()
        b[i + pairs] = 0.8
        for k, centre in ((2 * i, a), (2 * i + 1, b / np.linalg.norm(b))):
            for _ in range(per):
                v = centre + 0.06 * rng.standard_normal(dim)
                vectors.append(v / np.linalg.norm(v))
                labels.append(f"c{k}")
    return np.asarray(vectors, dtype=np.float32), labels


def _precision_at(params: object, size: int, seed: int) -> tuple[int, float]:
    """Fresh queries of the same world against random caches of ``size`` entries: hits, precision."""
    from thrifty.cache.semantic.decision import DecisionParams

    assert isinstance(params, DecisionParams)
    x, y = _sibling_world(0)
    xq, yq = _sibling_world(seed)
    rng = np.random.default_rng(seed)
    hits = good = 0
    for _ in range(8):
        idx = rng.permutation(len(y))[:size]
        asked = rng.permutation(len(yq))[:100]
        lists = exact_neighbours(xq[asked], x[idx], [y[i] for i in idx], ["a question"] * size)
        for q, neighbours in zip(asked, lists, strict=True):
            d = decide("a question", neighbours, params, cache_size=size)
            hits += d.hit
            good += d.hit and d.answer_id == yq[q]
    return hits, good / hits if hits else 1.0


def test_density_augmentation_keeps_sparse_caches_precise() -> None:
    x, y = _sibling_world(0)
    texts = ["a question"] * len(y)  # the guards pass: only the neighbour features decide
    kwargs = {"target_precision": 0.99, "z": 1.645, "lookups_per_size": 2000, "sparse_lookups": 2000}
    dense_only = learn_from_vectors(x, y, texts, sizes=(), **kwargs)  # type: ignore[arg-type]
    tuned = learn_from_vectors(x, y, texts, sizes=(10, 40, 150), **kwargs)  # type: ignore[arg-type]
    # One row per size, the whole set last; thresholds never fall as the cache thins.
    assert [p.size for p in tuned.by_size] == [10, 40, 150, len(y) - 1]
    thresholds = [p.threshold for p in tuned.by_size]
    assert thresholds == sorted(thresholds, reverse=True)
    assert tuned.params.threshold == thresholds[-1]
    assert tuned.params.size_steps[-1] == len(y) - 1
    for p in tuned.by_size:
        assert p.precision >= 0.99
    # Tuned on the full cache only, the rule trusts a lone sibling in a ten-entry cache ...
    hits, precision = _precision_at(dense_only.params, 10, seed=1)
    assert hits > 20 and precision < 0.9
    # ... the density-tuned one holds its precision there and still hits in a full cache.
    hits, precision = _precision_at(tuned.params, 10, seed=1)
    assert precision >= 0.98
    hits, precision = _precision_at(tuned.params, 999, seed=2)
    assert hits > 700 and precision >= 0.99


def test_sparse_sizes_that_cannot_be_certified_never_hit() -> None:
    x, y = _sibling_world(0)
    texts = ["a question"] * len(y)
    # Too few lookups at size 10 for a three-sigma bound on 99%: that size certifies nothing.
    result = learn_from_vectors(x, y, texts, 0.99, z=3.0, sizes=(10,), sparse_lookups=100)
    assert math.isinf(result.by_size[0].threshold)
    assert result.params.size_steps[0] > 10
    assert math.isinf(result.params.threshold_for(10))


def test_subset_lookups_count_and_name_their_queries() -> None:
    from thrifty.cache.semantic.decision import DecisionParams

    x, y = _sibling_world(0, pairs=3, per=10)
    texts = [f"text {i % 7}" for i in range(len(y))]  # verbatim repeats of the same text
    params = DecisionParams(weights=(), bias=0.0, mean=(), scale=(), threshold=0.5)
    lookups, queries, draws = subset_lookups(
        x, y, texts, 20, 150, np.random.default_rng(0), params, per_draw=40
    )
    assert len(lookups) == len(queries) == len(draws) == 150
    assert queries.min() >= 0 and queries.max() < len(y)
    assert draws.tolist() == [i // 40 for i in range(150)]


def test_cluster_robust_bound_is_stricter_when_errors_bunch_in_one_cache() -> None:
    # 2,000 hits, 8 wrong (99.6%): binomially enough for 99% at z = 1.645, and still so when the
    # errors are spread over 100 caches of 20 hits; but when one cache holds all eight, the
    # precision of the next cache drawn is far less certain.
    scores = [1.0 - i / 10_000 for i in range(2000)]
    wrong = {100 * k + 50 for k in range(8)}
    correct = [i not in wrong for i in range(2000)]
    spread = [i // 20 for i in range(2000)]
    bunched = [0 if i in wrong else 1 + i % 99 for i in range(2000)]
    plain = pick_threshold(scores, correct, 0.99, z=1.645)
    assert plain == scores[-1]
    assert pick_threshold(scores, correct, 0.99, z=1.645, clusters=spread) == plain
    assert pick_threshold(scores, correct, 0.99, z=1.645, clusters=bunched) > plain


def test_expand_matrix_matches_expand_row_by_row() -> None:
    from thrifty.cache.semantic.decision import expand
    from thrifty.cache.semantic.tune import expand_matrix

    rows = np.random.default_rng(0).random((4, 5))
    assert np.allclose(expand_matrix(rows, True), [expand(r.tolist(), True) for r in rows])
    assert np.array_equal(expand_matrix(rows, False), rows)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("a,b\n1,2\n", "header row text,category"),
        ("text,category\nhello,\n", r"d.csv:2: a row needs both text and category"),
        ("text,category\nhello,greet\n", "needs at least 2 labelled rows, found 1"),
    ],
)
def test_load_labelled_rejects_malformed_csv(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "d.csv"
    path.write_text(text)
    with pytest.raises(InvalidData, match=fragment):
        load_labelled(path)
    with pytest.raises(InvalidData, match="no such file"):
        load_labelled(tmp_path / "missing.csv")


def test_load_labelled_reads_text_and_category(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text('text,category\n"hi, there",greet\nbye,leave\n')
    data = load_labelled(path)
    assert (data.texts, data.labels) == (["hi, there", "bye"], ["greet", "leave"])
