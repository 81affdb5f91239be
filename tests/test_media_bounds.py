"""The most an image part may bill, by model family and detail, and what reservations add for it."""

from __future__ import annotations

import pytest

from thrifty.guard.media import COUNTED_IMAGE_TOKENS, UNKNOWN_MODEL_BOUND, extra_image_tokens, image_bound
from thrifty.tokens import TokenCounter


@pytest.mark.parametrize(
    ("model", "detail", "bound"),
    [
        ("gpt-4o-mini", "high", 2833 + 8 * 5667),
        ("gpt-4o-mini-2024-07-18", "auto", 2833 + 8 * 5667),
        ("openai/gpt-4o-mini", "low", 2833),
        ("gpt-4o-2024-08-06", "high", 85 + 8 * 170),
        ("gpt-4o", "low", 85),
        ("gpt-4.1-mini", "low", 2490),
        ("o4-mini", "high", 2642),
        ("claude-3-5-sonnet-20241022", "high", 1600),
        ("llama-3.1-70b", "low", UNKNOWN_MODEL_BOUND),
    ],
)
def test_an_image_is_bounded_by_its_models_family(model: str, detail: str, bound: int) -> None:
    assert image_bound(model, detail) == bound


def test_a_models_own_setting_overrides_its_family() -> None:
    assert image_bound("gpt-4o-mini", "high", override=1000) == 1000
    extra = extra_image_tokens("llama-3.1-70b", ("high", "low"), override=300)
    assert extra == 2 * (300 - COUNTED_IMAGE_TOKENS)


def test_the_count_lists_each_image_part_with_its_detail() -> None:
    counter = TokenCounter()
    content = [
        {"type": "text", "text": "compare"},
        {"type": "image_url", "image_url": {"url": "https://x/a.png", "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "https://x/b.png"}},
        {"type": "image_url", "image_url": "https://x/c.png"},
    ]
    count = counter.count_messages([{"role": "user", "content": content}], "gpt-4o-mini")
    assert count.image_details == ("low", "auto", "auto")
    plain = counter.count_messages([{"role": "user", "content": "compare"}], "gpt-4o-mini")
    assert count.tokens - plain.tokens == 3 * COUNTED_IMAGE_TOKENS  # the count itself is unchanged
    assert extra_image_tokens("gpt-4o-mini", count.image_details) == (2833 - 85) + 2 * (48169 - 85)
