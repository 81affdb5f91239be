"""Quality gates: does a cheap tier's draft answer well enough to return it, or must the cascade escalate?

Each gate looks at one draft (the request that was sent and the completion that came back) and
returns a Verdict. Most are pure checks of the reply; the agreement gate asks other models the same
question through `ask`, so its calls go through the pipeline and are priced and recorded like any
other. Gates never raise on a bad reply: a reply that cannot be judged fails the gate (precision
first: escalating costs money, returning a wrong answer costs trust).
"""

from __future__ import annotations

import importlib
import json
import math
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import jsonschema
import pydantic

from thrifty.errors import ConfigError
from thrifty.routing.answers import canonical
from thrifty.routing.train.router import Router
from thrifty.settings import GateSettings
from thrifty.shapes import last_user_message_text


@dataclass(frozen=True, slots=True)
class Draft:
    model: str  # the model alias that wrote it
    request: Mapping[str, Any]
    response: Mapping[str, Any]

    @property
    def text(self) -> str:
        return reply_text(self.response)


@dataclass(frozen=True, slots=True)
class Verdict:
    passed: bool
    reason: str
    # The reply to deliver when it is not the draft as called (one sample of several).
    response: Mapping[str, Any] | None = None


# Ask another model (by alias) the draft's question; None when that call failed.
Ask = Callable[[str], Awaitable[Draft | None]]


class Gate(Protocol):
    async def judge(self, draft: Draft, ask: Ask) -> Verdict: ...


def reply_text(response: Mapping[str, Any]) -> str:
    choices = response.get("choices") or []
    message = (choices[0].get("message") or {}) if choices else {}
    content = message.get("content")
    return content if isinstance(content, str) else ""


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def reply_json(text: str) -> Any | None:
    """The JSON value of a reply: the whole text, a fenced block, or the first complete object in it."""
    for candidate in (text, *_FENCE.findall(text)):
        try:
            return json.loads(candidate)
        except ValueError:
            pass
    decoder = json.JSONDecoder()
    for match in re.finditer(r"[{\[]", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except ValueError:
            continue
        return value
    return None


def normalised_answer(value: Any) -> str:
    """Compare answers the way a reader would: case, spacing, thousands separators and $ ignored;
    numbers by value ("42.0" == "42", "1/2" == "0.5" == "\\frac{1}{2}"), \\boxed{} unwrapped,
    units after a number dropped, choice letters by letter ("(B)" == "B." == "Answer: B")."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    key = canonical(text)
    if key is not None and not key.startswith("text:"):
        return key
    return re.sub(r"\s+", " ", text.strip().lower()).replace("$", "").strip(" .")


def field_value(text: str, field: str | None) -> Any | None:
    """The compared part of a reply: a field of its JSON, or the whole text."""
    if field is None:
        return text if text.strip() else None
    parsed = reply_json(text)
    if not isinstance(parsed, dict):
        return None
    return parsed.get(field)


def load_object(spec: str, what: str) -> Any:
    """'package.module:attribute' -> the attribute (user-supplied gates and models)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{what}: {spec!r} must look like 'package.module:name'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"{what}: cannot load {spec!r}: {err}") from err


class JsonSchemaGate:
    def __init__(self, schema: Mapping[str, Any]) -> None:
        schema = dict(schema)
        try:
            validator_cls = jsonschema.validators.validator_for(schema)
            validator_cls.check_schema(schema)
        except jsonschema.SchemaError as err:
            raise ConfigError(f"json_schema gate: the schema is invalid: {err.message}") from err
        self._validator = validator_cls(schema)

    async def judge(self, draft: Draft, ask: Ask) -> Verdict:
        parsed = reply_json(draft.text)
        if parsed is None:
            return Verdict(False, "json_schema: the reply is not JSON")
        error = jsonschema.exceptions.best_match(self._validator.iter_errors(parsed))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "(root)"
            return Verdict(False, f"json_schema: {where}: {error.message}")
        return Verdict(True, "json_schema: valid")


class PydanticGate:
    def __init__(self, spec: str) -> None:
        model = load_object(spec, "pydantic gate")
        if not (isinstance(model, type) and issubclass(model, pydantic.BaseModel)):
            raise ConfigError(f"pydantic gate: {spec!r} is not a pydantic model class")
        self._model = model
        self._name = model.__name__

    async def judge(self, draft: Draft, ask: Ask) -> Verdict:
        parsed = reply_json(draft.text)
        if parsed is None:
            return Verdict(False, f"pydantic {self._name}: the reply is not JSON")
        try:
            self._model.model_validate(parsed)
        except pydantic.ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(root)"
            return Verdict(False, f"pydantic {self._name}: {where}: {first['msg']}")
        return Verdict(True, f"pydantic {self._name}: valid")


