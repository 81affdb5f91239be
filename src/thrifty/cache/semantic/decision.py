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
4. Content-token guards (``guards``) applied last, to the entry that would be served: numbers, negation,
   polar verbs (enable/disable, ...) and the order of named entities must match, because an
   embedding averages them away.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from thrifty.cache.semantic.guards import guard_mismatch

# Features of the first tuned policy (four weights); parameter files that name no features use them.
LEGACY_FEATURES: tuple[str, ...] = ("best_similarity", "margin", "vote_share", "agree_top5")
# Every feature ``features`` can compute, by name. A parameter set names the ones it was fitted on,
# in order, so the order of its weights is explicit and old files keep their meaning.
FEATURE_NAMES: tuple[str, ...] = (
    *LEGACY_FEATURES,
    # Mean similarity of the winning answer's three nearest entries (padded with the nearest other).
    "top3_similarity",
    # log(1 + words in the query): short queries ("card declined") are more ambiguous.
    "log_words",
    # Vote share at a sharper temperature (0.02): the nearest few entries only.
    "vote_share_sharp",
    # Fraction of the ten nearest entries that carry the winning answer.
    "agree_top10",
    # top3_similarity minus the nearest other answer's similarity: a margin less sensitive to one
    # stray near-duplicate.
    "top3_margin",
    # Jaccard overlap of content words (stop words dropped) between the query and the winning
    # answer's nearest entry, and between the query and the nearest entry with another answer:
    # a second, lexical similarity next to the embedding's.
    "lexical_overlap",
    "lexical_overlap_other",
    # Density of the cache around the query, whatever the answers: the similarity of the 5th, 10th
    # and 20th nearest entries (0 when the cache returned fewer). A sparse cache (a new partition)
    # puts a query's nearest entry at a neighbouring intent that is simply not cached yet, with
    # nothing else nearby to disagree, so agreement and margins look confident; these let the
    # model ask for more there.
    "similarity_5th",
    "similarity_10th",
    "similarity_20th",
    # log(1 + entries within cosine 0.6 of the query) among those returned.
    "log_near_count",
)
DENSITY_FEATURES: tuple[str, ...] = ("similarity_5th", "similarity_10th", "similarity_20th", "log_near_count")
SHARP_TEMPERATURE = 0.02
_KTH = {"similarity_5th": 5, "similarity_10th": 10, "similarity_20th": 20}
NEAR_SIMILARITY = 0.6
_STOP_WORDS = frozenset(
    (  # noqa: SIM905 (a word list reads better as prose)
        "a an the i i'm im me my mine you your we our us it its is am are was were be been being do "
        "does did doing have has had can could would should will shall may might must to of in on "
        "at for from by with about as into and or but if so that this these those there here what "
        "which who whom whose when where why how please just still yet again also too very any some"
    ).split()
)


@dataclass(frozen=True, slots=True)
class Neighbour:
    """One cache entry near the query, as the index returned it."""

    similarity: float
    answer_id: str
    text: str


