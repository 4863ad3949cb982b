"""``paddler balancer --tls-cert FILE --tls-key FILE``: gunicorn serves every HTTP
service over TLS with a certificate made by ``trustme``; clients that trust its CA
work (httpx, the ``openai`` SDK, a ``wss://`` WebSocket), others are refused."""

from __future__ import annotations

import asyncio
import json
import ssl
from functools import partial
from pathlib import Path

import httpx
import openai
import pytest
import trustme
from websockets.asyncio.client import connect

from paddler.testing.cluster import LocalCluster, free_port, wait_until

KEY = "tls-inference-key_5e7d1f"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def trusted(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def _healthy(url: str, context: ssl.SSLContext) -> bool:
    try:
        return httpx.get(f"{url}/health", verify=context, timeout=1).text == "OK"
    except httpx.HTTPError:
        return False


@pytest.fixture
def cluster(make_cluster, tmp_path: Path, ca: trustme.CA, trusted) -> LocalCluster:
    issued = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    cluster: LocalCluster = make_cluster(
        compat_openai_addr=f"127.0.0.1:{free_port()}",
        tls_cert=str(cert),
        tls_key=str(key),
        inference_api_key=KEY,
    )
    cluster.start_balancer()
    cluster.start_agent("fake", slots=2, step_ms=2)
    cluster.wait_for_agents(cluster.client(), 1)
    for address in ("inference_addr", "management_addr", "compat_openai_addr"):
        url = f"https://{cluster.balancer_options[address]}"
        wait_until(partial(_healthy, url, trusted), 20, 0.05, f"{url}/health")
    return cluster


def _https(cluster: LocalCluster, address: str) -> str:
    return f"https://{cluster.balancer_options[address]}"


def test_every_service_answers_over_tls_and_not_in_plain_text(cluster, trusted) -> None:
    with httpx.Client(verify=trusted, timeout=10) as http:
        for address in ("inference_addr", "management_addr", "compat_openai_addr"):
            assert http.get(f"{_https(cluster, address)}/health").text == "OK"
            plain = f"http://{cluster.balancer_options[address]}/health"
            with pytest.raises(httpx.TransportError):
                httpx.get(plain, timeout=2)
        agents = http.get(f"{_https(cluster, 'management_addr')}/api/v1/agents")
        assert [agent["name"] for agent in agents.json()["agents"]] == ["fake"]
        url = f"{_https(cluster, 'inference_addr')}/api/v1/continue_from_raw_prompt"
        request = {"raw_prompt": "Hi", "max_tokens": 3}
        assert http.post(url, json=request).status_code == 401  # the keys still hold
        with http.stream(
            "POST", url, json=request, headers={"Authorization": f"Bearer {KEY}"}
        ) as s:
            assert s.status_code == 200
            lines = [json.loads(line) for line in s.iter_lines() if line]
        assert "Done" in lines[-1]["Response"]["response"]["GeneratedToken"]


def test_a_client_that_does_not_trust_the_certificate_is_refused(cluster) -> None:
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{_https(cluster, 'inference_addr')}/health", timeout=5)


def test_the_openai_sdk_and_a_secure_websocket_work_over_tls(cluster, trusted) -> None:
    with openai.OpenAI(
        base_url=f"{_https(cluster, 'compat_openai_addr')}/v1",
        api_key=KEY,
        max_retries=0,
        http_client=httpx.Client(verify=trusted, timeout=30),
    ) as sdk:
        completion = sdk.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=3
        )
        assert completion.usage is not None and completion.usage.completion_tokens == 3

    url = f"wss://{cluster.balancer_options['inference_addr']}/api/v1/inference_socket"

    async def run() -> None:
        offer = ["paddler", f"paddler.bearer.{KEY}"]
        async with connect(url, ssl=trusted, subprotocols=offer) as ws:
            assert ws.subprotocol == "paddler"
            request = {
                "Request": {
                    "id": "tls",
                    "request": {"ContinueFromRawPrompt": {"raw_prompt": "Hi", "max_tokens": 2}},
                }
            }
            await ws.send(json.dumps(request))
            while True:
                message = json.loads(await asyncio.wait_for(ws.recv(), 10))
                token = message["Response"]["response"]["GeneratedToken"]
                if "Done" in token:
                    assert message["Response"]["request_id"] == "tls"
                    return

    asyncio.run(asyncio.wait_for(run(), 30))
