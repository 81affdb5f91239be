from __future__ import annotations

import copy

from thrifty.cache.prefix import has_breakpoints, mark_static_prefix


def test_marks_go_on_a_copy_so_a_fallback_sends_the_original():
    body = {
        "messages": [
            {"role": "system", "content": "A"},
            {"role": "developer", "content": [{"type": "text", "text": "B"}]},
            {"role": "user", "content": "q"},
        ],
        "tools": [{"type": "function", "function": {"name": "t"}}],
    }
    before = copy.deepcopy(body)
    marked = mark_static_prefix(body)
    assert body == before and not has_breakpoints(body)
    assert has_breakpoints(marked)
    # Only the last system-like block and the last tool are marked.
    assert marked["messages"][0]["content"] == "A"
    assert marked["messages"][1]["content"][-1]["cache_control"] == {"type": "ephemeral"}
    assert marked["tools"][-1]["cache_control"] == {"type": "ephemeral"}
    assert "cache_control" not in str(marked["messages"][2])
