"""The official stripe and openai SDKs (their own retries off) behind Outrigger.

Both SDKs are synchronous, so they run in a worker thread while Outrigger and the
upstream serve on the test's event loop. Each SDK gets its own HTTP session with
`trust_env` off (no stray proxy settings) and a hook that records exactly what
the SDK put on the wire, so we know which idempotency key came from the app and
which from Outrigger.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx2
import openai
import pytest
import requests
import stripe

from tests.conftest import StartProxy, start_on_own_port
from tests.fakes import AiohttpServerFactory, ScriptedUpstream

FAST_BACKOFF = {"base": "10ms", "max": "10ms"}

STRIPE_CUSTOMER = {
    "id": "cus_test123",
    "object": "customer",
    "email": "ada@example.com",
    "created": 1_700_000_000,
    "livemode": False,
    "metadata": {},
}

CHAT_COMPLETION = {
    "id": "chatcmpl-test1",
    "object": "chat.completion",
    "created": 1_700_000_000,
    "model": "gpt-test",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello from upstream", "refusal": None},
            "finish_reason": "stop",
            "logprobs": None,
        }
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
}


def _json(status: int, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json", "Request-Id": "req_test"}, json.dumps(body).encode()


@pytest.mark.parametrize("with_idempotency_policy", [False, True])
async def test_stripe_sdk_post_retried_with_its_own_idempotency_key(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy, with_idempotency_policy: bool
) -> None:
    upstream = await ScriptedUpstream(
        _json(503, {"error": {"type": "api_error", "message": "try again"}}),
        _json(503, {"error": {"type": "api_error", "message": "try again"}}),
        _json(200, STRIPE_CUSTOMER),
    ).start(aiohttp_server)
    policy: dict[str, Any] = {"retries": {"on": [503], "max_attempts": 3, "backoff": FAST_BACKOFF}}
    if with_idempotency_policy:
        policy["idempotency"] = {}  # the SDK's key must be kept, not replaced by an injected one
    base = await start_on_own_port(start_proxy, upstream.url, host="api.provider.test", **policy)

    sent: list[requests.PreparedRequest] = []

    def record(response: requests.Response, *args: Any, **kwargs: Any) -> None:
        sent.append(response.request)

    def create_customer() -> Any:
        with requests.Session() as session:
            session.trust_env = False
            session.hooks["response"].append(record)
            client = stripe.StripeClient(
                api_key="sk_test_x",
                base_addresses={"api": base},
                max_network_retries=0,
                http_client=stripe.RequestsClient(session=session, timeout=10),
            )
            # stripe 16 sets an Idempotency-Key on every POST even with its own retries off
            # (_api_requestor.request_headers: headers.setdefault("Idempotency-Key", ...)).
            return client.v1.customers.create(params={"email": "ada@example.com"})

    customer = await asyncio.to_thread(create_customer)

    assert customer.id == "cus_test123"
    assert customer.email == "ada@example.com"
    assert len(sent) == 1, "the SDK made one call and saw one success"
    sdk_key = sent[0].headers["Idempotency-Key"]
    assert sdk_key
    assert upstream.count == 3
    assert upstream.keys() == [sdk_key] * 3
    assert all(seen.method == "POST" and seen.path_qs == "/v1/customers" for seen in upstream.seen)
    assert {seen.body for seen in upstream.seen} == {b"email=ada%40example.com"}
    assert {seen.headers["Authorization"] for seen in upstream.seen} == {"Bearer sk_test_x"}


async def test_openai_sdk_gets_one_injected_key_for_all_attempts(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    upstream = await ScriptedUpstream(
        _json(503, {"error": {"message": "overloaded", "type": "server_error"}}),
        _json(200, CHAT_COMPLETION),
    ).start(aiohttp_server)
    base = await start_on_own_port(
        start_proxy,
        upstream.url,
        host="api.provider.test",
        idempotency={},  # header Idempotency-Key, methods POST and PATCH
        retries={"on": [503], "max_attempts": 3, "backoff": FAST_BACKOFF},
    )

    sent: list[httpx2.Request] = []

    def complete() -> Any:
        # The SDK's own default client class (httpx2 in openai 3.x), with a hook to see what it sends.
        with openai.DefaultHttpxClient(
            trust_env=False, event_hooks={"request": [sent.append]}, timeout=10
        ) as http:
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, http_client=http)
            return client.chat.completions.create(
                model="gpt-test", messages=[{"role": "user", "content": "Say hello"}]
            )

    completion = await asyncio.to_thread(complete)

    assert completion.choices[0].message.content == "Hello from upstream"
    assert completion.id == "chatcmpl-test1"
    assert len(sent) == 1
    assert "Idempotency-Key" not in sent[0].headers, "this SDK sends no key: Outrigger must add one"
    assert upstream.count == 2
    keys = upstream.keys()
    assert keys[0] is not None
    assert keys[0] == keys[1]
    assert uuid.UUID(keys[0]).version == 4
    assert all(seen.path_qs == "/v1/chat/completions" for seen in upstream.seen)
    assert upstream.seen[0].body == upstream.seen[1].body
    assert json.loads(upstream.seen[1].body)["messages"] == [{"role": "user", "content": "Say hello"}]


async def test_openai_sdk_without_idempotency_policy_is_not_retried(
    aiohttp_server: AiohttpServerFactory, start_proxy: StartProxy
) -> None:
    """The contrast: no key from the SDK and none injected, so the POST goes out exactly once."""
    upstream = await ScriptedUpstream(
        _json(503, {"error": {"message": "overloaded", "type": "server_error"}}),
        _json(200, CHAT_COMPLETION),
    ).start(aiohttp_server)
    base = await start_on_own_port(
        start_proxy,
        upstream.url,
        host="api.provider.test",
        retries={"on": [503], "max_attempts": 3, "backoff": FAST_BACKOFF},
    )

    def complete() -> None:
        with openai.DefaultHttpxClient(trust_env=False, timeout=10) as http:
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, http_client=http)
            client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])

    with pytest.raises(openai.InternalServerError) as raised:
        await asyncio.to_thread(complete)
    assert raised.value.status_code == 503
    assert upstream.count == 1
