"""The out-of-scope guard: a query must sit inside its answer's cluster, not merely near it."""

from __future__ import annotations

import dataclasses

import numpy as np

from thrifty.cache.semantic.decision import DecisionParams, Neighbour, default_params
from thrifty.cache.semantic.density import cluster_gap, member_rows, outside_cluster, tune_margin


def _unit(*rows: list[float]) -> np.ndarray:
    m = np.asarray(rows, dtype=np.float32)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def test_a_paraphrase_inside_a_tight_cluster_has_no_gap_and_an_outsider_a_negative_one() -> None:
    members = _unit([1, 0.05, 0], [1, -0.05, 0], [1, 0, 0.05])
    inside = _unit([1, 0, 0])[0]
    outsider = _unit([1, 0.6, 0])[0]  # still near (cos ~0.86) but far from how near they are to each other
    assert cluster_gap(inside, members) > 0
    assert cluster_gap(outsider, members) < -0.1
    params = dataclasses.replace(default_params(), cluster_margin=-0.08)
    assert not outside_cluster(cluster_gap(inside, members), params)
    assert outside_cluster(cluster_gap(outsider, members), params)
    # No margin: no guard.
    assert not outside_cluster(-1.0, dataclasses.replace(params, cluster_margin=None))
    # A lone member has no density to measure: the guard leaves it to the rule.
    assert cluster_gap(inside, members[:1]) is None
    assert not outside_cluster(None, params)


def test_members_are_the_served_answers_nearest_among_the_first_ten() -> None:
    found = [Neighbour(0.9 - 0.01 * i, "a" if i % 2 else "b", f"t{i}") for i in range(14)]
    rows = member_rows(list(reversed(found)), "a")
    picked = [list(reversed(found))[i] for i in rows]
    assert [n.text for n in picked] == ["t1", "t3", "t5", "t7", "t9"]
    assert member_rows(found, "zzz") == []


def test_the_margin_is_learned_where_the_stated_share_of_right_hits_falls_and_round_trips() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 16))
    vectors = np.vstack([c + 0.15 * rng.normal(size=(60, 16)) for c in centres]).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    labels = [f"i{k}" for k in range(6) for _ in range(60)]
    texts = [f"q{n}" for n in range(len(labels))]
    # A rule that serves the vote winner whenever the nearest entry is close: the guard is all that
    # tells a stray query apart.
    base = default_params()
    loose = dataclasses.replace(base, threshold=0.0, size_steps=(), size_thresholds=(), guards=False)
    strict = tune_margin(vectors, labels, texts, loose, give_up=0.02)
    lenient = tune_margin(vectors, labels, texts, loose, give_up=0.2)
    assert strict is not None and lenient is not None and strict < lenient
    params = dataclasses.replace(base, cluster_margin=strict)
    assert DecisionParams.from_dict(params.to_dict()).cluster_margin == strict
    assert DecisionParams.from_dict({**params.to_dict(), "cluster_margin": None}).cluster_margin is None
