"""``paddler balancer`` with ``--inference-api-key`` and ``--management-api-key``,
through real gunicorn: every service answers 401 without a key and with a wrong one,
and works with the right one — for the ``openai`` SDK's ``api_key=``, for Paddler's
``paddler-client`` given the header, and for a browser-style WebSocket that offers its
key as a subprotocol. No key shows up in a log, a command line or a worker's
environment."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import websockets
from paddler_client import ClientInference, ClientManagement
from paddler_client.continue_from_conversation_history_params import (
    ContinueFromConversationHistoryParams,
)
from paddler_client.conversation_message import ConversationMessage
from paddler_client.error import HttpError
from websockets.asyncio.client import connect

from paddler.testing.cluster import LocalCluster, free_port
from paddler.testing.processes import live_processes

INFERENCE_KEYS = ("inference-key-one_7f3a9c", "inference-key-two_41b2d8")
MANAGEMENT_KEY = "management-key_c0ffee42"
WRONG_KEY = "wrong-key_00000000"
CHAT = [{"role": "user", "content": "Say hello."}]
RAW_REQUEST = {"raw_prompt": "Hi", "max_tokens": 3}


@pytest.fixture
def cluster(make_cluster, tmp_path: Path) -> LocalCluster:
    keys_file = tmp_path / "inference-keys.txt"
    keys_file.write_text("# one key per line\n" + "\n".join(INFERENCE_KEYS) + "\n")
    keys_file.chmod(0o600)
    cluster: LocalCluster = make_cluster(
        compat_openai_addr=f"127.0.0.1:{free_port()}",
        inference_api_key=f"@{keys_file}",
        log_level="debug",  # gunicorn writes its access log: it must not show keys
    )
    cluster.env["PADDLER_MANAGEMENT_API_KEY"] = MANAGEMENT_KEY
    cluster.start_balancer()
    cluster.wait_for_http()  # /health is open
    cluster.start_agent("fake", slots=2, step_ms=2)
    cluster.wait_for_agents(cluster.client(), 1)
    return cluster


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _requests(cluster: LocalCluster) -> list[tuple[str, str, dict[str, Any] | None, str]]:
    """(method, url, body, a right key) of one request on every service."""
    return [
        (
            "POST",
            f"{cluster.inference_url}/api/v1/continue_from_raw_prompt",
            RAW_REQUEST,
            INFERENCE_KEYS[0],
        ),
        ("GET", f"{cluster.management_url}/api/v1/agents", None, MANAGEMENT_KEY),
        ("GET", f"{cluster.management_url}/metrics", None, MANAGEMENT_KEY),
        ("GET", f"{cluster.openai_url}/v1/models", None, INFERENCE_KEYS[1]),
    ]


def test_every_service_answers_401_without_a_key_and_with_a_wrong_one(cluster) -> None:
    with httpx.Client(timeout=10) as http:
        for method, url, body, key in _requests(cluster):
            for headers in ({}, _bearer(WRONG_KEY)):
                refused = http.request(method, url, json=body, headers=headers)
                assert refused.status_code == 401, (url, headers)
                assert refused.headers["www-authenticate"].startswith("Bearer")
                error = refused.json()["error"]
                if url.startswith(str(cluster.openai_url)):
                    assert error["code"] == "invalid_api_key"
                else:
                    assert isinstance(error, str) and refused.json()["field"] is None
            served = http.request(method, url, json=body, headers=_bearer(key))
            assert served.status_code == 200, url
        # the inference keys do not open management, nor the other way round
        management = f"{cluster.management_url}/api/v1/agents"
        assert http.get(management, headers=_bearer(INFERENCE_KEYS[0])).status_code == 401
        inference = f"{cluster.inference_url}/api/v1/continue_from_raw_prompt"
        other = http.post(inference, json=RAW_REQUEST, headers=_bearer(MANAGEMENT_KEY))
        assert other.status_code == 401
        # open: /health and the OpenAPI documents, which declare the scheme
        for url in (cluster.inference_url, cluster.management_url, cluster.openai_url):
            assert http.get(f"{url}/health").text == "OK"
            document = http.get(f"{url}/openapi.json").json()
            assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_the_openai_sdk_works_with_its_api_key(cluster) -> None:
    base_url = f"{cluster.openai_url}/v1"
    with openai.OpenAI(base_url=base_url, api_key=INFERENCE_KEYS[1], max_retries=0) as sdk:
        completion = sdk.chat.completions.create(model="m", messages=CHAT, max_completion_tokens=4)
        assert completion.usage is not None and completion.usage.completion_tokens == 4
        chunks = list(
            sdk.chat.completions.create(
                model="m", messages=CHAT, max_completion_tokens=3, stream=True
            )
        )
        assert chunks and chunks[-1].choices[0].finish_reason == "length"
    with openai.OpenAI(base_url=base_url, api_key=WRONG_KEY, max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError) as refused:
            wrong.models.list()
        assert refused.value.status_code == 401
        assert refused.value.code == "invalid_api_key"


def test_paddler_client_works_when_given_the_header(cluster) -> None:
    params = ContinueFromConversationHistoryParams(
        add_generation_prompt=True,
        conversation_history=[ConversationMessage(role="user", content="Say hello.")],
        enable_thinking=False,
        max_tokens=4,
    )

    async def run() -> None:
        async with (
            ClientManagement(
                cluster.management_url,
                http_client=httpx.AsyncClient(headers=_bearer(MANAGEMENT_KEY)),
            ) as management,
            ClientInference(
                cluster.inference_url,
                http_client=httpx.AsyncClient(headers=_bearer(INFERENCE_KEYS[0]), timeout=30),
            ) as inference,
        ):
            agents = (await management.get_agents()).agents
            assert [agent.name for agent in agents] == ["fake"]
            assert (await management.get_buffered_requests()).buffered_requests_current == 0
            text = []
            async for message in inference.post_continue_from_conversation_history(params):
                if message.is_token:
                    text.append(message.token)
                if message.is_terminal:
                    assert message.is_done and message.summary.usage.content_tokens == 4
                    break
            assert text
        async with ClientManagement(
            cluster.management_url,
            http_client=httpx.AsyncClient(headers=_bearer(WRONG_KEY)),
        ) as refused:
            with pytest.raises(HttpError) as wrong:
                await refused.get_agents()
            assert wrong.value.status_code == 401

    asyncio.run(asyncio.wait_for(run(), 60))


def _socket_url(cluster: LocalCluster) -> str:
    return cluster.inference_url.replace("http://", "ws://") + "/api/v1/inference_socket"


async def _one_request_on_the_socket(ws: Any) -> list[dict[str, Any]]:
    request = {"Request": {"id": "r1", "request": {"ContinueFromRawPrompt": RAW_REQUEST}}}
    await ws.send(json.dumps(request))
    messages = []
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), 10))
        messages.append(message)
        token = message.get("Response", {}).get("response", {}).get("GeneratedToken", {})
        if "Done" in token or "Error" in message:
            return messages


def test_a_browser_style_websocket_offers_its_key_as_a_subprotocol(cluster) -> None:
    url = _socket_url(cluster)

    async def run() -> None:
        offer = ["paddler", f"paddler.bearer.{INFERENCE_KEYS[1]}"]
        async with connect(url, subprotocols=offer) as ws:
            assert ws.subprotocol == "paddler"  # what a browser needs back; no key echoed
            messages = await _one_request_on_the_socket(ws)
            assert messages[-1]["Response"]["request_id"] == "r1"
            assert "Done" in messages[-1]["Response"]["response"]["GeneratedToken"]
        async with connect(url, additional_headers=_bearer(INFERENCE_KEYS[0])) as ws:
            assert "Done" in json.dumps(await _one_request_on_the_socket(ws))
        for options in (
            {},
            {"subprotocols": ["paddler", f"paddler.bearer.{WRONG_KEY}"]},
            {"additional_headers": _bearer(WRONG_KEY)},
        ):
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with connect(url, **options):
                    pass
            # closed before the handshake: gunicorn refuses the upgrade with a 403
            assert refused.value.response.status_code == 403

    asyncio.run(asyncio.wait_for(run(), 60))


def _processes_of(root: int) -> list[int]:
    """``root`` and every process below it."""
    parents = {process.pid: process.parent for process in live_processes()}
    found, frontier = [root], [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return found


def test_no_key_is_in_a_log_a_command_line_or_a_worker_environment(cluster) -> None:
    with httpx.Client(timeout=10) as http:
        for key in (*INFERENCE_KEYS, WRONG_KEY):
            http.get(f"{cluster.openai_url}/v1/models", headers=_bearer(key))
        http.get(f"{cluster.management_url}/api/v1/agents", headers=_bearer(MANAGEMENT_KEY))
    assert cluster.balancer is not None
    log = cluster.balancer.log()
    assert "GET /v1/models" in log  # the access log is on
    secrets = (*INFERENCE_KEYS, MANAGEMENT_KEY, WRONG_KEY)
    assert not any(secret in log for secret in secrets)
    pids = _processes_of(cluster.balancer.pid)
    assert len(pids) >= 3  # the balancer, gunicorn's arbiter, a worker
    for pid in pids:
        command_line = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert not any(secret.encode() in command_line for secret in secrets)
    for pid in pids[1:]:  # gunicorn: the balancer itself was given one key by environment
        environment = Path(f"/proc/{pid}/environ").read_bytes()
        assert not any(secret.encode() in environment for secret in secrets), pid
