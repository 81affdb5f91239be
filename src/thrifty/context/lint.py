"""`thrifty prompt lint`: where a prompt's tokens go, and what each avoidable part costs per day.

Findings (pure; the command reads the prompt and the traffic):
- `repeat`: a sentence said more than once across the system and developer prompts (each repeat
  after the first is the waste);
- `few-shot`: worked examples (user/assistant pairs before the last user turn, or `Example:`,
  `Input:`/`Output:`, `Q:`/`A:` blocks in a prompt) and their share of the prompt;
- `filler`: phrases that cost tokens and change nothing ("please be thorough and detailed",
  "including but not limited to", ...);
- `format`: output-format instructions in prose that a JSON schema (`response_format`) would enforce.
Each finding has its tokens and, given the route's traffic and input price, dollars per day.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from thrifty.context.evidence import sentences
from thrifty.context.markup import has_markup, parse, render
from thrifty.context.sections import CountCache, split

FILLER = (
    "please be thorough and detailed",
    "be thorough and detailed",
    "including but not limited to",
    "it is important to note that",
    "it's important to note that",
    "please note that",
    "it is crucial that",
    "it is essential that",
    "make sure to",
    "please make sure",
    "please ensure that",
    "feel free to",
    "as an ai language model",
    "at the end of the day",
    "in order to",
    "take a deep breath",
    "do your best",
    "to the best of your ability",
    "i want you to",
    "your task is to",
)
_FORMAT = re.compile(
    r"\b(json|yaml|xml)\b.*\b(format|object|keys?|fields?|schema|valid|only)\b|"
    r"\b(respond|reply|answer|output|return)\b.*\b(format|json|keys?|fields?)\b|"
    r"\bdo not (include|add|output) any (other|additional|extra) text\b",
    re.IGNORECASE,
)
_EXAMPLE = re.compile(r"^\s*(example\s*\d*\s*:|input\s*:|q\s*:|question\s*:|user\s*:)", re.IGNORECASE)
_EXAMPLE_END = re.compile(r"^\s*$")


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str  # repeat | few-shot | filler | format
    where: str  # the message (and section) it is in
    text: str
    tokens: int
    note: str = ""

    def to_json(self, usd_per_token_day: Decimal | None) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "where": self.where,
            "text": self.text,
            "tokens": self.tokens,
            "note": self.note,
            "usd_per_day": None if usd_per_token_day is None else str(usd_per_token_day * self.tokens),
        }


@dataclass(slots=True)
class LintReport:
    sections: dict[str, int]
    prompt_tokens: int
    findings: list[Finding] = field(default_factory=list)

    def to_json(self, usd_per_token_day: Decimal | None) -> dict[str, Any]:
        return {
            "sections": self.sections,
            "prompt_tokens": self.prompt_tokens,
            # Findings may overlap (a repeated sentence can also be filler): not a sum to save.
            "findings_tokens": sum(f.tokens for f in self.findings),
            "usd_per_token_per_day": None if usd_per_token_day is None else str(usd_per_token_day),
            "findings": [f.to_json(usd_per_token_day) for f in self.findings],
        }


def _norm(sentence: str) -> str:
    return re.sub(r"[\W_]+", " ", sentence.lower()).strip()


def _texts(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        content = "\n".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    text = str(content or "")
    return render(parse(text, "prompt")) if has_markup(text) else text


def lint(body: Mapping[str, Any], count: CountCache) -> LintReport:
    sections = split(body, count, None)
    messages = list(body.get("messages") or ())
    report = LintReport(
        {k: v for k, v in sections.counts.items() if k != "output"},
        sum(v for k, v in sections.counts.items() if k != "output") + 3,
    )
    prompts = [
        (f"messages[{i}] ({m.get('role')})", _texts(m))
        for i, m in enumerate(messages)
        if m.get("role") in ("system", "developer")
    ]
    report.findings += _repeats(prompts, count)
    report.findings += _few_shot(messages, prompts, count, report.prompt_tokens)
    for where, text in prompts:
        report.findings += _fillers(where, text, count)
        report.findings += _formats(where, text, count)
    return report


def _repeats(prompts: Sequence[tuple[str, str]], count: Callable[[str], int]) -> list[Finding]:
    seen: dict[str, str] = {}
    found = []
    for where, text in prompts:
        for sentence in sentences(text):
            key = _norm(sentence)
            if len(key.split()) < 3:
                continue  # "Thanks." twice is not a policy said twice
            if key in seen:
                found.append(
                    Finding(
                        "repeat", where, sentence.strip(), count(sentence.strip()), f"also in {seen[key]}"
                    )
                )
            else:
                seen[key] = where
    return found


def _few_shot(
    messages: Sequence[Mapping[str, Any]],
    prompts: Sequence[tuple[str, str]],
    count: Callable[[str], int],
    total: int,
) -> list[Finding]:
    found = []
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    pairs = [
        i
        for i in range(last_user - 1)
        if messages[i].get("role") == "user" and messages[i + 1].get("role") == "assistant"
    ]
    if pairs:
        tokens = sum(count(_texts(messages[i])) + count(_texts(messages[i + 1])) + 8 for i in pairs)
        found.append(
            Finding(
                "few-shot",
                f"messages[{pairs[0]}..{pairs[-1] + 1}]",
                f"{len(pairs)} example exchanges before the question",
                tokens,
                f"{tokens / total:.0%} of the prompt" if total else "",
            )
        )
    for where, text in prompts:
        blocks = _example_blocks(text)
        if blocks:
            tokens = sum(count(b) for b in blocks)
            found.append(
                Finding(
                    "few-shot",
                    where,
                    f"{len(blocks)} worked example block(s) in the prompt",
                    tokens,
                    f"{tokens / total:.0%} of the prompt" if total else "",
                )
            )
    return found


def _example_blocks(text: str) -> list[str]:
    """Paragraphs that start like a worked example ("Example:", "Input:", "Q:")."""
    return [p for p in re.split(r"\n\s*\n", text) if _EXAMPLE.match(p)]


def _fillers(where: str, text: str, count: Callable[[str], int]) -> list[Finding]:
    lower = text.lower()
    found = []
    taken: list[tuple[int, int]] = []
    for phrase in FILLER:
        start = lower.find(phrase)
        while start != -1:
            end = start + len(phrase)
            if not any(s <= start < e for s, e in taken):  # the longer phrase already counted it
                taken.append((start, end))
                said = text[start:end]
                found.append(Finding("filler", where, said, count(" " + said)))
            start = lower.find(phrase, end)
    return found


def _formats(where: str, text: str, count: Callable[[str], int]) -> list[Finding]:
    return [
        Finding(
            "format",
            where,
            s.strip(),
            count(s.strip()),
            "a JSON schema in response_format enforces this; the prose can go",
        )
        for s in sentences(text)
        if _FORMAT.search(s)
    ]


def usd_per_token_day(requests_per_day: float, input_usd_per_mtok: Decimal) -> Decimal:
    """What one prompt token costs per day at this traffic."""
    return (Decimal(str(requests_per_day)) * input_usd_per_mtok / Decimal(1_000_000)).normalize()
