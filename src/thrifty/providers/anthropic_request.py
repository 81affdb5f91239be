"""OpenAI chat request -> Anthropic Messages request: a pure translation, no I/O."""

from __future__ import annotations

from typing import Any

import orjson

from thrifty.errors import InvalidRequest

# Anthropic rejects a request without max_tokens, while OpenAI lets the model run to its limit.
DEFAULT_MAX_TOKENS = 4096

_TOOL_CHOICES = {"auto": {"type": "auto"}, "none": {"type": "none"}, "required": {"type": "any"}}


# ---------------------------------------------------------------------------------------------
# Request: OpenAI chat completions -> Anthropic Messages


def to_anthropic_request(body: dict[str, Any], upstream_model: str) -> dict[str, Any]:
    """Translate an OpenAI chat-completions body; raise InvalidRequest for what cannot be expressed."""
    n = body.get("n")
    if n is not None and n != 1:
        raise InvalidRequest(f"n={n} is not supported by Anthropic models; send n=1 or omit it", param="n")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list", param="messages")

    system_blocks, turns = _split_messages(messages)
    out: dict[str, Any] = {
        "model": upstream_model,
        "messages": turns,
        "max_tokens": _max_tokens(body),
    }
    system_blocks += _response_format_instruction(body.get("response_format"))
    system = _system_value(system_blocks)
    if system is not None:
        out["system"] = system
    for key in ("temperature", "top_p"):
        value = body.get(key)
        if value is None:
            continue
        # OpenAI's temperature goes to 2, Anthropic's to 1: say so here rather than pass on a 400.
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise InvalidRequest(
                f"{key}={value!r} is outside 0-1, the range Anthropic models ({upstream_model}) "
                f"accept; send {key} between 0 and 1 for this model or route",
                param=key,
            )
        out[key] = value
    stop = body.get("stop")
    if isinstance(stop, str):
        out["stop_sequences"] = [stop]
    elif isinstance(stop, list) and stop:
        out["stop_sequences"] = list(stop)
    if isinstance(body.get("user"), str):
        out["metadata"] = {"user_id": body["user"]}
    out.update(_tools(body))
    return out


def _max_tokens(body: dict[str, Any]) -> int:
    """Anthropic takes one cap: of a client's two, the tighter (the gateway reserved the larger).
    Through the gateway a cap is always present (the reserved ceiling); the default is for the
    adapter used on its own."""
    caps = []
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidRequest(f"{key} must be a positive integer", param=key)
            caps.append(value)
    return min(caps) if caps else DEFAULT_MAX_TOKENS