class AgreementGate:
    """Other (cheap) models answer the same question; accept when enough give the same answer."""

    def __init__(self, voters: Sequence[str], field: str | None, min_agree: int | None) -> None:
        self._voters = list(voters)
        self._field = field
        self._need = min_agree if min_agree is not None else len(self._voters)
        if self._need > len(self._voters):
            raise ConfigError(f"agreement gate: min_agree {self._need} > {len(self._voters)} voters")

    async def judge(self, draft: Draft, ask: Ask) -> Verdict:
        mine = field_value(draft.text, self._field)
        if mine is None:
            return Verdict(False, f"agreement: the draft has no {self._field or 'answer'}")
        key = normalised_answer(mine)
        agree = 0
        for asked, voter in enumerate(self._voters, start=1):
            # Stop asking as soon as the outcome is settled: every voter is a paid call.
            if agree >= self._need or agree + len(self._voters) - asked + 1 < self._need:
                break
            other = await ask(voter)
            value = field_value(other.text, self._field) if other is not None else None
            if value is not None and normalised_answer(value) == key:
                agree += 1
        verdict = f"agreement: {agree}/{self._need} voters agree on {str(mine)[:40]!r}"
        return Verdict(agree >= self._need, verdict)


def one_choice(response: Mapping[str, Any], index: int) -> dict[str, Any]:
    """The response as if it had only its choice `index` (renumbered 0); usage is the call's."""
    choices = response.get("choices") or []
    return {**response, "choices": [{**choices[index], "index": 0}]}


class SelfConsistencyGate:
    """The draft's tier sampled `samples` times; accept when `min_agree` samples give one answer
    (default: a majority). The cascade asks for every sample in the draft call itself (`n`) where
    the provider has it; samples still missing (Anthropic has no `n`) are asked one call each, and
    no more than needed to settle the vote. Answers compare as `agreement` does (the JSON reply's
    `field`, or the whole reply, with answer equivalence), and the sample delivered is the first
    that gives the winning answer."""

    def __init__(self, samples: int, min_agree: int | None, field: str | None) -> None:
        self.samples = samples
        self._need = min_agree if min_agree is not None else samples // 2 + 1
        self._field = field

    def _key(self, text: str) -> str | None:
        value = field_value(text, self._field)
        return None if value is None else normalised_answer(value)

    async def judge(self, draft: Draft, ask: Ask) -> Verdict:
        asked_n = draft.request.get("n")
        if isinstance(asked_n, int) and asked_n > 1 and asked_n != self.samples:
            return Verdict(False, f"self_consistency: the client asked for n={asked_n} choices")
        choices = list(draft.response.get("choices") or [])[: self.samples]
        replies: list[Mapping[str, Any]] = [one_choice(draft.response, i) for i in range(len(choices))]
        keys = [self._key(reply_text(r)) for r in replies]

        def tally() -> tuple[str | None, int]:
            counts = Counter(k for k in keys if k is not None)
            return counts.most_common(1)[0] if counts else (None, 0)

        top, count = tally()
        while (
            len(keys) < self.samples and count < self._need and count + self.samples - len(keys) >= self._need
        ):
            other = await ask(draft.model)
            replies.append(other.response if other is not None else {})
            keys.append(self._key(other.text) if other is not None else None)
            top, count = tally()
        shown = field_value(reply_text(replies[keys.index(top)]), self._field) if top is not None else None
        reason = (
            f"self_consistency: {count}/{len(keys)} samples agree on {str(shown)[:40]!r}, need {self._need}"
        )
        if count < self._need:
            return Verdict(False, reason)
        return Verdict(True, reason, replies[keys.index(top)])


class LogprobGate:
    """Mean token probability of the reply (providers return logprobs when asked; thrifty asks)."""

    def __init__(self, threshold: float) -> None:
        self._threshold = threshold

    async def judge(self, draft: Draft, ask: Ask) -> Verdict:
        choices = draft.response.get("choices") or []
        tokens = ((choices[0].get("logprobs") or {}).get("content") or []) if choices else []
        values = [
            t["logprob"] for t in tokens if isinstance(t, dict) and isinstance(t.get("logprob"), int | float)
        ]
        if not values:
            return Verdict(False, "logprob: the provider returned no logprobs")
        confidence = math.exp(sum(values) / len(values))
        return Verdict(
            confidence >= self._threshold, f"logprob: mean p {confidence:.3f} vs {self._threshold}"
        )


