"""`thrifty prompt lint` on a crafted prompt with known repeats, filler, examples and format prose."""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

from thrifty.context.lint import lint, usd_per_token_day
from thrifty.context.sections import CountCache
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
