"""The pure hit/miss policy and its content-token guards."""

from __future__ import annotations

from thrifty.cache.semantic.decision import (
    FEATURE_NAMES,
    LEGACY_FEATURES,
    DecisionParams,
    Neighbour,
    content_words,
    decide,
    default_params,
    expand,
    expanded_size,
    features,
    jaccard,
)
from thrifty.cache.semantic.guards import guard_mismatch
from thrifty.cache.semantic.normalise import normalise

# Score = sigmoid(4 * margin_standardised): hand-set so the tests read in terms of the margin alone.
PARAMS = DecisionParams(
    weights=(0.0, 4.0, 0.0, 0.0),
    bias=0.0,
    mean=(0.0, 0.1, 0.0, 0.0),
    scale=(1.0, 0.05, 1.0, 1.0),
    threshold=0.9,
)


def test_number_negation_and_polarity_guards() -> None:
    assert guard_mismatch("enable 2FA", "disable 2FA") is not None
    assert guard_mismatch("transfer $100", "transfer $500") is not None
    assert guard_mismatch("I do not want my card", "I want my card") is not None
    assert guard_mismatch("Flights from NY to Miami", "Flights from Miami to NY") is not None
    assert guard_mismatch("How do I enable 2FA?", "how to enable 2fa") is None
    assert guard_mismatch("I can't log in", "I cannot log in") is None
    assert guard_mismatch("send 1,000 euros", "send 1000 euros") is None


def test_unanimous_neighbours_with_clear_margin_hit() -> None:
    neighbours = [
        Neighbour(0.93, "reset_password", "how do i reset my password"),
        Neighbour(0.90, "reset_password", "i forgot my password"),
        Neighbour(0.70, "close_account", "how do i close my account"),
    ]
    decision = decide("How can I reset my password?", neighbours, PARAMS)
    assert decision.hit
    assert decision.answer_id == "reset_password"


def test_close_entry_with_other_answer_nearby_misses() -> None:
    # Top similarity is high, but an entry with another answer is almost as close: margin 0.01.
    neighbours = [
        Neighbour(0.95, "card_arrival", "when will my card arrive"),
        Neighbour(0.94, "card_delivery_estimate", "how long does card delivery take"),
    ]
    decision = decide("when does my card come", neighbours, PARAMS)
    assert not decision.hit
    assert "low confidence" in decision.reason


def test_guard_blocks_high_confidence_opposite_request() -> None:
    neighbours = [Neighbour(0.91, "disable_2fa", "disable 2FA"), Neighbour(0.40, "other", "something else")]
    decision = decide("enable 2FA", neighbours, PARAMS)
    assert not decision.hit
    assert decision.reason.startswith("guard: opposite verbs")


def test_guard_serves_sibling_entry_with_matching_content() -> None:
    neighbours = [
        Neighbour(0.92, "card_arrival", "my card has arrived late"),
        Neighbour(0.90, "card_arrival", "my card has not arrived"),
        Neighbour(0.60, "other", "exchange rates"),
    ]
    decision = decide("my card hasn't arrived", neighbours, PARAMS)
    assert decision.hit
    assert decision.entry is not None
    assert decision.entry.text == "my card has not arrived"


def test_empty_and_far_neighbours_miss() -> None:
    assert not decide("anything", [], PARAMS).hit
    far = decide("anything", [Neighbour(0.2, "a", "unrelated")], PARAMS)
    assert not far.hit
    assert "too far" in far.reason


def test_vote_picks_answer_with_most_weight() -> None:
    neighbours = [
        Neighbour(0.90, "a", "x"),
        Neighbour(0.89, "b", "y"),
        Neighbour(0.89, "b", "z"),
        Neighbour(0.88, "b", "w"),
    ]
    feats = features(neighbours)
    assert feats is not None
    assert feats.answer_id == "b"
    assert feats.entry.text in {"y", "z"}


def test_normalise_folds_case_space_and_trailing_punctuation() -> None:
    assert normalise("  How do I  reset my PIN??  ") == "how do i reset my pin"
    assert normalise("don\u2019t") == "don't"


def test_params_round_trip_through_json() -> None:
    import json

    restored = DecisionParams.from_dict(json.loads(json.dumps(PARAMS.to_dict())))
    assert restored == PARAMS


def test_default_params_round_trip_and_shape() -> None:
    import json

    params = default_params()
    assert params.features == FEATURE_NAMES[: len(params.features)]
    assert params.interactions
    assert len(params.weights) == expanded_size(len(params.features), True)
    assert 0.5 < params.threshold < 1.0
    restored = DecisionParams.from_dict(json.loads(json.dumps(params.to_dict())))
    assert restored == params