@dataclass(frozen=True, slots=True)
class DecisionParams:
    """Learned parameters of the policy (see ``tune.learn_params``); small enough to keep in config.

    The score is ``sigmoid(bias + weights . standardise(expand(features)))`` where ``expand`` appends
    the pairwise products of the features when ``interactions`` is set (a quadratic logistic model).
    """

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
    features: tuple[str, ...] = LEGACY_FEATURES
    interactions: bool = False
    # Threshold schedule by cache (partition) size: a cache of N entries uses the threshold of the
    # largest step <= N, and never hits below the first step (too sparse to certify). Empty: one
    # threshold at every size (parameter files from before the schedule). ``threshold`` is the one
    # for the densest cache tuned on, and is used when the caller does not say how big the cache is.
    size_steps: tuple[int, ...] = ()
    size_thresholds: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if len(self.size_steps) != len(self.size_thresholds):
            raise ValueError(f"{len(self.size_steps)} size steps for {len(self.size_thresholds)} thresholds")
        if any(b <= a for a, b in zip(self.size_steps, self.size_steps[1:], strict=False)):
            raise ValueError(f"size steps must increase: {self.size_steps}")
        unknown = [f for f in self.features if f not in FEATURE_NAMES]
        if unknown:
            raise ValueError(f"unknown decision features {unknown}")
        n = expanded_size(len(self.features), self.interactions)
        if self.weights and not (len(self.weights) == len(self.mean) == len(self.scale) == n):
            raise ValueError(
                f"{len(self.weights)} weights, {len(self.mean)} means, {len(self.scale)} scales "
                f"for {n} expanded features"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, for writing what ``thrifty cache tune`` learned into config."""
        data = asdict(self)
        data["features"] = list(self.features)
        # No threshold reached the target precision: +inf (never hit). JSON has no infinity.
        if math.isinf(self.threshold):
            data["threshold"] = "inf"
        data["size_steps"] = list(self.size_steps)
        data["size_thresholds"] = ["inf" if math.isinf(t) else t for t in self.size_thresholds]
        return data

    def threshold_for(self, cache_size: int | None) -> float:
        """Score threshold for a cache holding ``cache_size`` entries (None: ``threshold``)."""
        if cache_size is None or not self.size_steps:
            return self.threshold
        step = bisect.bisect_right(self.size_steps, cache_size) - 1
        return self.size_thresholds[step] if step >= 0 else math.inf

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
            features=tuple(str(f) for f in data.get("features", LEGACY_FEATURES)),
            interactions=bool(data.get("interactions", False)),
            size_steps=tuple(int(x) for x in data.get("size_steps", ())),
            size_thresholds=tuple(float(x) for x in data.get("size_thresholds", ())),
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


def expanded_size(n_features: int, interactions: bool) -> int:
    return n_features + (n_features * (n_features + 1) // 2 if interactions else 0)


def expand(values: Sequence[float], interactions: bool) -> list[float]:
    """The model's inputs: the features, then (with ``interactions``) every product x_i * x_j, i <= j."""
    out = list(values)
    if interactions:
        n = len(values)
        out.extend(values[i] * values[j] for i in range(n) for j in range(i, n))
    return out


def features(
    neighbours: Sequence[Neighbour],
    temperature: float = 0.05,
    vote_k: int = 10,
    names: Sequence[str] = LEGACY_FEATURES,
    query: str = "",
) -> Features | None:
    """Vote among the neighbours and describe how safe serving the winner would be.

    ``neighbours`` should be sorted by similarity, best first, and hold more than ``vote_k``
    entries where possible: the margin looks past the voters for the nearest other answer.
    ``names`` picks the features returned, in that order (see ``FEATURE_NAMES``); ``query`` is
    only read by ``log_words``.
    """
    if not neighbours:
        return None
    ranked = sorted(neighbours, key=lambda n: n.similarity, reverse=True)
    top = ranked[0].similarity
    votes: dict[str, float] = {}
    for n in ranked[:vote_k]:
        votes[n.answer_id] = votes.get(n.answer_id, 0.0) + math.exp((n.similarity - top) / temperature)
    winner = max(votes, key=lambda a: votes[a])
    entry = next(n for n in ranked if n.answer_id == winner)
    other = next((n.similarity for n in ranked if n.answer_id != winner), None)
    # No other answer among the neighbours: the farthest one returned bounds the nearest other.
    nearest_other = other if other is not None else ranked[-1].similarity
    computed: dict[str, float] = {}
    for name in names:
        computed[name] = _feature(name, ranked, winner, entry, nearest_other, votes, vote_k, query)
    return Features(winner, entry, tuple(computed[name] for name in names))


def _feature(
    name: str,
    ranked: Sequence[Neighbour],
    winner: str,
    entry: Neighbour,
    nearest_other: float,
    votes: Mapping[str, float],
    vote_k: int,
    query: str,
) -> float:
    if name == "best_similarity":
        return entry.similarity
    if name == "margin":
        return entry.similarity - nearest_other
    if name == "vote_share":
        return votes[winner] / sum(votes.values())
    if name == "agree_top5":
        return sum(1 for n in ranked[:5] if n.answer_id == winner) / min(5, len(ranked))
    if name == "agree_top10":
        return sum(1 for n in ranked[:10] if n.answer_id == winner) / min(10, len(ranked))
    if name in ("top3_similarity", "top3_margin"):
        sims = [n.similarity for n in ranked if n.answer_id == winner][:3]
        sims += [nearest_other] * (3 - len(sims))
        top3 = sum(sims) / 3
        return top3 if name == "top3_similarity" else top3 - nearest_other
    if name in ("lexical_overlap", "lexical_overlap_other"):
        if name == "lexical_overlap":
            text = entry.text
        else:
            other = next((n for n in ranked if n.answer_id != winner), None)
            if other is None:
                return 0.0
            text = other.text
        return jaccard(content_words(query), content_words(text))
    if name in _KTH:
        k = _KTH[name]
        return max(0.0, ranked[k - 1].similarity) if len(ranked) >= k else 0.0
    if name == "log_near_count":
        return math.log1p(sum(1 for n in ranked if n.similarity >= NEAR_SIMILARITY))
    if name == "log_words":
        return math.log1p(len(query.split()))
    if name == "vote_share_sharp":
        top = ranked[0].similarity
        weights = [(n.answer_id, math.exp((n.similarity - top) / SHARP_TEMPERATURE)) for n in ranked[:vote_k]]
        return sum(w for a, w in weights if a == winner) / sum(w for _, w in weights)
    raise ValueError(f"unknown decision feature {name!r}")


def content_words(text: str) -> frozenset[str]:
    """Lower-cased words of ``text`` without stop words (digits count as words)."""
    return frozenset(w for w in re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower()) if w not in _STOP_WORDS)


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def score(values: Sequence[float], params: DecisionParams) -> float:
    """Logistic estimate that serving the winning answer is correct."""
    z = params.bias
    # No weights: an untrained template (the tuner assesses lookups with one before fitting).
    if params.weights:
        inputs = expand(values, params.interactions)
        for v, w, m, s in zip(inputs, params.weights, params.mean, params.scale, strict=True):
            z += w * (v - m) / s
    # Clamp: exp overflows past ~709 and the probability is saturated long before.
    return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))


