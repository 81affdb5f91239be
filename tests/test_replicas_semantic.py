"""The semantic cache across replicas: entries in one real PostgreSQL, an index in each replica.

Real gateways on loopback ports (each with its own event loop and local MiniLM), the official
openai SDK as the client, a wire-level fake upstream.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from tests.conftest import KEYS, UPSTREAM_KEY, base_settings, openai_models
from tests.fakes.openai_wire import Reply
from thrifty.server.run import BackgroundServer

pytest.importorskip("onnxruntime")

SYSTEM = {"role": "system", "content": "You are the Acme support desk."}
FAQ = {
    "What are your opening hours?": "We are open 9 to 5, Monday to Friday.",
    "How do I return an item I bought?": "Send it back within 30 days with the receipt.",
    "Do you ship to other countries?": "Yes, we ship to 40 countries.",
    "How do I reset my password?": "Use the 'forgot password' link on the sign-in page.",
}
PARAPHRASES = {
    "When are you open?": "What are your opening hours?",
    "How can I return something I purchased?": "How do I return an item I bought?",
    "Do you deliver internationally?": "Do you ship to other countries?",
}


def _config(tmp_path: Path, name: str, upstream: Any, pg_url: str) -> dict[str, Any]:
    root = tmp_path / name
    root.mkdir()
    return {
        "storage": {
            "url": pg_url,
            "spool_path": str(root / "spool.jsonl"),
            "local_path": str(root / "local.db"),
        },
        "providers": {"up": {"kind": "openai", "base_url": upstream.base_url}},
        "models": openai_models(),
        # A four-entry FAQ is far sparser than the data the built-in rule was tuned on: the route
        # sets its own floor and cut (as in test_semantic_cache_gateway.py).
        "routes": {
            "support": {
                "model": "gpt-4o-mini",
                "semantic_cache": {"ttl_s": 600, "threshold": 0.5, "min_entries": 0},
            }
        },
        "semantic": {"embed_threads": 1},
    }


def _replica(tmp_path: Path, name: str, upstream: Any, pg_url: str) -> BackgroundServer:
    data = _config(tmp_path, name, upstream, pg_url)
    return BackgroundServer(base_settings(tmp_path / name, **data), secrets={"up": UPSTREAM_KEY})


def _ask(server: BackgroundServer, question: str, tenant: str = "acme", **headers: str) -> Any:
    client = openai.OpenAI(base_url=server.base_url, api_key=KEYS[tenant], max_retries=0)
    return client.chat.completions.with_raw_response.create(
        model="route:support",
        messages=[SYSTEM, {"role": "user", "content": question}],  # type: ignore[list-item]
        temperature=0,
        extra_headers=headers,
    )


def test_a_paraphrase_stored_via_one_replica_is_served_by_another_never_across_tenants(
    tmp_path: Path, openai_upstream: Any, pg_url: str
):
    openai_upstream.default = Reply(text="a fresh answer")
    with (
        _replica(tmp_path, "a", openai_upstream, pg_url) as a,
        _replica(tmp_path, "b", openai_upstream, pg_url) as b,
    ):
        for question, answer in FAQ.items():
            openai_upstream.queue(Reply(text=answer))
            assert _ask(a, question).headers["x-thrifty-cache"] == "miss"
        written = time.monotonic()
        # Replica b hears of a's entries by notification; until then its lookups miss (no-store:
        # the misses of the probe must not become entries of their own).
        while _ask(b, "When are you open?", **{"cache-control": "no-store"}).headers["x-thrifty-cache"] != (
            "semantic"
        ):
            assert time.monotonic() - written < 5, "replica b never saw replica a's entries"
            time.sleep(0.01)
        # Here the first request of a fresh replica (its embedder warms up); see `thrifty bench replicas`.
        print(f"cross-replica semantic-cache delay: {(time.monotonic() - written) * 1000:.1f} ms")
        calls = len(openai_upstream.requests)
        for paraphrase, original in PARAPHRASES.items():
            hit = _ask(b, paraphrase)
            assert hit.headers["x-thrifty-cache"] == "semantic", paraphrase
            assert hit.parse().choices[0].message.content == FAQ[original]
            assert hit.headers["x-thrifty-cost-usd"] == "0"
        assert len(openai_upstream.requests) == calls
        # Never across tenants, on either replica: globex's question is its own miss.
        for replica in (a, b):
            other = _ask(
                replica, "What are your opening hours?", tenant="globex", **{"cache-control": "no-store"}
            )
            assert other.headers["x-thrifty-cache"] == "miss"
            assert other.parse().choices[0].message.content == "a fresh answer"
        # A replica started later loads the shared entries at start: a hit from its first request.
        with _replica(tmp_path, "c", openai_upstream, pg_url) as c:
            late = _ask(c, "Do you deliver internationally?")
            assert late.headers["x-thrifty-cache"] == "semantic"
            assert late.parse().choices[0].message.content == FAQ["Do you ship to other countries?"]
        # A purge of acme's entries (the CLI, on PostgreSQL) applies at once on every replica.
        config = tmp_path / "cli.yaml"
        config.write_text(
            yaml.safe_dump({**_config(tmp_path, "cli", openai_upstream, pg_url), "tenants": {}})
        )
        out = subprocess.run(
            [sys.executable, "-m", "thrifty", "cache", "purge", "--tenant", "acme", "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert "(0 exact, 4 semantic)" in out.stdout
        for replica in (a, b):
            probe = _ask(replica, "When are you open?", **{"cache-control": "no-store"})
            assert probe.headers["x-thrifty-cache"] == "miss"
    import psycopg

    with psycopg.connect(pg_url) as conn:
        hits = conn.execute("SELECT count(*) FROM ledger WHERE cache = 'semantic'").fetchone()
    assert hits is not None and hits[0] == 1 + len(PARAPHRASES) + 1  # the probe's hit, b's three, c's one