def test_default_params_hit_on_agreeing_neighbours_and_miss_on_mixed_ones() -> None:
    params = default_params()
    agreeing = [Neighbour(0.93 - 0.01 * i, "reset_pin", "how do i reset my pin") for i in range(12)] + [
        Neighbour(0.55 - 0.01 * i, f"other{i}", "something unrelated") for i in range(20)
    ]
    hit = decide("how can i reset my pin", agreeing, params)
    assert hit.hit, hit.reason
    assert hit.answer_id == "reset_pin"
    # The nearest entries alternate between two answers at nearly the same similarity.
    mixed = [
        Neighbour(
            0.93 - 0.005 * i, "card_arrival" if i % 2 else "card_delivery_estimate", "when does my card come"
        )
        for i in range(32)
    ]
    miss = decide("when will my card arrive", mixed, params)
    assert not miss.hit
    assert miss.reason.startswith("low confidence")
    # Nothing close: no hit whatever the vote says.
    far = [Neighbour(0.45, "a", "unrelated text")] * 3
    assert not decide("what is the weather", far, params).hit


def test_legacy_params_file_without_features_loads_and_scores() -> None:
    legacy = {
        "weights": [1.0, 2.0, 0.5, 0.5],
        "bias": 0.1,
        "mean": [0.8, 0.1, 0.5, 0.5],
        "scale": [0.1, 0.05, 0.2, 0.2],
        "threshold": 0.9,
        "temperature": 0.05,
        "vote_k": 10,
        "min_similarity": 0.5,
        "guards": True,
    }
    params = DecisionParams.from_dict(legacy)
    assert params.features == LEGACY_FEATURES and not params.interactions
    neighbours = [Neighbour(0.95, "a", "x"), Neighbour(0.94, "a", "y"), Neighbour(0.6, "b", "z")]
    feats = features(neighbours, params.temperature, params.vote_k, params.features)
    assert feats is not None and len(feats.values) == 4
    assert decide("x", neighbours, params).hit


def test_params_reject_unknown_features_and_wrong_weight_count() -> None:
    import pytest

    with pytest.raises(ValueError, match="unknown"):
        DecisionParams(weights=(), bias=0.0, mean=(), scale=(), threshold=0.5, features=("nope",))
    with pytest.raises(ValueError, match="expanded"):
        DecisionParams(weights=(1.0,), bias=0.0, mean=(0.0,), scale=(1.0,), threshold=0.5)


def test_expand_appends_pairwise_products() -> None:
    assert expand([2.0, 3.0], False) == [2.0, 3.0]
    assert expand([2.0, 3.0], True) == [2.0, 3.0, 4.0, 6.0, 9.0]
    assert expanded_size(9, True) == 54


def test_every_named_feature_is_computed() -> None:
    neighbours = [
        Neighbour(0.90, "a", "how do i reset my pin"),
        Neighbour(0.85, "b", "my card was declined"),
        Neighbour(0.80, "a", "reset pin please"),
    ]
    feats = features(neighbours, 0.05, 20, FEATURE_NAMES, query="how can i reset my pin")
    assert feats is not None
    values = dict(zip(FEATURE_NAMES, feats.values, strict=True))
    assert values["best_similarity"] == 0.90
    assert abs(values["margin"] - 0.05) < 1e-9
    assert values["agree_top5"] == 2 / 3
    # Content words {reset, pin} vs {reset, pin}; vs {card, declined}: nothing shared.
    assert values["lexical_overlap"] == 1.0
    assert values["lexical_overlap_other"] == 0.0
    assert abs(values["top3_similarity"] - (0.90 + 0.80 + 0.85) / 3) < 1e-9


def test_content_words_and_jaccard() -> None:
    assert content_words("How do I reset my PIN?") == frozenset({"reset", "pin"})
    assert jaccard(frozenset({"a", "b"}), frozenset({"b", "c"})) == 1 / 3
    assert jaccard(frozenset(), frozenset()) == 1.0


# Same score as PARAMS, but a cache of under 100 entries never hits and one of 100-999 needs 0.99.
SCHEDULED = DecisionParams(
    weights=PARAMS.weights,
    bias=PARAMS.bias,
    mean=PARAMS.mean,
    scale=PARAMS.scale,
    threshold=0.9,
    size_steps=(100, 1000),
    size_thresholds=(0.99, 0.9),
)


def test_threshold_for_follows_the_size_schedule() -> None:
    import math

    assert SCHEDULED.threshold_for(None) == 0.9
    assert math.isinf(SCHEDULED.threshold_for(99))
    assert SCHEDULED.threshold_for(100) == 0.99
    assert SCHEDULED.threshold_for(999) == 0.99
    assert SCHEDULED.threshold_for(1000) == 0.9
    assert SCHEDULED.threshold_for(10**6) == 0.9
    # No schedule: one threshold at every size.
    assert PARAMS.threshold_for(3) == PARAMS.threshold


