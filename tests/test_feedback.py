"""POST /v1/thrifty/feedback: authenticated, own tenant only, joined to the ledger row, one row
per request, and observers (the semantic cache's `cache_wrong`) told after it is stored."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai

from tests.backends import pg_url, query, services, storage  # noqa: F401 - fixtures
from tests.conftest import KEYS, UPSTREAM_KEY, base_settings, openai_models
from tests.fakes.openai_wire import OpenAIWireServer
from thrifty.experiments.store import Feedback
from thrifty.server.run import BackgroundServer
from thrifty.settings import Settings


def feedback_rows(settings: Settings) -> list[tuple[Any, ...]]:
    return query(
        settings, "SELECT request_id, tenant_id, route, variant, score, label, correct FROM feedback"
    )


def test_feedback_auth_tenants_joins_repeats_and_observers(
    tmp_path: Path,
    loop_thread: Any,
    storage: dict[str, Any],  # noqa: F811
) -> None:
    upstream = OpenAIWireServer(api_key=UPSTREAM_KEY)
    loop_thread.run(upstream.start())
    settings = base_settings(
        tmp_path,
        storage=storage,
        providers={"up": {"kind": "openai", "base_url": upstream.base_url, "api_key_env": "UP_KEY"}},
        models=openai_models(),
        routes={
            "support": {
                "model": "gpt-4o-mini",
                "experiment": {"variants": {"a": {"weight": 1}, "b": {"weight": 1, "model": "gpt-4o"}}},
            }
        },
    )
    try:
        with BackgroundServer(settings, secrets={"up": UPSTREAM_KEY}) as server:
            seen: list[Feedback] = []
            sync_seen: list[str] = []

            async def observer(fb: Feedback) -> None:
                seen.append(fb)

            def failing(fb: Feedback) -> None:
                sync_seen.append(fb.request_id)
                raise RuntimeError("an observer's bug never fails the feedback call")

            server.gateway.feedback.subscribe(failing)
            server.gateway.feedback.subscribe(observer)
            acme = openai.OpenAI(base_url=server.base_url, api_key=KEYS["acme"], max_retries=0)
            raw = acme.chat.completions.with_raw_response.create(
                model="route:support",
                messages=[{"role": "user", "content": "hi"}],
                extra_headers={"x-thrifty-user": "u1"},
            )
            request_id = raw.headers["x-thrifty-request-id"]
            variant = raw.headers["x-thrifty-variant"]
            globex_id = (
                openai.OpenAI(base_url=server.base_url, api_key=KEYS["globex"], max_retries=0)
                .chat.completions.with_raw_response.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
                )
                .headers["x-thrifty-request-id"]
            )

            def post(body: Any, key: str | None = KEYS["acme"], **kw: Any) -> httpx.Response:
                headers = {"authorization": f"Bearer {key}"} if key else {}
                return httpx.post(f"{server.base_url}/thrifty/feedback", json=body, headers=headers, **kw)

            # No key, a wrong key: 401, nothing stored.
            assert post({"request_id": request_id, "correct": True}, key=None).status_code == 401
            assert post({"request_id": request_id, "correct": True}, key="thr-wrong").status_code == 401
            # Another tenant's request and an unknown id answer alike: 404, nothing stored.
            other = post({"request_id": globex_id, "correct": False})
            unknown = post({"request_id": "req_nope", "correct": False})
            assert other.status_code == unknown.status_code == 404
            assert other.json()["error"]["code"] == unknown.json()["error"]["code"] == "request_not_found"
            assert "your tenant" in other.json()["error"]["message"]
            # Bad bodies: 400 with what to send.
            for body, param in (
                ({"correct": True}, "request_id"),
                ({"request_id": request_id}, None),
                ({"request_id": request_id, "correct": "yes"}, "correct"),
                ({"request_id": request_id, "score": "0.5"}, "score"),
                ({"request_id": request_id, "score": True}, "score"),
                ({"request_id": request_id, "label": ""}, "label"),
                ({"request_id": request_id, "label": "x" * 65}, "label"),
                ({"request_id": request_id, "correct": True, "extra": 1}, "extra"),
                ([request_id], None),
            ):
                answer = post(body)
                assert answer.status_code == 400, (body, answer.text)
                assert answer.json()["error"]["param"] == param
            bad_json = httpx.post(
                f"{server.base_url}/thrifty/feedback",
                content=b"{nope",
                headers={"authorization": f"Bearer {KEYS['acme']}"},
            )
            assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]["message"]
            huge = httpx.post(
                f"{server.base_url}/thrifty/feedback",
                content=b'{"request_id": "%s", "score": 1e999}' % request_id.encode(),
                headers={"authorization": f"Bearer {KEYS['acme']}"},
            )
            assert huge.status_code == 400, huge.text
            assert (
                httpx.get(
                    f"{server.base_url}/thrifty/feedback", headers={"authorization": f"Bearer {KEYS['acme']}"}
                ).status_code
                == 405
            )
            assert feedback_rows(settings) == [] and seen == []
            # Recorded, joined to the ledger row (route, variant, model, cache).
            first = post({"request_id": request_id, "label": "cache_wrong", "score": 0.0})
            assert first.status_code == 200, first.text
            assert first.json()["stored"] == "new" and first.json()["variant"] == variant
            assert first.json()["cache"] == "miss" and first.json()["route"] == "support"
            # A repeat is not counted twice; a change replaces.
            assert (
                post({"request_id": request_id, "label": "cache_wrong", "score": 0.0}).json()["stored"]
                == "same"
            )
            assert post({"request_id": request_id, "correct": False}).json()["stored"] == "changed"
            assert feedback_rows(settings) == [(request_id, "acme", "support", variant, None, None, 0)]
            assert [(f.request_id, f.label, f.correct) for f in seen] == [
                (request_id, "cache_wrong", None),
                (request_id, None, False),
            ]
            assert sync_seen == [request_id, request_id]
    finally:
        loop_thread.run(upstream.stop())
