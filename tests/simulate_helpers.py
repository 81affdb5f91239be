"""A tiny hand-made workload whose every layer's saving is known to the Decimal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import yaml

BIG, SMALL = "big-1", "small-1"
SCHEMA = {"type": "object", "required": ["answer"], "properties": {"answer": {"type": "string"}}}
HISTORY = [
    {"role": "user", "content": "Tell me a long story about the sea. " * 20},
    {"role": "assistant", "content": "Once upon a time the sea was calm. " * 20},
    {"role": "user", "content": "and now?"},
]


def completion(model: str, text: str, prompt: int, output: int) -> dict[str, Any]:
    return {
        "id": "chatcmpl-rec",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output},
    }


def _line(
    ts: float, route: str, content: Any, text: str, prompt: int, output: int, **extra: Any
) -> dict[str, Any]:
    messages = content if isinstance(content, list) else [{"role": "user", "content": content}]
    return {
        "ts": ts,
        "tenant": "acme",
        "route": route,
        "feature": route,
        "request": {"model": "big", "messages": messages, "temperature": 0},
        "response": completion(BIG, text, prompt, output),
        "model": BIG,
        **extra,
    }


def traffic_lines() -> list[dict[str, Any]]:
    """Prices: big $10 in / $30 out, small $1 / $3 per million tokens; batch half price."""
    hours = "We are open 9 to 5."
    return [
        _line(0, "faq", "What are your opening hours?", hours, 100, 20, idempotency_key="k1", label="hours"),
        _line(1, "faq", "What are your opening hours?", hours, 100, 20, idempotency_key="k1", label="hours"),
        _line(10, "faq", "What are your opening hours?", hours, 100, 20, user="u2", label="hours"),
        _line(20, "faq", "what are your opening hours", hours, 100, 20, label="hours"),
        _line(30, "chat", HISTORY, "The sea is calm now.", 500, 20),
        _line(40, "math", "What is 2+2? Answer in JSON.", '{"answer": "4"}', 50, 10),
        _line(50, "math", "What is 3+3? Answer in JSON.", '{"answer": "6"}', 50, 10),
        _line(60, "math", "What is 5+5? Answer in JSON.", '{"answer": "10"}', 50, 10),
        _line(70, "nightly", "Classify: my card is lost", "lost_card", 100, 20),
    ]


def outputs_rows() -> list[dict[str, Any]]:
    """The small model's recorded drafts (exact usage), and correctness labels for both models."""

    def recording(prompt: str, text: str) -> dict[str, Any]:
        return {
            "thrifty_recording": 1,
            "model": SMALL,
            "messages": [{"role": "user", "content": prompt}],
            "response": completion(SMALL, text, 50, 10),
        }

    def labels(prompt: str, big_ok: int, small_ok: int) -> dict[str, Any]:
        return {
            "id": prompt,
            "prompt": prompt,
            "responses": {
                BIG: {"output": "x", "correct": big_ok},
                SMALL: {"output": "y", "correct": small_ok},
            },
        }

    return [
        recording("What is 2+2? Answer in JSON.", '{"answer": "4"}'),
        recording("What is 3+3? Answer in JSON.", "six, I think"),  # fails the JSON gate: escalates
        labels("What is 2+2? Answer in JSON.", 1, 1),
        labels("What is 3+3? Answer in JSON.", 1, 0),
    ]


def candidate_settings(tmp_path: Path, data: list[str], **extra: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "storage": {"url": f"sqlite:///{tmp_path / 'live.db'}"},
        "providers": {"p": {"kind": "replay", "data": data, "batch_discount": "0.5"}},
        "models": {
            "big": {"provider": "p", "upstream": BIG, "price": {"input_per_mtok": 10, "output_per_mtok": 30}},
            "small": {
                "provider": "p",
                "upstream": SMALL,
                "price": {"input_per_mtok": 1, "output_per_mtok": 3},
            },
        },
        "routes": {
            "faq": {"model": "big", "cache": {"ttl_s": 3600}, "semantic_cache": {"ttl_s": 3600}},
            "chat": {"model": "big", "context": {"history": {"budget": 20, "over": "trim"}}},
            "math": {
                "model": "big",
                "strategy": "cascade",
                "tiers": ["small", "big"],
                "gates": [{"kind": "json_schema", "json_schema": SCHEMA}],
            },
            "nightly": {"model": "big", "defer": {"after": "24h", "max_batch": 10, "max_age_s": 0.2}},
        },
        "batch": {"poll_interval_s": 0.1},
        "resilience": {"max_retries": 0},
    }
    settings.update(extra)
    return settings


def write_workload(tmp_path: Path, **extra: Any) -> tuple[Path, Path, Path]:
    traffic = tmp_path / "traffic.jsonl"
    traffic.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in traffic_lines()))
    outputs = tmp_path / "outputs.jsonl"
    outputs.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in outputs_rows()))
    settings = tmp_path / "candidate.yaml"
    settings.write_text(yaml.safe_dump(candidate_settings(tmp_path, [str(traffic), str(outputs)], **extra)))
    return traffic, outputs, settings
