"""`thrifty bench cache --online`: the stream's accounting (pure, planted neighbours) and the command
end to end on a tiny labelled set."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from thrifty.bench.cache_online import OOS_LABEL, intent_disjoint, stream
from thrifty.cache.semantic.adaptive import Policy
from thrifty.cache.semantic.decision import Neighbour, default_params

# Twelve agreeing entries near the query: the built-in rule serves "reset_pin" in a full cache.
AGREEING = [Neighbour(0.93 - 0.01 * i, "reset_pin", "how do i reset my pin") for i in range(12)] + [
    Neighbour(0.55 - 0.01 * i, f"other{i}", "something unrelated") for i in range(20)
]


def test_the_stream_counts_hits_out_of_scope_false_hits_verifications_and_the_net_saving():
    texts = ["how can i reset my pin", "reset pin please", "what is the weather in paris", "pin reset"]
    labels = ["reset_pin", "reset_pin", OOS_LABEL, "reset_pin"]
    found = [AGREEING] * 4
    params = default_params()
    static = stream("static", found, texts, labels, params, 10_003, None, np.random.default_rng(0))
    t = static.total
    assert (t["hits"], t["good_hits"], t["oos_lookups"], t["oos_hits"]) == (4, 3, 1, 1)
    assert t["precision"] == 0.75 and t["in_scope_precision"] == 1.0 and t["oos_false_hit_rate"] == 1.0
    assert (t["verifications"], t["net_saving"]) == (0, 1.0)
    every = Policy(error_bound=0.5, min_rate=1.0, max_rate=1.0)
    online = stream("online", found, texts, labels, params, 10_003, every, np.random.default_rng(0))
    o = online.total
    # Every hit verified: the wrong one is found, and each verification costs the call a hit saved.
    assert (o["verifications"], o["wrong_found"], o["verification_rate"]) == (o["hits"], 1, 1.0)
    assert o["net_saving"] == (o["hits"] - o["verifications"]) / 4 == 0.0
    assert online.curve[-1]["queries"] == 4 and online.final["status"] in ("learning", "certified", "off")


def test_the_intent_disjoint_split_keeps_the_halves_and_the_out_of_scope_intents_apart():
    train = [f"i{i % 10}" for i in range(100)]
    test = [f"i{i % 10}" for i in range(40)]
    split = intent_disjoint(train, test, seed=3, oos_share=0.2)
    assert not set(split.tune_intents) & (set(split.cached_intents) | set(split.oos_intents))
    assert not set(split.cached_intents) & set(split.oos_intents)
    assert len(split.tune_intents) == 5 and len(split.oos_intents) == 1
    assert {train[i] for i in split.cache} == set(split.cached_intents)
    assert {test[i] for i in split.stream_test} == set(split.cached_intents) | set(split.oos_intents)


def test_bench_online_writes_the_table_curve_svg_and_json(tmp_path: Path):
    pytest.importorskip("onnxruntime")
    from tests.test_semantic_bench import _write
    from thrifty.bench.cache_online import run_online_bench

    train, test = _write(tmp_path)
    out = io.StringIO()
    result = run_online_bench(
        train,
        test,
        Console(file=out, width=200),
        json_out=tmp_path / "online.json",
        svg_out=tmp_path / "online.svg",
        params=default_params(),
    )
    (run,) = result["runs"]
    assert run["lookups"] == 3 and run["out_of_scope_lookups"] == 1
    # The out-of-scope question never hits (the rule never answers from an 8-entry cache anyway).
    assert run["static"]["oos_hits"] == run["online"]["oos_hits"] == 0
    assert json.loads((tmp_path / "online.json").read_text())["runs"][0]["name"] == "held-out"
    assert (tmp_path / "online.svg").read_text().startswith("<svg")
    assert "cumulative over the stream" in out.getvalue() and "OOS false hits" in out.getvalue()


def test_far_questions_are_short_distinct_opening_user_turns(tmp_path: Path):
    pytest.importorskip("ijson")
    from thrifty.bench.sharegpt import short_questions
    from thrifty.errors import InvalidData

    def chat(first: str, role: str = "human") -> dict[str, object]:
        return {
            "id": first[:8],
            "conversations": [{"from": role, "value": first}, {"from": "gpt", "value": "ok"}],
        }

    records = [
        chat("how do I sort a list in python"),
        chat("How do I sort a list   in Python"),  # the same question again, other case and spacing
        chat("hi"),  # too short
        chat(" ".join(["word"] * 25)),  # too long
        chat("wie spät ist es in München bitte"),  # not ASCII
        chat("write a haiku about the sea", role="gpt"),  # does not open with the user
        chat("what is the capital of australia"),
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    assert sorted(short_questions(2, path=path)) == [
        "how do I sort a list in python",
        "what is the capital of australia",
    ]
    with pytest.raises(InvalidData, match="only 2 short questions, 3 asked"):
        short_questions(3, path=path)


def test_bench_online_counts_far_questions_as_out_of_scope_lookups(tmp_path: Path):
    pytest.importorskip("onnxruntime")
    from tests.test_semantic_bench import _write
    from thrifty.bench.cache_online import run_online_bench

    train, test = _write(tmp_path)
    far = ["write a haiku about the sea", "how do I sort a list in python"]
    result = run_online_bench(
        train, test, Console(file=io.StringIO(), width=200), params=default_params(), far_questions=far
    )
    (run,) = result["runs"]
    assert run["lookups"] == 5 and run["out_of_scope_lookups"] == 3 and run["far_lookups"] == 2
    assert run["name"] == "held-out + 2 far"
    assert run["static"]["far_lookups"] == 2 and run["static"]["oos_lookups"] == 3
    assert run["static"]["far_hits"] == 0 and run["static"]["far_false_hit_rate"] == 0.0


def test_too_few_far_questions_is_a_one_line_cli_error(tmp_path: Path):
    pytest.importorskip("ijson")
    import subprocess
    import sys

    from tests.test_semantic_bench import _write

    train, test = _write(tmp_path)
    path = tmp_path / "sharegpt.json"
    path.write_text(
        json.dumps(
            [{"id": "a", "conversations": [{"from": "human", "value": "what is the capital of peru"}]}]
        ),
        encoding="utf-8",
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "thrifty",
            "bench",
            "cache",
            "--train",
            str(train),
            "--test",
            str(test),
            "--online",
            "--far-oos",
            "5",
            "--far-oos-data",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "only 1 short questions, 5 asked" in done.stderr and "Traceback" not in done.stderr