class SelfConfidenceGate:
    """The model's own confidence field (0..1, or a percentage) in its JSON reply."""

    def __init__(self, field: str, threshold: float) -> None:
        self._field = field
        self._threshold = threshold

    async def judge(self, draft: Draft, ask: Ask) -> Verdict:
        value = field_value(draft.text, self._field)
        try:
            confidence = float(value) if value is not None and not isinstance(value, bool) else None
        except (TypeError, ValueError):
            confidence = None
        if confidence is None:
            return Verdict(False, f"self_confidence: no numeric {self._field!r} in the reply")
        if confidence > 1:
            confidence /= 100  # "confidence": 85 means 85%
        return Verdict(
            confidence >= self._threshold, f"self_confidence: {confidence:.2f} vs {self._threshold}"
        )


class PythonGate:
    """A user function `(request, response) -> bool | (bool, reason)`, for checks only the app knows."""

    def __init__(self, spec: str) -> None:
        fn = load_object(spec, "python gate")
        if not callable(fn):
            raise ConfigError(f"python gate: {spec!r} is not callable")
        self._fn = fn
        self._name = spec

    async def judge(self, draft: Draft, ask: Ask) -> Verdict:
        outcome = self._fn(draft.request, draft.response)
        if isinstance(outcome, tuple):
            passed, reason = outcome
            return Verdict(bool(passed), f"{self._name}: {reason}")
        return Verdict(bool(outcome), f"{self._name}: {'pass' if outcome else 'fail'}")


class RouterScorerGate:
    """FrugalGPT-style: a learned P(the draft is right | prompt, draft), from a trained router's
    first-tier scorer, accepted at or above a threshold."""

    def __init__(self, router: Router, task: str | None, threshold: float) -> None:
        self._router = router
        self._task = task
        self._threshold = threshold

    async def judge(self, draft: Draft, ask: Ask) -> Verdict:
        prompt = last_user_message_text(draft.request.get("messages")) or ""
        p = self._router.draft_confidence(self._task, prompt, draft.text)
        return Verdict(p >= self._threshold, f"router_scorer: P(right) {p:.3f} vs {self._threshold}")


def build_gate(settings: GateSettings, router: Router | None = None, task: str | None = None) -> Gate:
    kind = settings.kind
    if kind == "json_schema":
        assert settings.json_schema is not None
        return JsonSchemaGate(settings.json_schema)
    if kind == "pydantic":
        assert settings.target is not None
        return PydanticGate(settings.target)
    if kind == "agreement":
        return AgreementGate(settings.voters, settings.field, settings.min_agree)
    if kind == "logprob":
        assert settings.threshold is not None
        return LogprobGate(settings.threshold)
    if kind == "self_confidence":
        assert settings.field is not None and settings.threshold is not None
        return SelfConfidenceGate(settings.field, settings.threshold)
    if kind == "python":
        assert settings.target is not None
        return PythonGate(settings.target)
    if kind == "self_consistency":
        assert settings.samples is not None
        return SelfConsistencyGate(settings.samples, settings.min_agree, settings.field)
    if router is None:
        raise ConfigError("a router_scorer gate needs a trained router on the route (router: {path: ...})")
    return RouterScorerGate(router, task, settings.threshold if settings.threshold is not None else 0.9)


async def judge_all(gates: Sequence[Gate], draft: Draft, ask: Ask) -> Verdict:
    """All gates in order; the first failure decides (later gates, which may cost calls, are skipped)."""
    reasons: list[str] = []
    chosen: Mapping[str, Any] | None = None
    for gate in gates:
        verdict = await gate.judge(draft, ask)
        if not verdict.passed:
            return verdict
        reasons.append(verdict.reason)
        chosen = verdict.response or chosen
    return Verdict(True, "; ".join(reasons) or "no gates", chosen)


__all__ = [
    "AgreementGate",
    "Ask",
    "Draft",
    "Gate",
    "JsonSchemaGate",
    "LogprobGate",
    "PydanticGate",
    "PythonGate",
    "RouterScorerGate",
    "SelfConfidenceGate",
    "SelfConsistencyGate",
    "Verdict",
    "build_gate",
    "judge_all",
    "load_object",
    "normalised_answer",
    "reply_json",
]
