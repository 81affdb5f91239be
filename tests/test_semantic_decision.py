"""The pure hit/miss policy and its content-token guards."""

from __future__ import annotations

from thrifty.cache.semantic.decision import DecisionParams, Neighbour, decide, features, guard_mismatch
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
