"""Per-partition thresholds (cache/semantic/adaptive.py) and answer comparison (compare.py): pure."""

from __future__ import annotations

import math
from decimal import Decimal

import pytest

from thrifty.cache.semantic.adaptive import (
    PartitionState,
    Policy,
    bin_of,
    bound,
    cut_score,
    estimate,
    sample_rate,
    wilson,
)
from thrifty.cache.semantic.compare import same_answer, same_evidence

SHIPPED = 0.96
POLICY = Policy(error_bound=0.01, z=1.645, min_rate=0.02, max_rate=0.3)


def _body(text: str) -> dict[str, object]:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}


def _traffic(state: PartitionState, scores: list[float], per_score: int) -> None:
    for s in scores:
        for _ in range(per_score):
            state.looked_up(s)


def test_a_new_partition_starts_from_the_shipped_threshold_and_verifies_at_the_highest_rate():
    state = PartitionState("acme", "support")
    verdict = bound(state, SHIPPED, POLICY)
    assert (verdict.status, verdict.threshold) == ("learning", SHIPPED)
    assert sample_rate(state, verdict, POLICY) == pytest.approx(POLICY.max_rate)


def test_planted_wrong_hits_tighten_the_threshold_above_their_scores():
    state = PartitionState("acme", "support")
    _traffic(state, [0.965, 0.99, 0.999], 200)
    for _ in range(8):  # hits at 0.965 found wrong again and again
        state.observe(0.965, False)
        state.observe(0.965, True)
    for _ in range(20):
        state.observe(0.999, True)
    verdict = bound(state, SHIPPED, POLICY)
    assert verdict.status == "learning"
    assert verdict.threshold > 0.965  # the planted wrong hits' score is no longer served
    assert verdict.threshold <= 0.99  # the bins verified right still are
    assert bin_of(0.965) < bin_of(verdict.threshold)


def test_verified_right_answers_loosen_the_threshold_below_the_shipped_one_within_the_bound():
    state = PartitionState("acme", "support")
    scores = [0.93, 0.95, 0.97, 0.99, 0.999]
    _traffic(state, scores, 400)
    for s in scores:
        for _ in range(150):  # near misses below 0.96 and verified hits above: all right
            state.observe(s, True)
    verdict = bound(state, SHIPPED, POLICY)
    assert verdict.status == "certified"
    assert verdict.threshold < SHIPPED
    assert verdict.threshold <= 0.93
    assert verdict.wrong_upper <= POLICY.error_bound  # certified: within the bound, with confidence
    # Confident: verification falls to the minimum rate.
    assert sample_rate(state, verdict, POLICY) == pytest.approx(POLICY.min_rate)


def test_a_certified_cut_never_exceeds_the_bound_even_with_some_wrong_answers():
    state = PartitionState("acme", "support")
    _traffic(state, [0.9, 0.99], 1000)
    for _ in range(300):
        state.observe(0.99, True)
        state.observe(0.9, True)
    for _ in range(30):
        state.observe(0.9, False)  # 10% wrong at 0.9
    verdict = bound(state, SHIPPED, POLICY)
    assert verdict.status == "certified"
    assert verdict.threshold > 0.9  # the contaminated bin is left out
    mean, _, unseen = estimate(state, bin_of(verdict.threshold))
    assert unseen < 1e-3
    assert verdict.wrong_upper <= POLICY.error_bound
    assert mean <= verdict.wrong_upper


def test_a_partition_that_cannot_reach_the_bound_stops_answering_paraphrases():
    state = PartitionState("acme", "support")
    _traffic(state, [0.97, 0.999], 100)
    for _ in range(10):
        state.observe(0.97, False)
        state.observe(0.999, False)
        state.observe(0.999, True)
    verdict = bound(state, SHIPPED, POLICY)
    assert verdict.status == "off"
    assert math.isinf(verdict.threshold)


def test_the_sampling_rate_falls_with_evidence_and_jumps_back_after_a_detected_error():
    state = PartitionState("acme", "support")
    _traffic(state, [0.99], 500)
    rates = []
    for n in (0, 20, 80):
        while sum(state.right) < n:
            state.observe(0.99, True)
            state.served(repeat=False, saved=None)
        rates.append(sample_rate(state, bound(state, SHIPPED, POLICY), POLICY))
    assert rates[0] > rates[1] > rates[2] >= POLICY.min_rate
    state.observe(0.99, False)
    assert sample_rate(state, bound(state, SHIPPED, POLICY), POLICY) == pytest.approx(POLICY.max_rate)
    for _ in range(200):  # the boost decays with the hits that follow
        state.served(repeat=False, saved=None)
    assert sample_rate(state, bound(state, SHIPPED, POLICY), POLICY) < POLICY.max_rate / 2


def test_state_round_trips_through_its_json_form_with_exact_money():
    state = PartitionState("acme", "support")
    state.looked_up(0.97)
    state.observe(0.97, False)
    state.served(repeat=False, saved=Decimal("0.0000117"))
    state.verify_cost_usd += Decimal("0.0000117")
    back = PartitionState.from_dict(state.to_dict())
    assert back == state
    assert back.saved_usd - back.verify_cost_usd == Decimal(0)


