"""The most an image part of a prompt may bill, for reservations (pure).

The gateway does not fetch images, so it cannot know their size; the token count (``tokens``)
takes every image as ``COUNTED_IMAGE_TOKENS``, a low-detail gpt-4o image. What the provider bills
can be far more: gpt-4o-mini bills a high-detail image as 2,833 + 5,667 per 512-pixel tile. Budgets,
the cost cap and token rate limits reserve the worst case instead, and the settle brings it back to
what was billed. Worst cases by model family, from the providers' vision pricing:
- OpenAI tiles: an image is fitted in 2048 x 2048, then its shortest side to 768, so at most
  2 x 4 tiles: base + 8 x tile ("low" detail: the base only). gpt-4o, gpt-4.1, gpt-4.5 and the
  o-series and gpt-5 families bill at most 85 + 8 x 170 (their own constants are at or below those);
  gpt-4o-mini 2,833 + 8 x 5,667.
- OpenAI patches (gpt-4.1-mini/nano, gpt-5-mini/nano, o4-mini): at most 1,536 patches of 32 pixels
  times the model's multiplier.
- Anthropic: an image over ~1,600 tokens is scaled down first.
Any other model takes the largest of these, unless its settings say (``max_image_tokens``).
"""

from __future__ import annotations

from collections.abc import Sequence

from thrifty.settings import ModelSettings
from thrifty.tokens import TokenCount

COUNTED_IMAGE_TOKENS = 85
_TILED_4O = 85 + 8 * 170
_MINI_HIGH = 2833 + 8 * 5667
# (model id prefix, worst case of a "low" detail image, of any other), longest prefixes first.
_BOUNDS: tuple[tuple[str, int, int], ...] = (
    ("gpt-4o-mini", 2833, _MINI_HIGH),
    ("gpt-4.1-mini", 2490, 2490),  # 1,536 x 1.62
    ("gpt-4.1-nano", 3780, 3780),  # 1,536 x 2.46
    ("gpt-5-mini", 2490, 2490),
    ("gpt-5-nano", 3780, 3780),
    ("o4-mini", 2642, 2642),  # 1,536 x 1.72
    ("gpt-4o", 85, _TILED_4O),
    ("chatgpt-4o", 85, _TILED_4O),
    ("gpt-4.1", 85, _TILED_4O),
    ("gpt-4.5", 85, _TILED_4O),
    ("gpt-5", 85, _TILED_4O),
    ("o1", 85, _TILED_4O),
    ("o3", 85, _TILED_4O),
    ("claude", 1600, 1600),
)
UNKNOWN_MODEL_BOUND = max(high for _, _, high in _BOUNDS)


def image_bound(upstream_model: str, detail: str, override: int | None = None) -> int:
    """The most one image part of ``detail`` ("low", "high", "auto") may bill on this model."""
    if override is not None:
        return override
    name = upstream_model.lower().rsplit("/", 1)[-1]
    for prefix, low, high in _BOUNDS:
        if name.startswith(prefix):
            return low if detail == "low" else high
    return UNKNOWN_MODEL_BOUND


def extra_image_tokens(upstream_model: str, details: Sequence[str], override: int | None = None) -> int:
    """Tokens the image parts may bill beyond what the token count gave them."""
    return sum(
        max(0, image_bound(upstream_model, detail, override) - COUNTED_IMAGE_TOKENS) for detail in details
    )


def image_extra(count: TokenCount | None, alias: str, model: ModelSettings) -> int:
    """Tokens a prompt's image parts may bill on ``alias`` beyond what its count gave them."""
    if count is None or not count.image_details:
        return 0
    return extra_image_tokens(model.upstream or alias, count.image_details, model.max_image_tokens)


__all__ = ["COUNTED_IMAGE_TOKENS", "UNKNOWN_MODEL_BOUND", "extra_image_tokens", "image_bound", "image_extra"]
