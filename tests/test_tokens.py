from __future__ import annotations

from thrifty.tokens import TokenCounter, encoding_for_model


def test_encoding_choice_and_exactness():
    assert encoding_for_model("gpt-4o-mini-2024-07-18") == ("o200k_base", True)
    assert encoding_for_model("openai/gpt-4.1") == ("o200k_base", True)
    assert encoding_for_model("gpt-3.5-turbo-0125") == ("cl100k_base", True)
    assert encoding_for_model("claude-3-5-sonnet-20240620") == ("o200k_base", False)


def test_exact_counts_offline():
    counter = TokenCounter()
    assert counter.count_text("hello world", "o200k_base") == 2
    assert counter.count_text("hello world", "cl100k_base") == 2
    assert counter.count_text("", "o200k_base") == 0
    # OpenAI's cookbook framing: 3 per message + role + content, plus 3 to prime the reply:
    # 3 + (3 + 1 + 6) + (3 + 1 + 7) = 24, what the API reports as prompt_tokens for gpt-4o.
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    count = counter.count_messages(messages, "gpt-4o")
    assert count.exact
    assert count.tokens == 24


def test_other_families_are_flagged_estimated():
    counter = TokenCounter()
    assert not counter.count_messages([{"role": "user", "content": "hi"}], "claude-3-haiku-20240307").exact
    with_image = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this"},
                {"type": "image_url", "image_url": {"url": "http://x"}},
            ],
        }
    ]
    assert not counter.count_messages(with_image, "gpt-4o").exact


def test_text_that_spells_a_special_token_is_counted_as_text():
    # A pasted chat log may contain "<|endoftext|>"; the provider reads it as text, so must we
    # (it raised ValueError, a 500, before). Found replaying ShareGPT chats through simulate.
    counter = TokenCounter()
    assert counter.count_text("say <|endoftext|> now") > counter.count_text("say now")
    count = counter.count_messages(
        [{"role": "user", "content": "<|endoftext|><|fim_prefix|>"}], "gpt-4o-mini"
    )
    assert count.tokens > 7 and count.exact
