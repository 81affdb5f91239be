"""Routers over any model pool: the learned ladder, certified thresholds, answer equivalence."""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

from thrifty.errors import InvalidData
from thrifty.routing.answers import canonical, equivalent
from thrifty.routing.train.certify import (
    PathPoint,
    certify_path,
    lower_bounds,
    projected_costs,
    prompts_needed,
    z_score,
)
from thrifty.routing.train.cost import CostModel, load_prices
from thrifty.routing.train.data import Call, Row, load_rows
from thrifty.routing.train.fit import train
from thrifty.routing.train.ladders import candidate_ladders
from thrifty.routing.train.router import Router

# A hand-made pool of four models nobody ships prices for.
TINY, SMALL, JUNK, BIG = "tiny-1b", "small-8b", "junk-3b", "big-400b"
MID = "mid-30b"  # a third opinion, for the pool where tiny and small are wrong together
COST = {TINY: "1", SMALL: "2", JUNK: "0.5", BIG: "20", MID: "3"}


def _reply(answer: str, sure: bool) -> str:
    reasoning = (
        "Add them: the sum is clear." if sure else "Wait, maybe; actually I am not sure, let me re-check."
    )
    return json.dumps({"reasoning": reasoning, "answer": answer})


def _pool_row(i: int) -> Row:
    """tiny and small are right on 70% of prompts, and hedge exactly when they are wrong; junk
    answers something different every time; big is always right."""
    truth = str(i % 7)
    wrong = i % 10 < 3
    answers = {
        TINY: (str(100 + i) if wrong else truth, not wrong),
        SMALL: (str(200 + i) if wrong else truth, not wrong),
        JUNK: (str(300 + i), True),
        BIG: (truth, True),
    }
    calls = {
        m: Call(answer=a, correct=a == truth, cost=Decimal(COST[m]), output_tokens=10, output=_reply(a, sure))
        for m, (a, sure) in answers.items()
    }
    return Row(f"r{i}", "sums", "What is the sum?", calls)


def test_training_on_a_four_model_pool_learns_the_expected_ladder(tmp_path: Path) -> None:
    rows = [_pool_row(i) for i in range(150)]
    # The plain agreement cascades worth training, cheapest first: junk never agrees with anyone,
    # so a ladder with it escalates every prompt and comes last.
    options = candidate_ladders(rows, BIG, 0.99, 3)
    assert {o.ladder for o in options[:2]} == {(TINY, SMALL), (SMALL, TINY)}
    assert JUNK in options[2].ladder and options[2].cost > options[1].cost
    assert all(o.strong == BIG for o in options)
    router = train(rows, reference=BIG, folds=3, bootstrap=5)
    # tiny drafts (cheaper, and its confident drafts are trusted alone), small votes, big answers last.
    assert (router.ladder, router.strong) == ((TINY, SMALL), BIG)
    # junk never agrees with the pair, so asking it would only add its cost: no third opinion.
    assert router.third is None and router.models() == {TINY, SMALL, BIG}
    cert = router.meta["certificate"]
    assert cert["certified"] and cert["bound"] >= 0.99 and cert["confidence"] == 0.95
    # Lone confident tiny drafts (70%) cost 1; the rest pay tiny + small + big = 23.
    assert cert["rel_cost"] == pytest.approx((0.7 * 1 + 0.3 * 23) / 20, abs=0.01)
    assert router.meta["escalation_rate"]["sums"] == pytest.approx(0.3, abs=0.01)
    # The plain rule was a candidate too: every agreement (70%, cost 3) taken, the rest 23; dearer.
    (plain,) = [s for s in router.meta["ladders_searched"] if s["rule"] == "plain agreement"]
    assert plain["rel_cost"] == pytest.approx((0.7 * 3 + 0.3 * 23) / 20, abs=0.01)
    # So were vote cascades; with no score they cannot tell a sure tiny draft from an unsure one.
    (votes,) = [s for s in router.meta["ladders_searched"] if s["rule"] == "vote cascades"]
    assert votes["rel_cost"] > cert["rel_cost"] and not router.votes
    # The artifact names its models and loads back.
    path = tmp_path / "router.json"
    router.save(path)
    obj = json.loads(path.read_text())
    assert (obj["ladder"], obj["strong"]) == ([TINY, SMALL], BIG)
    assert Router.load(path) == router
    # An artifact from before the third opinion (no such keys) loads and never asks one.
    for key in ("third", "third_gate", "votes"):
        del obj[key]
    for gate in (*obj["gates"].values(), obj["fallback"]):
        del gate["third"]
    old = Router.from_json(obj)
    assert old.third is None and old.gates["sums"].third == float("inf") and old == router


