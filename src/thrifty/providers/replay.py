"""A provider that answers from recorded real model outputs, for offline demos and benchmarks.

Two recording formats are read:
- ZeroEval rows (`../shared/data/routing/zeroeval/`): `{"prompt", "responses": {MODEL: {"output"}}}`;
  a request matches when its last user message equals `prompt`, and is answered with the
  recorded output of the requested upstream model.
- thrifty recordings: `{"thrifty_recording": 1, "model", "messages", "response"}` where
  `response` is a whole OpenAI chat completion; a request matches on model and messages.
- traffic lines (`thrifty.simulate.traffic`: `{"ts", "tenant", "request", "response", "model"}`), the
  format `thrifty simulate` replays and `thrifty recordings export` writes: a request matches on model
  and messages, and a request a stage rewrote (context budgets trimmed its history) on model and its
  last message; its input is then counted from what was sent and its output is the recorded one.
Usage comes from the recording when it has one, otherwise from the local tokenizer (exact for
OpenAI encodings, otherwise flagged estimated).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import orjson

from thrifty.errors import ConfigError, NotFound
from thrifty.providers.base import StreamChunk
from thrifty.settings import ProviderSettings
from thrifty.shapes import last_user_message_text
from thrifty.tokens import TokenCounter, encoding_for_model
from thrifty.types import ModelTarget, UpstreamResult, Usage


def _messages_key(model: str, messages: Any) -> str:
    return hashlib.sha256(orjson.dumps([model, messages], option=orjson.OPT_SORT_KEYS)).hexdigest()


def _last_turn_key(model: str, messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return None
    return _messages_key(model, messages[-1:])


BUILTIN_PREFIX = "builtin:"


def _builtin(name: str, setting: str) -> Path:
    """Recordings shipped inside the package (`builtin:quickstart`), read where pip put them."""
    from importlib import resources

    path = Path(str(resources.files("thrifty.providers") / "recordings" / f"{name}.jsonl"))
    if not path.is_file():
        known = sorted(
            p.name.removesuffix(".jsonl")
            for p in resources.files("thrifty.providers").joinpath("recordings").iterdir()
            if p.name.endswith(".jsonl")
        )
        raise ConfigError(
            f"{setting}: there is no built-in recording set {name!r} (built in: {', '.join(known)})"
        )
    return path


def _jsonl_files(paths: Iterable[str], setting: str = "providers.replay.data") -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        if raw.startswith(BUILTIN_PREFIX):
            files.append(_builtin(raw.removeprefix(BUILTIN_PREFIX), setting))
            continue
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted(path.glob("*.jsonl")))
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError(
                f"{setting}: {raw!r} does not exist (a relative path in a settings file is relative to "
                "the folder of that file); give a JSONL file or a folder of them, or builtin:quickstart"
            )
    return files


class RecordingIndex:
    """In-memory index of recorded outputs: prompt -> model -> output, and exact recordings."""

    def __init__(self) -> None:
        self.by_prompt: dict[str, dict[str, str]] = {}
        self.recordings: dict[str, dict[str, Any]] = {}
        # Traffic lines by (model, last message): answers a request whose earlier turns a stage rewrote.
        self.by_last_turn: dict[str, dict[str, Any]] = {}

    @classmethod
    def load(cls, paths: Iterable[str], setting: str = "providers.replay.data") -> RecordingIndex:
        index = cls()
        for file in _jsonl_files(paths, setting):
            with file.open("rb") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        row = orjson.loads(line)
                    except orjson.JSONDecodeError as err:
                        raise ConfigError(f"{file}:{lineno}: not JSON ({err})") from err
                    index.add(row, f"{file}:{lineno}")
        return index

    def add(self, row: Any, where: str = "row") -> None:
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: a recording must be a JSON object")
        if row.get("thrifty_recording"):
            self.recordings[_messages_key(str(row["model"]), row["messages"])] = row["response"]
        elif isinstance(row.get("request"), dict) and "tenant" in row:
            request, response = row["request"], row.get("response")
            model = row.get("model") or request.get("model")
            if isinstance(response, dict) and isinstance(model, str):
                self.add_traffic(model, request.get("messages"), response)
        elif "prompt" in row and "responses" in row:
            outputs = self.by_prompt.setdefault(str(row["prompt"]), {})
            for model, rec in row["responses"].items():
                if isinstance(rec, dict) and isinstance(rec.get("output"), str):
                    outputs[model] = rec["output"]
        else:
            raise ConfigError(f"{where}: neither a ZeroEval row nor a thrifty recording")

    def add_traffic(self, model: str, messages: Any, response: dict[str, Any]) -> None:
        """A recorded request and its answer (the first recording of a prompt wins both keys)."""
        self.recordings.setdefault(_messages_key(model, messages), response)
        last = _last_turn_key(model, messages)
        if last is not None:
            self.by_last_turn.setdefault(last, response)

    def models(self) -> set[str]:
        found: set[str] = set()
        for outputs in self.by_prompt.values():
            found.update(outputs)
        return found


class ReplayProvider:
    def __init__(
        self,
        name: str,
        settings: ProviderSettings,
        counter: TokenCounter,
        index: RecordingIndex | None = None,
    ) -> None:
        self.name = name
        self._settings = settings
        self._counter = counter
        # `thrifty simulate` hands every provider one index built from the traffic it replays.
        self._index = (
            index if index is not None else RecordingIndex.load(settings.data, f"providers.{name}.data")
        )

    @property
    def index(self) -> RecordingIndex:
        return self._index

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _answer(self, target: ModelTarget, body: dict[str, Any]) -> dict[str, Any]:
        messages = body.get("messages")
        recorded = self._index.recordings.get(_messages_key(target.upstream_model, messages))
        if recorded is not None:
            return dict(recorded)
        last = _last_turn_key(target.upstream_model, messages)
        rewritten = self._index.by_last_turn.get(last) if last is not None else None
        if rewritten is not None:
            return self._rewritten(target, body, rewritten)
        prompt = last_user_message_text(messages)
        outputs = self._index.by_prompt.get(prompt) if prompt is not None else None
        if outputs is None:
            raise NotFound(
                f"replay provider {self.name!r} has no recording for this prompt; replay answers only "
                "prompts present in its data files (exact match of the last user message)",
                code="replay_not_found",
            )
        output = outputs.get(target.upstream_model)
        if output is None:
            raise NotFound(
                f"replay provider {self.name!r} has this prompt, but no output of model "
                f"{target.upstream_model!r} (recorded: {', '.join(sorted(outputs))})",
                code="replay_not_found",
            )
        return {
            "id": "chatcmpl-replay-" + hashlib.sha1(prompt.encode()).hexdigest()[:20],  # type: ignore[union-attr]
            "object": "chat.completion",
            "created": int(time.time()),
            "model": target.upstream_model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": output, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
        }

    def _rewritten(
        self, target: ModelTarget, body: dict[str, Any], recorded: dict[str, Any]
    ) -> dict[str, Any]:
        """The recorded answer to a prompt a stage rewrote: input counted from what is sent now,
        output as recorded (nobody recorded an answer to the rewritten prompt)."""
        usage = self._usage(target, body, recorded)
        output = (recorded.get("usage") or {}).get("completion_tokens")
        if isinstance(output, int) and not isinstance(output, bool):
            usage = Usage(input_tokens=usage.input_tokens, output_tokens=output, estimated=usage.estimated)
        return {**recorded, "usage": self._usage_json(usage)}

    def _usage(self, target: ModelTarget, body: dict[str, Any], completion: dict[str, Any]) -> Usage:
        encoding, exact = encoding_for_model(target.upstream_model)
        prompt = self._counter.count_messages(
            body.get("messages") or [], target.upstream_model, tools=body.get("tools")
        )
        text = "".join(
            str((c.get("message") or {}).get("content") or "") for c in completion.get("choices") or ()
        )
        return Usage(
            input_tokens=prompt.tokens,
            output_tokens=self._counter.count_text(text, encoding),
            estimated=not (exact and prompt.exact),
        )

    @staticmethod
    def _usage_json(usage: Usage) -> dict[str, Any]:
        return {
            "prompt_tokens": usage.input_tokens,
            "completion_tokens": usage.output_tokens,
            "total_tokens": usage.input_tokens + usage.output_tokens,
        }

    async def complete(self, target: ModelTarget, body: dict[str, Any]) -> UpstreamResult:
        completion = self._answer(target, body)
        usage = completion.get("usage")
        if isinstance(usage, dict):
            from thrifty.providers.openai import usage_from_openai

            parsed = usage_from_openai(usage)
            if parsed is not None:
                return UpstreamResult(body=completion, usage=parsed)
        computed = self._usage(target, body, completion)
        completion["usage"] = self._usage_json(computed)
        return UpstreamResult(body=completion, usage=computed)

    async def stream(self, target: ModelTarget, body: dict[str, Any]) -> AsyncIterator[StreamChunk]:
        result = await self.complete(target, body)
        completion = result.body
        text = str(((completion.get("choices") or [{}])[0].get("message") or {}).get("content") or "")
        base = {
            "id": completion.get("id", "chatcmpl-replay"),
            "object": "chat.completion.chunk",
            "created": completion.get("created", int(time.time())),
            "model": completion.get("model", target.upstream_model),
        }

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            return {
                **base,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }

        yield StreamChunk(chunk({"role": "assistant", "content": ""}, None))
        step = self._settings.stream_chunk_chars
        for start in range(0, len(text), step):
            yield StreamChunk(chunk({"content": text[start : start + step]}, None))
        yield StreamChunk(chunk({}, "stop"))
        assert result.usage is not None
        yield StreamChunk(
            {**base, "choices": [], "usage": self._usage_json(result.usage)}, usage=result.usage
        )
