"""`thrifty prompt lint` on a crafted prompt with known repeats, filler, examples and format prose."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
from rich.console import Console

from tests.backends import pg_url, services, storage  # noqa: F401 - fixtures
from tests.conftest import KEYS, UPSTREAM_KEY, base_settings, openai_models
from tests.fakes.openai_wire import OpenAIWireServer
from thrifty.context.lint import lint, usd_per_token_day
from thrifty.context.lint_run import run_prompt_lint
from thrifty.context.sections import CountCache
from thrifty.server.run import BackgroundServer
from thrifty.tokens import TokenCounter

COUNTER = TokenCounter()
SYSTEM = (
    "You are the support assistant of Acme. Never promise a refund before checking the order. "
    "Please be thorough and detailed, including but not limited to shipping and returns.\n\n"
    "Example: Where is my parcel? -> Let me check the tracking number for you."
)
DEVELOPER = (
    "Never promise a refund before checking the order. Respond only in JSON format with the keys "
    "answer and confidence. Thanks."
)
BODY = {
    "messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "developer", "content": DEVELOPER},
        {"role": "user", "content": "Do you ship to Norway?"},
        {"role": "assistant", "content": '{"answer": "Yes.", "confidence": 0.9}'},
        {"role": "user", "content": "Can I get a refund?"},
    ]
}


def test_findings_on_a_crafted_prompt() -> None:
    report = lint(BODY, CountCache(COUNTER))
    kinds = [(f.kind, f.where, f.text) for f in report.findings]
    assert ("repeat", "messages[1] (developer)", "Never promise a refund before checking the order.") in kinds
    assert sum(1 for k in kinds if k[0] == "repeat") == 1  # "Thanks." alone is not a repeated policy
    fillers = [f for f in report.findings if f.kind == "filler"]
    assert [f.text for f in fillers] == ["Please be thorough and detailed", "including but not limited to"]
    assert fillers[1].tokens == COUNTER.count_text(" including but not limited to")
    formats = [f for f in report.findings if f.kind == "format"]
    assert [f.text for f in formats] == ["Respond only in JSON format with the keys answer and confidence."]
    shots = [f for f in report.findings if f.kind == "few-shot"]
    assert [f.where for f in shots] == ["messages[2..3]", "messages[0] (system)"]
    repeat = next(f for f in report.findings if f.kind == "repeat")
    assert repeat.tokens == COUNTER.count_text("Never promise a refund before checking the order.")
    per_token = usd_per_token_day(10_000, Decimal("2.50"))
    assert per_token == Decimal("0.025")
    assert repeat.to_json(per_token)["usd_per_day"] == str(per_token * repeat.tokens)
    assert report.sections["system"] == COUNTER.count_text(SYSTEM) + 4


def test_prompt_lint_command_prints_json(tmp_path: Path) -> None:
    path = tmp_path / "prompt.json"
    path.write_text(json.dumps(BODY), encoding="utf-8")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "thrifty",
            "prompt",
            "lint",
            str(path),
            "--format",
            "json",
            "--requests-per-day",
            "10000",
            "--input-price",
            "2.50",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={"COLUMNS": "200", "PATH": ""},
    ).stdout
    (result,) = json.loads(out)
    assert result["usd_per_token_per_day"] == "0.025"
    assert {f["kind"] for f in result["findings"]} == {"repeat", "filler", "format", "few-shot"}
    bad = tmp_path / "bad.json"
    bad.write_text("{", encoding="utf-8")
    failed = subprocess.run(
        [sys.executable, "-m", "thrifty", "prompt", "lint", str(bad)], capture_output=True, text=True
    )
    assert failed.returncode == 2 and "not valid JSON" in failed.stderr and "Traceback" not in failed.stderr


def test_prompt_lint_counts_a_routes_traffic_on_either_store(
    tmp_path: Path,
    openai_upstream: OpenAIWireServer,
    storage: dict[str, Any],  # noqa: F811
) -> None:
    """`--route`'s requests per day come through the ledger reader port: the SQLite file or
    PostgreSQL, counted by route and prompt version, the requests of other routes left out."""
    settings = base_settings(
        tmp_path,
        storage=storage,
        providers={"up": {"kind": "openai", "base_url": openai_upstream.base_url, "api_key_env": "UP_KEY"}},
        models=openai_models(),
        routes={"support": {"model": "gpt-4o-mini", "record": {"sample": 1.0}}},
        resilience={"max_retries": 0},
    )
    with BackgroundServer(settings, secrets={"up": UPSTREAM_KEY}) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key=KEYS["acme"], max_retries=0)
        for model, version in (("route:support", "v1"), ("route:support", "v2"), ("route:support", "v2")):
            client.chat.completions.create(
                model=model,
                messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}],
                extra_headers={"x-thrifty-prompt-version": version},
            )
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    quiet = Console(file=io.StringIO(), width=200)

    def lint_route(version: str | None) -> dict[str, Any]:
        (result,) = run_prompt_lint(
            None, tenant="acme", console=quiet, settings=settings, route="support",
            prompt_version=version, days=1.0, as_json=True,
        )  # fmt: skip
        return result

    every = lint_route(None)
    assert every["traffic"] == "route 'support': 3.0 requests/day over 1 days, gpt-4o-mini input"
    assert Decimal(every["usd_per_token_per_day"]) == usd_per_token_day(3.0, Decimal("0.15"))
    assert lint_route("v2")["traffic"].startswith("route 'support': 2.0 requests/day")
    assert {f["kind"] for f in every["findings"]} >= {"filler"}
