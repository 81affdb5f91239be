"""The in-process partitions of the semantic cache: isolation, expiry, drops and rebuilds."""

from __future__ import annotations

import numpy as np

from thrifty.cache.semantic.partitions import EntryMeta, Partitions
from thrifty.cache.semantic.stage import answer_id, context_hash, last_user_text


def _unit(seed: int, dim: int = 8) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return v / np.linalg.norm(v)


def _meta(i: int, expires: float = 100.0) -> EntryMeta:
    return EntryMeta(f"q{i}", f"q{i}", f"a{i}", expires)


def test_search_stays_inside_its_partition_and_skips_expired_entries():
    parts = Partitions(8)
    parts.add("p1", 1, _unit(1), _meta(1))
    parts.add("p1", 2, _unit(2), _meta(2, expires=5.0))
    parts.add("p2", 3, _unit(1), _meta(3))  # the same vector, another partition
    found = parts.search("p1", _unit(1), 10, now=10.0)
    assert [i for i, _ in found] == [1] and abs(found[0][1].similarity - 1.0) < 1e-5
    assert parts.meta(2) is None and len(parts) == 2  # the expired entry was dropped on sight
    assert parts.search("nowhere", _unit(1), 10, now=10.0) == []


def test_dropped_entries_are_never_returned_and_a_partition_rebuilds_when_mostly_dead():
    parts = Partitions(8)
    for i in range(200):
        parts.add("p", i, _unit(i), _meta(i))
    for i in range(150):
        parts.drop(i)
    assert len(parts) == 50
    found = parts.search("p", _unit(3), 60, now=0.0)
    assert sorted(i for i, _ in found) == list(range(150, 200))
    for i in range(150, 200):
        parts.drop(i)
    assert len(parts) == 0 and parts.search("p", _unit(3), 5, now=0.0) == []


def test_last_user_text_only_for_a_plain_text_user_turn():
    assert last_user_text({"messages": [{"role": "user", "content": "hi"}]}) == "hi"
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert last_user_text({"messages": [{"role": "user", "content": parts}]}) == "a\nb"
    image = [{"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": "x"}}]
    assert last_user_text({"messages": [{"role": "user", "content": image}]}) is None
    assert last_user_text({"messages": [{"role": "assistant", "content": "hi"}]}) is None
    assert last_user_text({"messages": [{"role": "user", "content": "  "}]}) is None


def test_context_hash_ignores_the_last_turn_and_delivery_but_not_the_rest():
    base = {"model": "m", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"}]}
    other_q = {**base, "messages": [base["messages"][0], {"role": "user", "content": "q2"}]}
    assert context_hash(base) == context_hash(other_q) == context_hash({**base, "stream": True, "user": "u"})
    assert context_hash(base) != context_hash({**base, "tools": [{"type": "function"}]})
    assert context_hash(base) != context_hash(
        {**base, "messages": [{"role": "system", "content": "t"}, *base["messages"][1:]]}
    )


def test_answers_on_the_same_evidence_are_one_answer():
    one = {"choices": [{"message": {"content": "Thirty days."}}]}
    two = {"choices": [{"message": {"content": "You have 30 days."}}]}
    assert answer_id(one, ("kb-1", "kb-2")) == answer_id(two, ("kb-2", "kb-1"))
    assert answer_id(one, ()) != answer_id(two, ()) and answer_id(one, ()) == answer_id(dict(one), ())


def test_a_partition_that_grows_gets_a_graph_built_from_a_snapshot_plus_what_came_meanwhile():
    from thrifty.cache.semantic.index import ExactIndex, HnswIndex
    from thrifty.cache.semantic.partitions import build_graph

    parts = Partitions(8, graph_at=50)
    part = None
    for i in range(51):
        part = parts.add("p", i, _unit(i), _meta(i))
    assert part is not None and part.wants_graph and isinstance(part._index, ExactIndex)
    snapshot = part.start_graph()
    assert len(snapshot.ids) == 51 and not part.wants_graph  # one build at a time
    parts.add("p", 51, _unit(51), _meta(51))  # added while the graph is built...
    parts.drop(3)  # ...and one dropped
    part.finish_graph(build_graph(8, snapshot))
    assert isinstance(part._index, HnswIndex)
    found = {i for i, _ in parts.search("p", _unit(51), 60, now=0.0)}
    assert 51 in found and 3 not in found and len(found) == 51
    assert parts.search("p", _unit(7), 1, now=0.0)[0][0] == 7


def test_small_partitions_stay_small():
    parts = Partitions(384)
    for i in range(200):  # e.g. one partition per user
        parts.add(f"user-{i}", i, _unit(i, 384), _meta(i))
    index = parts._parts["user-0"]._index
    assert index._vectors.nbytes <= 16 * 384 * 4  # no megabyte preallocated per partition