@dataclass(frozen=True, slots=True)
class Assessment:
    """Everything ``decide`` looks at, before the threshold: shared with the tuner and the benchmark."""

    features: Features | None
    score: float
    # The entry that would be served: the nearest voter with the winning answer whose content
    # tokens match the query. None when the nearest entry is too far or every such voter clashes.
    served: Neighbour | None
    reason: str


def assess(query: str, neighbours: Sequence[Neighbour], params: DecisionParams) -> Assessment:
    """Score ``query``'s neighbourhood and find the entry that would be served, ignoring the threshold."""
    feats = features(neighbours, params.temperature, params.vote_k, params.features, query)
    if feats is None:
        return Assessment(None, 0.0, None, "empty cache")
    if feats.entry.similarity < params.min_similarity:
        return Assessment(feats, 0.0, None, f"nearest entry too far (cos {feats.entry.similarity:.3f})")
    p = score(feats.values, params)
    if not params.guards:
        return Assessment(feats, p, feats.entry, "")
    # Serve through the nearest entry with the winning answer whose content tokens match the
    # query: "my card hasn't arrived" may match a sibling entry with the same negation even when
    # the closest one is phrased positively. If none matches, the first clash is the reason.
    clash: str | None = None
    for n in sorted(neighbours, key=lambda n: n.similarity, reverse=True)[: params.vote_k]:
        if n.answer_id != feats.answer_id:
            continue
        why = guard_mismatch(query, n.text)
        if why is None:
            return Assessment(feats, p, n, "")
        clash = clash or why
    return Assessment(feats, p, None, f"guard: {clash}")


def decide(
    query: str, neighbours: Sequence[Neighbour], params: DecisionParams, *, cache_size: int | None = None
) -> Decision:
    """Hit or miss for ``query`` (raw text of the last user turn) given its nearest entries.

    ``cache_size`` is the number of real entries in the cache (partition) searched: a sparse cache
    needs a higher score (``DecisionParams.size_steps``), because the nearest entry there is often
    a neighbouring question whose own answer is not cached yet. Without it the dense threshold
    applies, as before the schedule existed.
    """
    a = assess(query, neighbours, params)
    if a.features is None:
        return Decision(False, a.reason, 0.0)
    feats = a.features
    if feats.entry.similarity < params.min_similarity:
        return Decision(False, a.reason, 0.0)
    threshold = params.threshold_for(cache_size)
    if math.isinf(threshold) and cache_size is not None and params.size_steps:
        why = f"cache too sparse for a certified hit ({cache_size} entr{'y' if cache_size == 1 else 'ies'})"
        return Decision(False, why, a.score, feats.answer_id)
    if a.score < threshold:
        return Decision(False, f"low confidence {a.score:.3f} < {threshold:.3f}", a.score, feats.answer_id)
    if a.served is None:
        return Decision(False, a.reason, a.score, feats.answer_id, feats.entry)
    return Decision(True, f"confidence {a.score:.3f}", a.score, feats.answer_id, a.served)


# --- default parameters ------------------------------------------------------------------------