def third_row(i: int) -> Row:
    """tiny and small, equally sure of themselves, agree on a wrong answer on 20% of prompts (and
    disagree, hedging, on 10%); mid, a third cheap model, is always right; big is always right."""
    truth = str(i % 7)  # wrong answers are digits too (8, 9), so nothing in a reply tells them apart
    both_wrong, split = i % 10 < 2, i % 10 == 2
    answers = {
        TINY: ("8" if both_wrong or split else truth, not split),
        SMALL: ("8" if both_wrong else "9" if split else truth, not split),
        MID: (truth, True),
        BIG: (truth, True),
    }
    calls = {
        m: Call(answer=a, correct=a == truth, cost=Decimal(COST[m]), output_tokens=10, output=_reply(a, sure))
        for m, (a, sure) in answers.items()
    }
    return Row(f"t{i}", "sums", "What is the sum?", calls)


def test_a_third_opinion_is_learned_where_two_cheap_models_are_wrong_together() -> None:
    rows = [third_row(i) for i in range(150)]
    router = train(rows, reference=BIG, ladder=(TINY, SMALL), folds=3, bootstrap=5)
    assert router.third == MID and router.models() == {TINY, SMALL, MID, BIG}
    cert = router.meta["certificate"]
    assert cert["certified"] and cert["quality"] == pytest.approx(1.0)
    # Three-way agreements (70%) cost 1 + 2 + 3; mid's dissent (20%) adds big: 26; splits (10%) 23.
    assert cert["rel_cost"] == pytest.approx((0.7 * 6 + 0.2 * 26 + 0.1 * 23) / 20, abs=0.01)
    assert router.meta["escalation_rate"]["sums"] == pytest.approx(0.3, abs=0.01)
    # Without it no cheap answer can be trusted (a sure wrong pair looks like a sure right one).
    alone = train(rows, reference=BIG, ladder=(TINY, SMALL), folds=3, bootstrap=5, ask_third=False)
    assert alone.third is None and alone.meta["certificate"]["rel_cost"] >= 1.0
    # A task it never saw, with one training task: only a three-way agreement is trusted.
    assert "three-way agreement with p>=0.000" in router.describe("other")
    assert "agreement, or" not in router.describe("other") and "→ +small-8b: never" in router.describe(
        "other"
    )


def test_a_pool_without_two_cheap_models_is_a_clear_error() -> None:
    rows = [_pool_row(i) for i in range(10)]
    only = [Row(r.id, r.task, r.prompt, {m: r.calls[m] for m in (BIG, TINY)}) for r in rows]
    with pytest.raises(InvalidData, match="no two models"):
        train(only, reference=BIG)


def test_prices_come_from_a_file_or_genai_prices(tmp_path: Path) -> None:
    prices = tmp_path / "p.json"
    prices.write_text(json.dumps({TINY: {"input_per_mtok": "1", "output_per_mtok": "2"}}))
    costs = CostModel(load_prices(prices))
    assert costs.call_cost(TINY, 1_000_000, 500_000) == Decimal(2)
    # Not in the file: genai-prices' list price (gpt-4o-mini: 0.15 / 0.60 per million).
    assert costs.call_cost("gpt-4o-mini-2024-07-18", 1_000_000, 1_000_000) == Decimal("0.75")
    assert not costs.priced("no-such-model-xyz") and costs.unpriced() == ["no-such-model-xyz"]
    data = tmp_path / "d.jsonl"
    responses = {m: {"output": '{"answer": "1"}', "correct": 1} for m in (TINY, "no-such-model-xyz")}
    data.write_text(json.dumps({"id": "a", "task": "t", "prompt": "p", "responses": responses}) + "\n")
    (row,) = load_rows([data], costs)
    assert set(row.calls) == {TINY}  # the unpriced model is left out
    prices.write_text(json.dumps({TINY: {"input_per_mtok": "1"}}))
    with pytest.raises(InvalidData, match="give flat_per_mtok, or both"):
        load_prices(prices)


