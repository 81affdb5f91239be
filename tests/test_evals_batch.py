"""`eval run --via batch`: the golden set's calls as batch jobs through the gateway's batch
service, at batch prices (the ledger's, to the exact Decimal), and a rerun sends nothing again."""

from __future__ import annotations

import os
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from rich.console import Console

from tests.backends import pg_url, query, services, storage  # noqa: F401 - fixtures
from tests.conftest import base_settings
from tests.fakes.openai_batch_wire import OpenAIBatchWireServer
from thrifty.errors import InvalidData
from thrifty.evals.command import run_command

KEY = "sk-batch-eval"


@pytest.fixture
def oa(loop_thread: Any) -> Iterator[OpenAIBatchWireServer]:
    server = OpenAIBatchWireServer(api_key=KEY)
    loop_thread.run(server.start())
    yield server
    loop_thread.run(server.stop())


def test_eval_via_batch_is_priced_at_batch_prices_and_resumes(
    tmp_path: Path,
    oa: OpenAIBatchWireServer,
    monkeypatch: pytest.MonkeyPatch,
    storage: dict[str, Any],  # noqa: F811
) -> None:
    """On either store: the batch store, the ledger and the costs read back through its ports."""
    monkeypatch.setenv("OA_KEY", KEY)
    settings = base_settings(
        tmp_path,
        storage=storage,
        providers={"oa": {"kind": "openai", "base_url": oa.base_url, "api_key_env": "OA_KEY"}},
        models={"gpt-4o-mini": {"provider": "oa", "upstream": "gpt-4o-mini"}},
        batch={"poll_interval_s": 0.05},
    )
    golden = tmp_path / "golden.jsonl"
    expected = ["Hello from the fake OpenAI server."] * 3 + ["no"]
    lines = [
        {"id": f"q{i}", "prompt": f"hi {i}", "expected": e, "scorer": "exact"} for i, e in enumerate(expected)
    ]
    golden.write_text("\n".join(orjson.dumps(line).decode() for line in lines))
    quiet = Console(file=open(os.devnull, "w"), width=160)  # noqa: SIM115

    def run(out: Path, via: str) -> dict[str, Any]:
        return run_command(
            settings, golden_path=golden, models="gpt-4o-mini", route=None, out=out, tenant="acme",
            concurrency=2, confidence=0.95, labelled_out=None, console=quiet, via=via,
        )  # fmt: skip

    batch = run(tmp_path / "batch.json", "batch")["models"]["gpt-4o-mini"]
    assert (batch["items"], batch["passed"], batch["failures"]) == (4, 3, 0)
    # One batch of the four lines (the fake records each batch line it answers as a request too).
    assert oa.batch_creations == 1 and len(oa.requests) == 4
    assert [len(b.lines) for b in oa.batches.values()] == [4]
    rows = query(settings, "SELECT batch, feature, cost_usd FROM ledger")
    assert len(rows) == 4 and {(b, f) for b, f, _ in rows} == {(1, "eval")}
    assert Decimal(batch["cost_usd"]) == sum((Decimal(c) for _, _, c in rows), Decimal(0)) > 0
    realtime = run(tmp_path / "realtime.json", "realtime")["models"]["gpt-4o-mini"]
    assert realtime["passed"] == 3 and len(oa.requests) == 8 and oa.batch_creations == 1
    # Batch prices: genai-prices' batch variant of gpt-4o-mini is half the real-time price.
    assert Decimal(batch["cost_usd"]) * 2 == Decimal(realtime["cost_usd"])
    # A rerun finds everything journaled: no new batch, no new ledger row.
    again = run(tmp_path / "batch.json", "batch")["models"]["gpt-4o-mini"]
    assert again == batch and oa.batch_creations == 1
    with pytest.raises(InvalidData, match="--via must be"):
        run(tmp_path / "x.json", "carrier-pigeon")
