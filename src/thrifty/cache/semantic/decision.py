"""The hit/miss policy of the semantic cache: pure functions over a neighbour list, no I/O.

A fixed cosine threshold cannot separate paraphrases from near-misses: MiniLM scores
"enable 2FA"/"disable 2FA" at 0.91 and "NY to Miami"/"Miami to NY" at 0.99, while many true
paraphrases score below 0.8. So the decision combines several signals:

1. Neighbourhood agreement. The top-k neighbours vote for an answer with softmax weights over
   their similarities; a query that sits among entries with one answer is a safer hit than one
   whose nearest entry is close but surrounded by other answers.
2. Margin. How much closer the winning answer's best entry is than the nearest entry with a
   *different* answer: the quantity that actually predicts a wrong hit.
3. A logistic score over these features (weights learned by ``tune`` from labelled pairs), cut at
   a threshold chosen for a target precision.
4. Content-token guards applied last, to the entry that would be served: numbers, negation,
   polar verbs (enable/disable, ...) and the order of named entities must match, because an
   embedding averages them away.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

# Feature order is part of the learned parameters' meaning; change it only with a retune.
FEATURE_NAMES: tuple[str, ...] = ("best_similarity", "margin", "vote_share", "agree_top5")


@dataclass(frozen=True, slots=True)
class Neighbour:
    """One cache entry near the query, as the index returned it."""

    similarity: float
    answer_id: str
    text: str


@dataclass(frozen=True, slots=True)
class DecisionParams:
    """Learned parameters of the policy (see ``tune.learn_params``); small enough to keep in config."""

    weights: tuple[float, ...]
    bias: float
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    threshold: float
    # Softmax temperature of the neighbour vote: 0.05 turns a 0.05 cosine gap into a factor e.
    temperature: float = 0.05
    vote_k: int = 10
    # Below this cosine nothing is a hit, whatever the neighbours say: a cheap early exit.
    min_similarity: float = 0.5
    guards: bool = True

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, for writing what ``thrifty cache tune`` learned into config."""
        data = asdict(self)
        # No threshold reached the target precision: +inf (never hit). JSON has no infinity.
        if math.isinf(self.threshold):
            data["threshold"] = "inf"
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DecisionParams:
        def floats(key: str) -> tuple[float, ...]:
            return tuple(float(x) for x in data[key])

        return cls(
            weights=floats("weights"),
            bias=float(data["bias"]),
            mean=floats("mean"),
            scale=floats("scale"),
            threshold=float(data["threshold"]),
            temperature=float(data.get("temperature", 0.05)),
            vote_k=int(data.get("vote_k", 10)),
            min_similarity=float(data.get("min_similarity", 0.5)),
            guards=bool(data.get("guards", True)),
        )


@dataclass(frozen=True, slots=True)
class Decision:
    hit: bool
    reason: str
    score: float
    answer_id: str | None = None
    entry: Neighbour | None = None


@dataclass(frozen=True, slots=True)
class Features:
    answer_id: str
    entry: Neighbour
    values: tuple[float, ...]


def features(neighbours: Sequence[Neighbour], temperature: float = 0.05, vote_k: int = 10) -> Features | None:
    """Vote among the neighbours and describe how safe serving the winner would be.

    ``neighbours`` should be sorted by similarity, best first, and hold more than ``vote_k``
    entries where possible: the margin looks past the voters for the nearest other answer.
    """
    if not neighbours:
        return None
    ranked = sorted(neighbours, key=lambda n: n.similarity, reverse=True)
    top = ranked[0].similarity
    votes: dict[str, float] = {}
    for n in ranked[:vote_k]:
        votes[n.answer_id] = votes.get(n.answer_id, 0.0) + math.exp((n.similarity - top) / temperature)
    winner = max(votes, key=lambda a: votes[a])
    share = votes[winner] / sum(votes.values())
    entry = next(n for n in ranked if n.answer_id == winner)
    other = next((n.similarity for n in ranked if n.answer_id != winner), None)
    # No other answer among the neighbours: the farthest one returned bounds the nearest other.
    nearest_other = other if other is not None else ranked[-1].similarity
    agree = sum(1 for n in ranked[:5] if n.answer_id == winner) / min(5, len(ranked))
    return Features(winner, entry, (entry.similarity, entry.similarity - nearest_other, share, agree))


def score(values: Sequence[float], params: DecisionParams) -> float:
    """Logistic estimate that serving the winning answer is correct."""
    z = params.bias
    for v, w, m, s in zip(values, params.weights, params.mean, params.scale, strict=True):
        z += w * (v - m) / s
    # Clamp: exp overflows past ~709 and the probability is saturated long before.
    return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))