def _true_quality(t: np.ndarray) -> np.ndarray:
    # Score s ~ U(0, 1); the lone draft is right with probability s; otherwise the strong model,
    # which is the reference, is right with probability 0.9. E[right | accept s >= t] integrates s.
    return ((1 - t**2) / 2 + 0.9 * t) / 0.9


def test_certification_holds_at_its_stated_rate_over_repeated_draws() -> None:
    rng = np.random.default_rng(12345)
    target, n, draws = 0.99, 400, 100
    held = point_held = 0
    for _ in range(draws):
        s = rng.random(n)
        ok1 = rng.random(n) < s
        ref = rng.random(n) < 0.9
        never = np.full(n, -np.inf)  # no second stage: a draft not taken goes to the strong model
        points, chosen = certify_path(
            s, never, ok1, ref, ref, ref, ref, np.ones(n), np.ones(n), np.full(n, 11.0), np.full(n, 10.0),
            target=target, confidence=0.95,
        )  # fmt: skip
        t = points[max(chosen, 0)].threshold
        held += bool(_true_quality(np.array([min(t, 1.0)]))[0] >= target)
        # The point estimate's choice: the cheapest rule whose sample quality reaches the target.
        need = target * ref.sum()
        cheapest = min((p for p in points if p.quality >= need), key=lambda p: p.cost)
        point_held += bool(_true_quality(np.array([min(cheapest.threshold, 1.0)]))[0] >= target)
    assert held >= 93
    # Without the bound the promise is a coin toss: the test can tell the two apart.
    assert point_held <= 80


def test_prompts_needed_is_where_the_bound_reaches_zero_and_never_below_the_target() -> None:
    z = z_score(0.95)
    # 1,000 prompts, the reference right on 900; the rule right on 900, 890 of them shared.
    rule = PathPoint(1, 0.5, quality=900.0, both=890.0, cost=1.0, lower=-1.0)
    need = prompts_needed(rule, 900.0, 1000, 0.99, z)
    assert 600 < need < 700  # (z sd / mean)^2 = (1.645 x 0.1407 / 0.009)^2 = 662
    f = need / 1000  # the same rows, `need` of them: the bound sits exactly at zero
    low = lower_bounds([900.0 * f], [890.0 * f], 900.0 * f, round(need), 0.99, z)[0]
    assert abs(low) < 0.05
    g = f * 1.1  # and more prompts like these clear it
    assert float(lower_bounds([900.0 * g], [890.0 * g], 900.0 * g, round(need * 1.1), 0.99, z)[0]) > 0
    below = PathPoint(2, 0.4, quality=890.0, both=885.0, cost=0.5, lower=-5.0)  # 98.9% < 99%
    assert prompts_needed(below, 900.0, 1000, 0.99, z) == float("inf")


def test_projection_at_the_same_prompts_is_the_certified_rule_and_more_labels_certify_cheaper() -> None:
    rng = np.random.default_rng(7)
    n = 400
    s = rng.random(n)
    ok1, ref = rng.random(n) < s, rng.random(n) < 0.9
    never = np.full(n, -np.inf)
    points, chosen = certify_path(
        s, never, ok1, ref, ref, ref, ref, np.ones(n), np.ones(n), np.full(n, 11.0), np.full(n, 10.0),
        target=0.99, confidence=0.95,
    )  # fmt: skip
    proj = projected_costs(points, float(ref.sum()), n, 0.99, z_score(0.95), (1.0, 4.0, 100.0))
    assert proj[0][1] == points[max(chosen, 0)].cost
    assert proj[0][1] >= proj[1][1] >= proj[2][1]
    assert proj[2][1] < proj[0][1]