def test_bins_and_cuts_agree():
    for b in range(1, 27):
        assert bin_of(cut_score(b)) == b
        assert bin_of(cut_score(b + 1) - 1e-9) == b
    assert bin_of(0.3) == 0 and bin_of(1.0) == 27
    low, high = wilson(0.0, 300, 1.645)
    assert low == 0.0 and 0.005 < high < 0.01


def test_answers_compare_by_normalised_text_json_field_or_evidence():
    assert same_answer("text", _body("Yes, we ship to 40 countries."), _body("yes we ship to 40 countries"))
    assert not same_answer("text", _body("Yes, we ship."), _body("No, we do not ship."))
    a = _body('{"intent": "card_arrival", "reply": "It takes 3 days."}')
    b = _body('```json\n{"intent": "card_arrival", "reply": "Three working days."}\n```')
    c = _body('{"intent": "card_delivery_estimate", "reply": "It takes 3 days."}')
    assert same_answer("json_field", a, b, "intent")
    assert not same_answer("json_field", a, c, "intent")
    assert not same_answer("json_field", a, _body("not json"), "intent")  # no field: never the same
    assert same_evidence(["doc-2", "doc-1"], ["doc-1", "doc-2"])
    assert not same_evidence(["doc-1"], ["doc-1", "doc-3"]) and not same_evidence(["doc-1"], [])


def test_an_answer_wrong_far_more_often_than_its_scores_promised_needs_a_higher_score():
    from thrifty.cache.semantic.adaptive import answer_threshold

    state = PartitionState("acme", "support")
    for _ in range(6):  # questions of an uncached kind land near card_arrival, scored confidently
        state.observe(0.95, False, "card_arrival")
    for _ in range(6):  # near misses of another answer, wrong about as often as their scores said
        state.observe(0.6, True, "reset_pin")
        state.observe(0.6, False, "reset_pin")
    raised = answer_threshold(state, "card_arrival", SHIPPED, POLICY)
    assert raised > SHIPPED and raised > 0.99
    assert answer_threshold(state, "reset_pin", SHIPPED, POLICY) == SHIPPED
    assert answer_threshold(state, "never_seen", SHIPPED, POLICY) == SHIPPED
    assert math.isinf(answer_threshold(state, "card_arrival", math.inf, POLICY))
    assert PartitionState.from_dict(state.to_dict()).answers == state.answers


def test_partition_states_in_memory_are_bounded_and_read_back_when_asked_again(tmp_path):
    from thrifty.cache.semantic.state_store import SqlitePartitionStateStore
    from thrifty.cache.semantic.verify import Verifier
    from thrifty.settings import CacheVerifySettings
    from thrifty.stores.sqlite_db import open_database

    conn = open_database(tmp_path / "cache.db")
    verifier = Verifier({"support": CacheVerifySettings()}, max_states=2, flush_every_s=3600)
    verifier.start(SqlitePartitionStateStore(conn))
    for n, partition in enumerate(["p1", "p2", "p3"]):
        for _ in range(n + 1):
            verifier.observe(partition, "acme", "support", 0.97, False, "a", near_miss=True)
    # p1 was the least recently used: written out when p3 came in, and read back now.
    assert [s.near_miss_checks for _, s, _ in SqlitePartitionStateStore(conn).rows()] == [1]
    assert verifier.state("p1", "acme", "support").near_miss_checks == 1
    verifier.flush()
    assert {p: s.near_miss_checks for p, s, _ in SqlitePartitionStateStore(conn).rows()} == {
        "p1": 1,
        "p2": 2,
        "p3": 3,
    }
    conn.close()


def test_two_replicas_deltas_add_up_in_the_shared_state_and_an_error_anywhere_counts():
    from decimal import Decimal

    from thrifty.cache.semantic.adaptive import PartitionState, merged

    base = PartitionState("acme", "support")
    base.observe(0.99, True, "a")
    base.served(repeat=False, saved=Decimal("0.001"))
    shared = PartitionState.from_dict(base.to_dict())
    shared.observe(0.95, False, "a")  # another replica found a wrong hit meanwhile
    ours = PartitionState.from_dict(base.to_dict())
    ours.observe(0.99, True, "b")
    ours.served(repeat=False, saved=Decimal("0.002"))
    out = merged(shared, ours, base)
    assert (sum(out.right), sum(out.wrong)) == (2, 1)
    assert out.saved_usd == Decimal("0.003") and out.paraphrase_hits == 2
    assert out.answers["a"][:2] == [2.0, 1.0] and out.answers["b"][:2] == [1.0, 0.0]
    assert out.hits_since_error == 1  # the other replica's error, then our one hit
    # Merging the same delta onto the row it produced changes nothing.
    again = merged(out, ours, ours)
    assert again.to_dict() == out.to_dict()