def decide(query: str, neighbours: Sequence[Neighbour], params: DecisionParams) -> Decision:
    """Hit or miss for ``query`` (raw text of the last user turn) given its nearest entries."""
    feats = features(neighbours, params.temperature, params.vote_k)
    if feats is None:
        return Decision(False, "empty cache", 0.0)
    if feats.entry.similarity < params.min_similarity:
        return Decision(False, f"nearest entry too far (cos {feats.entry.similarity:.3f})", 0.0)
    p = score(feats.values, params)
    if p < params.threshold:
        return Decision(False, f"low confidence {p:.3f} < {params.threshold:.3f}", p, feats.answer_id)
    if not params.guards:
        return Decision(True, f"confidence {p:.3f}", p, feats.answer_id, feats.entry)
    # Serve through the nearest entry with the winning answer whose content tokens match the
    # query: "my card hasn't arrived" may match a sibling entry with the same negation even when
    # the closest one is phrased positively. If none matches, the first clash is the reason.
    clash: str | None = None
    for n in sorted(neighbours, key=lambda n: n.similarity, reverse=True)[: params.vote_k]:
        if n.answer_id != feats.answer_id:
            continue
        why = guard_mismatch(query, n.text)
        if why is None:
            return Decision(True, f"confidence {p:.3f}", p, feats.answer_id, n)
        clash = clash or why
    return Decision(False, f"guard: {clash}", p, feats.answer_id, feats.entry)


# --- content-token guards ---------------------------------------------------------------------

_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
_NEGATIONS = frozenset(
    {"not", "no", "never", "without", "cannot", "nothing", "none", "nor", "neither", "nobody", "nowhere"}
)
# Verb pairs whose members embed close together but ask for opposite things.
_POLAR_PAIRS: tuple[tuple[str, str], ...] = (
    ("enable", "disable"),
    ("activate", "deactivate"),
    ("lock", "unlock"),
    ("freeze", "unfreeze"),
    ("block", "unblock"),
    ("subscribe", "unsubscribe"),
    ("increase", "decrease"),
    ("add", "remove"),
    ("open", "close"),
    ("buy", "sell"),
    ("deposit", "withdraw"),
    ("import", "export"),
    ("encrypt", "decrypt"),
    ("upload", "download"),
    ("install", "uninstall"),
    ("before", "after"),
    ("above", "below"),
    ("max", "min"),
    ("maximum", "minimum"),
    ("true", "false"),
    ("on", "off"),
)
_POLAR: dict[str, tuple[int, int]] = {}
for _i, (_a, _b) in enumerate(_POLAR_PAIRS):
    for _stem, _sign in ((_a, 1), (_b, -1)):
        for _form in (
            _stem,
            _stem + "s",
            _stem + "d",
            _stem + "ed",
            _stem + "ing",
            _stem.rstrip("e") + "ing",
        ):
            _POLAR.setdefault(_form, (_i, _sign))
# An entity is a capitalised word that does not start a sentence, or an acronym/code like "NY", "2FA".
_ENTITY = re.compile(r"(?<![.!?]\s)(?<!^)\b[A-Z][A-Za-z0-9]*[A-Za-z0-9]\b|\b[A-Z0-9]*[A-Z][A-Z0-9]+\b")
_NOT_ENTITIES = frozenset({"I", "I'M", "OK", "A"})


def numbers(text: str) -> tuple[str, ...]:
    """Numbers in order, with thousands separators dropped ("1,000" == "1000")."""
    return tuple(m.replace(",", "") for m in _NUMBER.findall(text))


def negation_count(text: str) -> int:
    words = _WORD.findall(text.lower())
    return sum(1 for w in words if w in _NEGATIONS or w.endswith("n't"))


def polarity(text: str) -> dict[int, int]:
    """Which polar verb of each pair the text uses (pair index -> +1/-1)."""
    found: dict[int, int] = {}
    for w in _WORD.findall(text.lower()):
        if w in _POLAR:
            pair, sign = _POLAR[w]
            found[pair] = sign
    return found


def entities(text: str) -> tuple[str, ...]:
    """Named things in order of appearance, case-folded."""
    out = []
    for m in _ENTITY.finditer(text.strip()):
        token = m.group(0)
        if token.upper() not in _NOT_ENTITIES:
            out.append(token.lower())
    return tuple(out)


def guard_mismatch(query: str, entry: str) -> str | None:
    """Why ``entry``'s answer must not be served for ``query``, or None when the content agrees."""
    if sorted(numbers(query)) != sorted(numbers(entry)):
        return f"numbers differ {numbers(query)} vs {numbers(entry)}"
    if negation_count(query) % 2 != negation_count(entry) % 2:
        return "negation differs"
    q_pol, e_pol = polarity(query), polarity(entry)
    for pair, sign in q_pol.items():
        if e_pol.get(pair, sign) != sign:
            a, b = _POLAR_PAIRS[pair]
            return f"opposite verbs ({a}/{b})"
    q_ent, e_ent = entities(query), entities(entry)
    # Only when both name things: "flights NY to Miami" vs "Miami to NY" is a miss; a query that
    # names nothing is judged by the other signals.
    if q_ent and e_ent and q_ent != e_ent:
        return f"entities differ {q_ent} vs {e_ent}"
    return None