def test_lone_confident_entry_in_a_sparse_cache_misses() -> None:
    # A sparse cache: one entry near the query, nothing else within reach, so the margin to the
    # nearest other answer is large (score ~0.996); in a small cache that is the signature of a
    # neighbouring question whose own answer is not cached yet.
    sparse = [
        Neighbour(0.86, "card_arrival", "where is my card"),
        Neighbour(0.55, "exchange_rate", "what is the exchange rate"),
    ]
    query = "how long does card delivery take"
    tiny = decide(query, sparse, SCHEDULED, cache_size=30)
    assert not tiny.hit
    assert "too sparse" in tiny.reason
    small = decide(query, sparse, SCHEDULED, cache_size=300)
    assert small.hit  # score above even the sparse threshold
    dense = decide(query, sparse, SCHEDULED, cache_size=5000)
    assert dense.hit and dense.answer_id == "card_arrival"
    # A weaker margin passes the dense threshold but not the sparse one.
    weaker = [Neighbour(0.86, "card_arrival", "where is my card"), Neighbour(0.72, "x", "something else")]
    assert decide(query, weaker, SCHEDULED, cache_size=5000).hit
    low = decide(query, weaker, SCHEDULED, cache_size=300)
    assert not low.hit and low.reason.startswith("low confidence")
    # Old callers (no size): the dense threshold, as before the schedule.
    assert decide(query, weaker, SCHEDULED).hit


def test_default_params_never_hit_in_a_tiny_cache_but_do_in_a_full_one() -> None:
    params = default_params()
    assert params.size_steps and params.size_steps == tuple(sorted(params.size_steps))
    thresholds = [params.threshold_for(n) for n in (*params.size_steps, 10**6)]
    # Sparser caches never get a lower threshold than denser ones.
    assert thresholds == sorted(thresholds, reverse=True)
    agreeing = [Neighbour(0.93 - 0.01 * i, "reset_pin", "how do i reset my pin") for i in range(12)] + [
        Neighbour(0.55 - 0.01 * i, f"other{i}", "something unrelated") for i in range(20)
    ]
    assert decide("how can i reset my pin", agreeing, params, cache_size=10_003).hit
    tiny = decide("how can i reset my pin", agreeing[:3], params, cache_size=3)
    assert not tiny.hit and "too sparse" in tiny.reason


def test_schedule_round_trips_and_old_files_have_none() -> None:
    import json
    import math

    import pytest

    never = DecisionParams(
        weights=PARAMS.weights,
        bias=0.0,
        mean=PARAMS.mean,
        scale=PARAMS.scale,
        threshold=0.9,
        size_steps=(10, 50),
        size_thresholds=(math.inf, 0.9),
    )
    text = json.dumps(never.to_dict())  # no bare Infinity in the JSON
    assert "Infinity" not in text
    assert DecisionParams.from_dict(json.loads(text)) == never
    old = {k: v for k, v in PARAMS.to_dict().items() if k not in ("size_steps", "size_thresholds")}
    assert DecisionParams.from_dict(old).size_steps == ()
    with pytest.raises(ValueError, match="size steps"):
        DecisionParams(weights=(), bias=0.0, mean=(), scale=(), threshold=0.5, size_steps=(5,))
    with pytest.raises(ValueError, match="increase"):
        DecisionParams(
            weights=(), bias=0.0, mean=(), scale=(), threshold=0.5, size_steps=(5, 5), size_thresholds=(1, 1)
        )


def test_density_features_describe_how_crowded_the_neighbourhood_is() -> None:
    names = ("similarity_5th", "similarity_10th", "similarity_20th", "log_near_count")
    dense = [Neighbour(0.95 - 0.01 * i, "a", "x") for i in range(25)]
    sparse = [Neighbour(0.9, "a", "x"), Neighbour(0.62, "b", "y"), *[Neighbour(0.3, "c", "z")] * 4]
    d = features(dense, names=names)
    s = features(sparse, names=names)
    assert d is not None and s is not None
    assert all(abs(a - b) < 1e-9 for a, b in zip(d.values[:3], (0.91, 0.86, 0.76), strict=True))
    assert s.values[0] == 0.3 and s.values[1] == 0.0 and s.values[2] == 0.0  # fewer than 10 returned
    import math

    assert abs(d.values[3] - math.log1p(25)) < 1e-9 and abs(s.values[3] - math.log1p(2)) < 1e-9
