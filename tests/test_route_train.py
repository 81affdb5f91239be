"""Router training and the route benchmark on tiny hand-made data with known answers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from thrifty.bench.route import run_route_bench, run_route_bound
from thrifty.errors import InvalidData
from thrifty.routing.train.bound import hindsight_bound, vote_policies
from thrifty.routing.train.data import Call, Row, load_rows
from thrifty.routing.train.extract import answer_key, extract_answer, normalise
from thrifty.routing.train.fit import train
from thrifty.routing.train.metrics import auc, pair_metrics, random_at_cost, summarise
from thrifty.routing.train.policy import CascadePolicy, run_oracle, run_policy, run_single

MINI, GPT4O, HAIKU = "gpt-4o-mini-2024-07-18", "gpt-4o-2024-08-06", "claude-3-haiku-20240307"
SONNET, FLASH, GPT35 = "claude-3-5-sonnet-20240620", "gemini-1.5-flash", "gpt-3.5-turbo-0125"
ALL = (MINI, GPT4O, HAIKU, SONNET, FLASH, GPT35)


def _row(rid: str, task: str, answers: dict[str, str], truth: str, cost: str = "1") -> Row:
    # Cheap models cost `cost`, strong ones 10x: easy arithmetic for exact expectations.
    calls = {}
    for m in ALL:
        a = answers.get(m, truth)
        unit = Decimal(cost) * (10 if m in (GPT4O, SONNET) else 1)
        out = json.dumps({"reasoning": "because", "answer": a})
        calls[m] = Call(answer=a, correct=a == truth, cost=unit, output_tokens=10, output=out)
    return Row(rid, task, "prompt", calls)


@pytest.mark.parametrize(
    ("output", "task", "expected"),
    [
        ('```json\n{"reasoning": "2+1", "answer": "$1,234.00"}\n```', "gsm", "1234"),
        ('{"reasoning": "line\nbreak", "answer": 42}', "gsm", "42"),
        ('no json here, "answer": "7 apples"', "gsm", "7"),
        ('{"answer": "\'abc\'"}', "crux", "abc"),
        ('{"answer": "  7  "}', "crux", "  7  "),
        ('{"answer": ""}', "crux", ""),
        ('{"answer": [1, 2]}', "crux", "[1, 2]"),
        ("nothing", "crux", None),
    ],
)
def test_answer_extraction(output: str, task: str, expected: str | None) -> None:
    assert answer_key(output, task) == expected


def test_extract_prefers_first_json_object() -> None:
    assert extract_answer('x {"answer": "a"} y {"answer": "b"}') == "a"
    assert normalise("# 3", "gsm") == "3"
    assert normalise("no digits", "gsm") is None
    # Only gsm-like tasks compare first numbers; elsewhere two fractions must not "agree".
    assert normalise("\\frac{1}{2}", "math") != normalise("\\frac{1}{3}", "math")


def _tiny() -> list[Row]:
    return [
        _row("1", "t", {}, "A"),  # everyone right
        _row("2", "t", {MINI: "B", FLASH: "C"}, "A"),  # cheap disagree -> escalate, 4o right
        _row("3", "t", {MINI: "B", FLASH: "B"}, "A"),  # cheap agree on a wrong answer
        _row("4", "t", {GPT4O: "X"}, "A"),  # 4o wrong, cheap right
    ]


def test_metrics_exact_on_tiny_data() -> None:
    rows = _tiny()
    ref = run_single(rows, GPT4O)
    naive = summarise("naive", run_policy(rows, CascadePolicy((MINI, FLASH), 2, 0, GPT4O)), ref)
    # Costs: rows 1, 3, 4 pay mini+flash = 2; row 2 pays 2 + 10.
    assert naive.cost_usd == Decimal(18)
    assert naive.accuracy == Decimal(3) / Decimal(4)
    assert naive.rel_quality == Decimal(1)  # 3 right, same as always-4o
    assert naive.rel_cost == Decimal(18) / Decimal(40)
    assert naive.escalation_rate == Decimal("0.25")
    mini = summarise("mini", run_single(rows, MINI), ref)
    assert (mini.accuracy, mini.cost_usd) == (Decimal("0.5"), Decimal(4))
    oracle = summarise("oracle", run_oracle(rows, (MINI, GPT4O)), ref)
    # Rows 1 and 4: mini is right (1); rows 2 and 3: only 4o is (10).
    assert (oracle.accuracy, oracle.cost_usd) == (Decimal(1), Decimal(1 + 10 + 10 + 1))
    rnd = random_at_cost("rnd", Decimal(22), run_single(rows, MINI), run_single(rows, GPT4O), ref)
    # p = (22 - 4) / (40 - 4) = 0.5: accuracy halfway between 0.5 and 0.75.
    assert rnd.escalation_rate == Decimal("0.5")
    assert rnd.accuracy == Decimal("0.625")
    assert rnd.cost_usd == Decimal(22)


def test_pgr_apgr_cpt() -> None:
    weak = [True, False, False, True]
    strong = [True, True, True, False]
    # Perfect ranking: the two queries where only strong is right come first.
    m = pair_metrics([0.1, 0.9, 0.8, 0.0], weak, strong, steps=4)
    # weak 0.5, strong 0.75; at 25% one gain -> 0.75/... PGR = (0.75-0.5)/0.25 = 1.0.
    assert m.pgr[0.0] == 0.0
    assert m.cpt50 == 0.25 and m.cpt80 == 0.25
    assert m.apgr == pytest.approx(
        (0.25 * (0 + 1) / 2) + 0.25 * (1 + 2) / 2 + 0.25 * (2 + 2) / 2 + 0.25 * 3 / 2
    )


def test_bench_writes_json(tmp_path: Path) -> None:
    def line(i: int, mini_answer: str) -> str:
        out = {m: {"output": '{"answer": "4"}', "correct": 1} for m in ALL}
        out[MINI] = {"output": f'{{"answer": "{mini_answer}"}}', "correct": int(mini_answer == "4")}
        return json.dumps(
            {"id": f"g{i}", "task": "gsm", "prompt": "2+2?", "reference": "4", "responses": out}
        )

    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(line(i, "4" if i % 2 else "5") for i in range(20)) + "\n")
    out = tmp_path / "r.json"
    results = run_route_bench([data], [data], GPT4O, out)
    rows = json.loads(out.read_text())
    assert {"strategy", "accuracy", "cost_usd", "rel_quality", "rel_cost", "escalation_rate"} <= set(rows[0])
    assert len(rows) == len(results) + 2
    (cert,) = [r for r in rows if r["strategy"] == "certificate"]
    assert cert["confidence"] == 0.95 and cert["target"] == 0.99 and cert["prompts"] == 20
    # Where the cost between the hindsight bound and the certified rule goes: the terms add up.
    (gap,) = [r for r in rows if r["strategy"] == "gap"]
    names = [x["name"] for x in gap["lines"]]
    assert names[0] == "certified (as trained)" and names[-1] == "hindsight bound, all prompts"
    costs = [x["rel_cost"] for x in gap["lines"]]
    assert costs[0] == pytest.approx(cert["held_out_cost"])
    assert gap["terms"]["total"] == pytest.approx(costs[0] - costs[-1])


def test_auc_ranks_and_ties() -> None:
    assert auc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert auc([0.1, 0.2, 0.9, 0.8], [True, True, False, False]) == 0.0
    assert auc([0.5, 0.5, 0.5], [True, False, False]) == 0.5
    # One positive above one of the two negatives, tied with the other: (1 + 0.5) / 2.
    assert auc([0.7, 0.7, 0.1], [True, False, False]) == 0.75
    assert math.isnan(auc([0.3, 0.4], [True, True]))


def test_vote_policies_enumerates_the_family() -> None:
    pols = vote_policies((MINI, FLASH), GPT4O)
    # One model: accept it (2 orders); two: 1 vote with 0 or 1 dissent, or 2 votes (3 x 2 orders).
    assert len(pols) == 8
    assert len(set(pols)) == 8
    assert CascadePolicy((FLASH, MINI), 2, 0, GPT4O) in pols


def test_hindsight_bound_on_known_rows(tmp_path: Path) -> None:
    easy = [_row(f"e{i}", "t", {}, "A") for i in range(12)]
    # Every cheap model gives the same wrong answer, with replies shaped like the right ones:
    # nothing but the strong model can tell, so full quality means escalating every row.
    fooled = [_row(f"f{i}", "t", {m: "B" for m in (MINI, FLASH, HAIKU, GPT35)}, "A") for i in range(12)]
    b = hindsight_bound(easy, (1.0,), folds=3)
    assert b.rows[0].reachable
    assert b.rows[0].rel_cost == pytest.approx(0.1)  # mini alone: 1 against gpt-4o's 10
    b = hindsight_bound(easy + fooled, (0.5, 1.0, 1.01), folds=3)
    half, full, beyond = b.rows
    assert (half.rel_quality, half.rel_cost) == (pytest.approx(0.5), pytest.approx(0.1))
    # Escalating all 24 rows after the cheap calls would cost mini + flash + gpt-4o = 12 per row;
    # sending every row to gpt-4o alone is in the family too (the routers' first rule): cost 10 of 10.
    assert (full.rel_quality, full.rel_cost) == (pytest.approx(1.0), pytest.approx(1.0))
    assert full.per_task["t"] == (pytest.approx(1.0), pytest.approx(1.0))
    assert b.task_alone["t"][1.0] == pytest.approx(1.0)
    assert not beyond.reachable and b.task_alone["t"][1.01] is None
    # Identical replies carry no signal; out-of-fold scores of a null signal rank slightly
    # *below* chance (each fold's rate is the complement of the held-out one's).
    assert b.agree_auc["t"] <= 0.5
    out = tmp_path / "bound.json"
    data = tmp_path / "d.jsonl"
    data.write_text(
        "\n".join(
            json.dumps(
                {
                    "id": f"g{i}",
                    "task": "gsm",
                    "prompt": "2+2?",
                    "reference": "4",
                    "responses": {m: {"output": '{"answer": "4"}', "correct": 1} for m in ALL},
                }
            )
            for i in range(9)
        )
        + "\n"
    )
    run_route_bound([data], GPT4O, out, targets=(1.0,))
    written = json.loads(out.read_text())
    assert written["targets"][0]["reachable"] is True
    loaded = load_rows([data])
    # Every model is right: the cheapest is flash alone.
    flash_alone = sum(r.calls[FLASH].cost for r in loaded) / sum(r.calls[GPT4O].cost for r in loaded)
    assert written["targets"][0]["rel_cost"] == pytest.approx(float(flash_alone))


def test_bench_breaks_results_down_by_task(tmp_path: Path) -> None:
    def line(i: int, task: str) -> str:
        out = {m: {"output": '{"answer": "4"}', "correct": 1} for m in ALL}
        wrong = i % 4 == 0  # mini and flash agree on a wrong answer on every fourth prompt
        for m in (MINI, FLASH):
            out[m] = {"output": f'{{"answer": "{5 if wrong else 4}"}}', "correct": int(not wrong)}
        return json.dumps(
            {"id": f"{task}{i}", "task": task, "prompt": "2+2?", "reference": "4", "responses": out}
        )

    train_file, test_file = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train_file.write_text("\n".join(line(i, "gsm") for i in range(16)) + "\n")
    test_file.write_text(
        "\n".join([*(line(i, "gsm") for i in range(8)), *(line(i, "new") for i in range(8))]) + "\n"
    )
    out = tmp_path / "r.json"
    run_route_bench([train_file], [test_file], GPT4O, out)
    by_name = {o["strategy"]: o for o in json.loads(out.read_text())}
    for task in ("gsm", "new"):
        assert by_name[f"4o @ {task}"]["rel_quality"] == 1.0
        naive = by_name[f"naive cascade @ {task}"]
        # mini and flash agree on a wrong answer on 2 of 8 prompts: the learned ladder drafts with
        # two models that never do, so its plain agreement cascade is right and never escalates.
        assert naive["accuracy"] == 1.0 and naive["escalation_rate"] == 0.0
    assert {"thrifty-cascade @ gsm", "thrifty-cascade @ new", "thrifty-classifier @ new"} <= set(by_name)
    # The overall rows are still there, under their own names.
    assert by_name["thrifty-cascade"]["accuracy"] == pytest.approx(
        (by_name["thrifty-cascade @ gsm"]["accuracy"] + by_name["thrifty-cascade @ new"]["accuracy"]) / 2
    )


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("{not json\n", "d.jsonl:1: not JSON"),
        ('{"id": 1}\n', "d.jsonl:1: row 1 lacks task, prompt, responses"),
        ('{"id": 1, "task": "t", "prompt": "p", "responses": []}\n', "responses must be an object"),
        (
            json.dumps({"id": 1, "task": "t", "prompt": "p", "responses": {MINI: {"output": "x"}}}),
            "a response needs an output and correct 0 or 1",
        ),
    ],
)
def test_malformed_data_is_a_clear_error(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(text)
    with pytest.raises(InvalidData, match=fragment):
        load_rows([path])


def test_missing_files_and_models_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidData, match="no such file"):
        load_rows([tmp_path / "nope.jsonl"])
    # A model without a benchmark price is skipped; one the cascade needs must be there.
    obj = {
        "id": "a",
        "task": "t",
        "prompt": "p",
        "reference": "1",
        "responses": {
            MINI: {"output": '{"answer": "1"}', "correct": 1},
            "some-new-model": {"output": "", "correct": 0},
        },
    }
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(obj) + "\n")
    (row,) = load_rows([path])
    assert set(row.calls) == {MINI}
    with pytest.raises(InvalidData, match=r"needs a reply from the reference model 'gpt-4o-2024-08-06'"):
        train([row])
    with pytest.raises(InvalidData, match=r"has no reply from gemini-1.5-flash, gpt-4o-2024-08-06"):
        train([row], ladder=(MINI, FLASH))


def test_cli_reports_bad_data_without_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"id": 1}\n')
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "thrifty",
            "route",
            "train",
            "--data",
            str(path),
            "--out",
            str(tmp_path / "r.json"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "lacks task, prompt, responses" in done.stderr and "Traceback" not in done.stderr