def _split_messages(messages: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """System blocks, and user/assistant turns with same-role neighbours merged."""
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest(f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = message.get("role")
        if role in ("system", "developer"):
            system += _text_blocks(message.get("content"), f"messages[{i}]")
            continue
        role, blocks = _turn(message, i)
        if not blocks:
            continue
        # Anthropic requires user and assistant to alternate; OpenAI does not.
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += blocks
        else:
            turns.append({"role": role, "content": blocks})
    if not turns:
        raise InvalidRequest("messages must hold at least one user or assistant message", param="messages")
    return system, turns


def _turn(message: dict[str, Any], i: int) -> tuple[str, list[dict[str, Any]]]:
    role = message.get("role")
    where = f"messages[{i}]"
    if role == "user":
        return "user", _content_blocks(message.get("content"), where)
    if role == "assistant":
        blocks = _content_blocks(message.get("content"), where)
        blocks += [
            _tool_use_block(call, f"{where}.tool_calls[{j}]") for j, call in enumerate(_calls(message))
        ]
        return "assistant", blocks
    if role == "tool":
        return "user", [_tool_result_block(message, where)]
    raise InvalidRequest(
        f"{where}.role {role!r} is not supported for Anthropic models", param=f"{where}.role"
    )


def _calls(message: dict[str, Any]) -> list[Any]:
    calls = message.get("tool_calls")
    return calls if isinstance(calls, list) else []


def _text_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    """Text-only content (system and tool messages)."""
    blocks = _content_blocks(content, where)
    for block in blocks:
        if block["type"] != "text":
            raise InvalidRequest(f"{where}: only text content is allowed here", param=where)
    return blocks


def _content_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        # Anthropic rejects empty text blocks; OpenAI clients send "" beside tool calls.
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.content must be a string or a list of parts", param=f"{where}.content")
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        block = _part_block(part, f"{where}.content[{j}]")
        if block is not None:
            blocks.append(block)
    return blocks


def _part_block(part: Any, where: str) -> dict[str, Any] | None:
    if not isinstance(part, dict):
        raise InvalidRequest(f"{where} must be an object", param=where)
    kind = part.get("type")
    if kind in ("text", "refusal"):
        text = part.get(kind)
        if not isinstance(text, str):
            raise InvalidRequest(f"{where}.{kind} must be a string", param=where)
        if not text:
            return None
        block: dict[str, Any] = {"type": "text", "text": text}
    elif kind == "image_url":
        block = _image_block(part.get("image_url"), where)
    else:
        raise InvalidRequest(
            f"{where}: content part type {kind!r} is not supported for Anthropic models", param=where
        )
    if "cache_control" in part:
        block["cache_control"] = part["cache_control"]
    return block


def _image_block(image: Any, where: str) -> dict[str, Any]:
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise InvalidRequest(f"{where}.image_url.url must be a string", param=where)
    if url.startswith("data:"):
        header, sep, data = url[5:].partition(",")
        media_type, _, encoding = header.partition(";")
        if not sep or encoding != "base64" or not media_type:
            raise InvalidRequest(f"{where}: data URLs must look like data:image/png;base64,...", param=where)
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise InvalidRequest(f"{where}: image URL must be http(s) or a base64 data URL", param=where)


def _tool_use_block(call: Any, where: str) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(call.get("id"), str):
        raise InvalidRequest(f"{where} must have an id and a function name", param=where)
    arguments = fn.get("arguments") or "{}"
    try:
        parsed = orjson.loads(arguments)
    except orjson.JSONDecodeError as err:
        raise InvalidRequest(f"{where}.function.arguments is not valid JSON: {err}", param=where) from err
    if not isinstance(parsed, dict):
        raise InvalidRequest(f"{where}.function.arguments must be a JSON object", param=where)
    return {"type": "tool_use", "id": call["id"], "name": fn["name"], "input": parsed}


def _tool_result_block(message: dict[str, Any], where: str) -> dict[str, Any]:
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str):
        raise InvalidRequest(f"{where}.tool_call_id is required for a tool message", param=where)
    content = message.get("content")
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": call_id}
    if isinstance(content, str):
        block["content"] = content
    else:
        block["content"] = _text_blocks(content, where)
    return block


def _response_format_instruction(fmt: Any) -> list[dict[str, Any]]:
    """Anthropic has no JSON mode; asking in the system prompt is the closest equivalent."""
    if not isinstance(fmt, dict):
        return []
    if fmt.get("type") == "json_object":
        return [{"type": "text", "text": "Respond with a single JSON object and nothing else."}]
    if fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema") or {}
        text = (
            "Respond with a single JSON object and nothing else. It must conform to this JSON schema:\n"
            + orjson.dumps(schema).decode()
        )
        return [{"type": "text", "text": text}]
    return []


def _system_value(blocks: list[dict[str, Any]]) -> str | list[dict[str, Any]] | None:
    if not blocks:
        return None
    # A plain string is the common case; blocks are only needed to carry cache breakpoints.
    if any("cache_control" in b for b in blocks):
        return blocks
    return "\n\n".join(b["text"] for b in blocks)


def _tools(body: dict[str, Any]) -> dict[str, Any]:
    tools = body.get("tools")
    if not tools:
        return {}
    if not isinstance(tools, list):
        raise InvalidRequest("tools must be a list", param="tools")
    out: dict[str, Any] = {"tools": [_tool(t, f"tools[{i}]") for i, t in enumerate(tools)]}
    choice = _tool_choice(body.get("tool_choice"))
    if body.get("parallel_tool_calls") is False and choice.get("type") != "none":
        choice = {**(choice or {"type": "auto"}), "disable_parallel_tool_use": True}
    if choice:
        out["tool_choice"] = choice
    return out


def _tool(tool: Any, where: str) -> dict[str, Any]:
    fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise InvalidRequest(f"{where}: only function tools with a name are supported", param=where)
    out: dict[str, Any] = {
        "name": fn["name"],
        "input_schema": fn.get("parameters") or {"type": "object", "properties": {}},
    }
    if fn.get("description"):
        out["description"] = fn["description"]
    if "cache_control" in tool:
        out["cache_control"] = tool["cache_control"]
    return out


def _tool_choice(choice: Any) -> dict[str, Any]:
    if choice is None:
        return {}
    if isinstance(choice, str) and choice in _TOOL_CHOICES:
        return dict(_TOOL_CHOICES[choice])
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if choice.get("type") == "function" and isinstance(name, str):
            return {"type": "tool", "name": name}
    raise InvalidRequest(
        "tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'function': {'name': ...}}",
        param="tool_choice",
    )