# Learned on Banking77 train only (10,003 labelled banking queries, 77 intents; the test split was
# not used) by
#   thrifty cache tune --data shared/data/cache/banking77/train.csv --target-precision 0.99
# i.e. ``tune.learn_from_vectors`` with its defaults: vote over 20 neighbours, the eleven
# ``tune.TUNED_FEATURES`` with pairwise products, fitted on the leave-one-out lookups of the whole
# set. The thresholds come from density augmentation: train texts looked up against random subsets
# of the *other* train texts of each size in ``tune.DENSITY_SIZES`` (60,000 lookups per size up to
# 300 entries, 20,000 above, 200 per random subset), scored cross-fitted (folds by query), one
# threshold per size where the z = 3 one-sided Wilson lower bound of that size's precision (and,
# for the random subsets, a cluster-robust bound by subset, which did not bind here) reaches 99%,
# made non-increasing with size. No size below 500 certifies a threshold, so a cache of fewer
# than 500 entries never hits. Cross-fitted, per size: 500 entries 15.4% hits at 99.54% precision;
# 1,000: 29.1% at 99.40%; 3,000: 58.3% at 99.36%; the whole set (leave-one-out, 10,002): 70.4% at
# 99.36%. The standardisation is folded into the weights (mean 0, scale 1).
_DEFAULT_WEIGHTS: tuple[float, ...] = (
    -2.194004689503508,
    -0.29268182460118425,
    0.2801602631215696,
    0.3607348692473224,
    -3.0988935813343437,
    0.15528301042863527,
    -1.0728401762841435,
    0.6725857592619174,
    -1.3260474174436916,
    -0.2767236093390704,
    -0.4924609354839233,
    0.5909355938464363,
    0.6503538091951632,
    1.5611768325209288,
    0.7863084475179105,
    0.46967977700461294,
    0.4307634041062191,
    0.3936560216002456,
    0.7655390144306293,
    0.33563489202079866,
    -0.3676753886767014,
    0.19396694291368013,
    -9.655048955691225,
    -1.061620467343194,
    0.6619376529748191,
    2.414797739802916,
    2.36248786395341,
    1.4515616017568553,
    2.843973235376061,
    4.1600577041240445,
    -5.518758685156239,
    -6.006373762806235,
    -0.2524129466382104,
    0.5869541676069662,
    2.1216968747099467,
    -0.2618018281875576,
    -0.5076647510559797,
    0.6952733926655729,
    1.430616727503888,
    0.16537310127183036,
    -0.2354628301145431,
    -1.045792957947501,
    0.8610027071995556,
    -0.25307493751697485,
    -1.2870756164881683,
    0.01926788259259275,
    1.1282774011562944,
    0.9910413037414245,
    0.2645760621373487,
    -0.03593360049213048,
    -0.08597525910066106,
    0.27248167722091443,
    0.8143725784358903,
    0.9933456211700695,
    -0.043315615766000404,
    0.4222865407357008,
    -0.01550995517888382,
    0.4780720160742185,
    -0.4471332509412467,
    0.4937698184434239,
    1.3444461980130415,
    -0.6478123878767111,
    0.39178180262753065,
    0.04890990404698448,
    1.0241059186986354,
    -0.1738887871036665,
    0.40276269682770904,
    0.19031321860429562,
    3.4266059018081796,
    0.05751166749412509,
    -0.6667455104532322,
    11.550775013745298,
    -0.9169727363990915,
    3.9256553560872094,
    -0.966039655888143,
    -1.3435185427519816,
    1.9936075481073692,
)
_DEFAULT_BIAS = -0.10546030760957947
_DEFAULT_THRESHOLD = 0.9608399228901026
_DEFAULT_SIZE_STEPS: tuple[int, ...] = (500, 750, 1000, 1500, 2000, 3000, 5000, 7500, 10002)
_DEFAULT_SIZE_THRESHOLDS: tuple[float, ...] = (
    0.981936025560371,
    0.9810203414776428,
    0.9810203414776428,
    0.9700980951551494,
    0.9608399228901026,
    0.9608399228901026,
    0.9608399228901026,
    0.9608399228901026,
    0.9608399228901026,
)

_DEFAULT_FEATURES: tuple[str, ...] = (
    "best_similarity",
    "margin",
    "vote_share",
    "agree_top5",
    "top3_similarity",
    "log_words",
    "vote_share_sharp",
    "agree_top10",
    "top3_margin",
    "lexical_overlap",
    "lexical_overlap_other",
)


def default_params() -> DecisionParams:
    """Parameters for a route that names no tuned params file (learned on Banking77 train, above)."""
    n = len(_DEFAULT_WEIGHTS)
    return DecisionParams(
        weights=_DEFAULT_WEIGHTS,
        bias=_DEFAULT_BIAS,
        mean=(0.0,) * n,
        scale=(1.0,) * n,
        threshold=_DEFAULT_THRESHOLD,
        temperature=0.05,
        vote_k=20,
        min_similarity=0.5,
        guards=True,
        features=_DEFAULT_FEATURES,
        interactions=True,
        size_steps=_DEFAULT_SIZE_STEPS,
        size_thresholds=_DEFAULT_SIZE_THRESHOLDS,
    )