EQUIVALENT = [
    ("0.5", "1/2"),
    ("\\frac{1}{2}", "0.5"),
    ("\\dfrac12", "\\frac{1}{2}"),
    ("\\tfrac{1}{2}", "1/2"),
    ("$\\boxed{\\frac12}$", "0.50"),
    ("\\boxed{42}", "42"),
    ("-\\frac{3}{4}", "-0.75"),
    ("$1,234.00", "1234"),
    ("12 cm", "12"),
    ("5 \\text{ dollars}", "5"),
    ("45^\\circ", "45"),
    ("1e3", "1000"),
    ("(B)", "B"),
    ("B.", "Answer: B"),
    ("The answer is (C) 17", "C"),
    ("'abc'", "abc"),
    ("x + 1", "x  + 1"),
]
DIFFERENT = [
    ("\\frac{1}{2}", "\\frac{1}{3}"),
    ("0.5", "5"),
    ("12 cm", "13 cm"),
    ("(B)", "(C)"),
    ("A cat", "A"),
    ("a", "A"),
    ("2 and 3", "2"),
    ("x + 1", "x + 2"),
    ("[1, 2]", "[2, 1]"),
    ("1/0", "0"),
]


@pytest.mark.parametrize(("a", "b"), EQUIVALENT)
def test_equivalent_answer_forms_agree_both_ways(a: str, b: str) -> None:
    assert equivalent(a, b) and equivalent(b, a)


@pytest.mark.parametrize(("a", "b"), DIFFERENT)
def test_different_answers_disagree_both_ways(a: str, b: str) -> None:
    assert not equivalent(a, b) and not equivalent(b, a)


def test_no_answer_agrees_with_nothing() -> None:
    assert canonical(None) is None and not equivalent(None, None) and not equivalent("1", None)


def test_bench_route_splits_reports_every_split_and_the_spread(tmp_path: Path) -> None:
    # Two tasks of the hand-made pool, written as labelled data with a price file.
    data, prices = tmp_path / "pool.jsonl", tmp_path / "prices.json"
    lines = []
    for i in range(160):
        row = _pool_row(i)
        responses = {m: {"output": c.output, "correct": int(c.correct)} for m, c in row.calls.items()}
        task = "sums" if i % 2 else "more-sums"
        lines.append(json.dumps({"id": row.id, "task": task, "prompt": row.prompt, "responses": responses}))
    data.write_text("\n".join(lines) + "\n")
    prices.write_text(json.dumps({m: {"input_per_mtok": c, "output_per_mtok": c} for m, c in COST.items()}))
    out = tmp_path / "splits.json"
    args = ["route-splits", "--data", str(data), "--prices", str(prices), "--splits", "s1,s2"]
    args += ["--json", str(out), "--reference", BIG, "--vote-orderings", "same,split"]
    done = subprocess.run(
        [sys.executable, "-m", "thrifty", "bench", *args], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    payload = json.loads(out.read_text())
    methods = [(r["method"], r["split"]) for r in payload["results"]]
    for split in ("s1", "s2"):
        assert ("certified cascade", split) in methods and ("plain agreement", split) in methods
        assert ("unseen: trained on sums only", split) in methods
        assert ("vote cascades, same order", split) in methods and (
            "vote cascades, split order",
            split,
        ) in methods
    ours = [r for r in payload["results"] if r["method"] == "certified cascade"]
    # Different halves each time, each about half of the 160 prompts; big is always right and a
    # sure tiny draft is always right, so the promise holds on both.
    assert ours[0]["prompts"] != ours[1]["prompts"] and all(55 < r["prompts"] < 105 for r in ours)
    assert all(r["met"] and r["rel_quality"] == 1.0 and r["rel_cost"] < 0.5 for r in ours)
    (summary,) = [s for s in payload["summary"] if s["method"] == "certified cascade"]
    assert summary["met"] == 2 and summary["splits"] == 2
    assert "certified cascade: quality 100.0% ± 0.0%" in done.stdout
