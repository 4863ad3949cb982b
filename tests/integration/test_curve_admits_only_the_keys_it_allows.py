"""CurveZMQ on the broker's sockets, with real processes: only agents and clients
whose public keys are in the allow-lists get in; keys added to a list work without
a restart; an identity in use cannot be taken over; a balancer will not face a
network without curve unless told to."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import zmq
import zmq.auth

from paddler.client import AsyncClient
from paddler.curve import fingerprint, generate, load_public
from paddler.errors import BrokerUnreachable
from paddler.protocol.codec import encode, unpack_body
from paddler.protocol.kinds import PROTOCOL_VERSION, Kind
from paddler.testing.cluster import LocalCluster, free_port, wait_until


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Any]:
    root = tmp_path / "keys"
    agents, clients = root / "agents", root / "clients"
    agents.mkdir(parents=True)
    clients.mkdir()
    made: dict[str, Any] = {"root": root, "agents": agents, "clients": clients}
    for name in ("broker", "agent", "stranger", "client", "late"):
        made[name] = generate(root, name)  # (public, secret)
    shutil.copy(made["agent"][0], agents)
    shutil.copy(made["client"][0], clients)
    return made


def _curve_cluster(make_cluster, keys: dict[str, Any], **options: Any) -> LocalCluster:
    cluster = make_cluster(
        curve_secret_key=keys["broker"][1],
        authorized_agent_keys=keys["agents"],
        authorized_client_keys=keys["clients"],
        **options,
    )
    cluster.start_balancer()
    cluster.wait_for_http()
    return cluster


def _agent_keys(keys: dict[str, Any], name: str) -> dict[str, Any]:
    return {"broker_public_key": keys["broker"][0], "curve_secret_key": keys[name][1]}


def _names(cluster: LocalCluster) -> set[str]:
    """The agents list through the management API (the HTTP workers' own keys)."""
    agents = httpx.get(f"{cluster.management_url}/api/v1/agents").json()["agents"]
    return {agent["name"] for agent in agents}


def test_only_allowed_agents_register_and_show_their_key(make_cluster, keys) -> None:
    cluster = _curve_cluster(make_cluster, keys)
    cluster.start_agent("allowed", **_agent_keys(keys, "agent"))
    cluster.start_agent("stranger", **_agent_keys(keys, "stranger"))
    cluster.start_agent("plain")  # no curve at all
    wait_until(lambda: "allowed" in _names(cluster), what="the allowed agent registers")
    context = zmq.Context()
    stranger = _dealer(context, keys, "stranger", b"raw-stranger")  # a key not listed
    stranger.connect(cluster.agents_addr)
    try:
        stranger.send_multipart(_register_frames("raw-stranger"))
        time.sleep(2.0)  # the others retry registering every second
        assert _names(cluster) == {"allowed"}
        client = cluster.client(**_agent_keys(keys, "client"))
        for _ in range(3):  # every prompt goes to the allowed agent, none to a stranger
            assert client.continue_from_raw_prompt("secret prompt", max_tokens=3).text()
        assert not stranger.poll(500), "an agent without an allowed key received a frame"
    finally:
        stranger.close()
        context.term()
    (agent,) = httpx.get(f"{cluster.management_url}/api/v1/agents").json()["agents"]
    assert agent["key_fingerprint"] == fingerprint(load_public(keys["agent"][0], "agent"))


def test_a_key_added_to_the_folder_works_without_a_restart(make_cluster, keys) -> None:
    cluster = _curve_cluster(make_cluster, keys)
    cluster.start_agent("late", **_agent_keys(keys, "late"))
    time.sleep(1.5)
    assert _names(cluster) == set()
    shutil.copy(keys["late"][0], keys["agents"])
    wait_until(lambda: "late" in _names(cluster), timeout_s=15, what="the late key takes effect")


def test_only_allowed_clients_can_submit(make_cluster, keys) -> None:
    cluster = _curve_cluster(make_cluster, keys)
    cluster.start_agent("allowed", **_agent_keys(keys, "agent"))
    client = cluster.client(**_agent_keys(keys, "client"))
    cluster.wait_for_agents(client, 1)
    assert client.continue_from_raw_prompt("hi", max_tokens=3).text()
    for options in ({}, _agent_keys(keys, "stranger")):
        with pytest.raises(BrokerUnreachable):
            cluster.client(timeout_s=1.5, **options)
    # a stranger's frames, sent without a client library, change nothing either
    before = client.desired_state()
    context = zmq.Context()
    stranger = _dealer(context, keys, "stranger", b"stranger-client")
    stranger.connect(cluster.clients_addr)
    try:
        state = {"model": {"LocalToAgent": "/etc/passwd"}}
        stranger.send_multipart(encode(Kind.PUT_DESIRED_STATE, 1, {"state": state}))
        stranger.send_multipart(encode(Kind.SUBMIT, 2, {"raw_prompt": "x", "max_tokens": 2}))
        assert not stranger.poll(1500), "the stranger got an answer"
    finally:
        stranger.close()
        context.term()
    assert client.desired_state() == before


def test_the_async_client_takes_its_keys_and_a_client_key_added_works_at_once(
    make_cluster, keys
) -> None:
    cluster = _curve_cluster(make_cluster, keys)
    cluster.start_agent("allowed", **_agent_keys(keys, "agent"))
    cluster.wait_for_agents(cluster.client(**_agent_keys(keys, "client")), 1)

    async def served(name: str) -> str:
        client = await AsyncClient.connect(
            cluster.clients_addr, timeout_s=1.5, **_agent_keys(keys, name)
        )
        try:
            stream = await client.continue_from_raw_prompt("hi", max_tokens=3)
            return await stream.text()
        finally:
            await client.close()

    assert asyncio.run(served("client"))
    with pytest.raises(BrokerUnreachable):
        asyncio.run(served("late"))
    shutil.copy(keys["late"][0], keys["clients"])
    wait_until(lambda: _connects(served, "late"), timeout_s=15, what="the late key works")


def _connects(served: Any, name: str) -> bool:
    try:
        return bool(asyncio.run(served(name)))
    except BrokerUnreachable:
        return False


def test_an_identity_in_use_cannot_be_taken_over(make_cluster) -> None:
    cluster = make_cluster()
    cluster.start_balancer()
    cluster.start_agent("victim", slots=2, identity="victim-agent")
    client = cluster.client()
    cluster.wait_for_agents(client, 1)
    context = zmq.Context()
    impostor = context.socket(zmq.DEALER)
    impostor.setsockopt(zmq.LINGER, 0)
    impostor.setsockopt(zmq.IDENTITY, b"victim-agent")
    impostor.connect(cluster.agents_addr)
    try:
        impostor.send_multipart(encode(Kind.HEARTBEAT, 0, {}))
        time.sleep(0.5)
        for _ in range(3):
            assert client.continue_from_raw_prompt("secret prompt", max_tokens=3).text()
        assert not impostor.poll(1000), "the impostor received a frame"
        assert [a["name"] for a in client.agents()] == ["victim"]
    finally:
        impostor.close()
        context.term()


def _dealer(context: zmq.Context[Any], keys: dict[str, Any], name: str, identity: bytes):
    """A raw agent connection with ``name``'s keypair, claiming ``identity``."""
    public, secret = zmq.auth.load_certificate(keys[name][1])
    server_public, _ = zmq.auth.load_certificate(keys["broker"][0])
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.IDENTITY, identity)
    socket.curve_publickey = public
    socket.curve_secretkey = secret
    socket.curve_serverkey = server_public
    return socket


def _register_frames(name: str) -> list[bytes]:
    status = {"slots_total": 1, "ready": True, "model_path": "m.gguf"}
    return encode(Kind.REGISTER, 0, {"version": PROTOCOL_VERSION, "name": name, "status": status})


def test_another_allowed_key_cannot_take_a_gone_agents_id(make_cluster, keys) -> None:
    shutil.copy(keys["late"][0], keys["agents"])  # an allowed key, but not the agent's
    # the broker's own heartbeats are far apart: a send to the gone victim would tell it
    # the victim is unreachable, and this test is about what it learns from the impostor
    cluster = _curve_cluster(make_cluster, keys, heartbeat_interval=60_000)
    client = cluster.client(**_agent_keys(keys, "client"))
    context = zmq.Context()
    victim = _dealer(context, keys, "agent", b"victim-agent")
    victim.connect(cluster.agents_addr)
    impostor = None
    try:
        victim.send_multipart(_register_frames("victim"))
        wait_until(lambda: _names(cluster) == {"victim"}, what="the victim registers")
        victim.close()  # its connection is gone; the broker has not noticed yet
        # heartbeats under the victim's id, with another key: the agent is removed. A
        # connection made before the broker's socket dropped the victim's is refused its
        # id by ZeroMQ (no handover) and heard by nobody: then the impostor reconnects.
        deadline = time.monotonic() + 20
        while "victim" in _names(cluster) and time.monotonic() < deadline:
            if impostor is not None:
                impostor.close()
            impostor = _dealer(context, keys, "late", b"victim-agent")
            impostor.connect(cluster.agents_addr)
            for _ in range(10):
                impostor.send_multipart(encode(Kind.HEARTBEAT, 0, {}))
                time.sleep(0.2)
                if "victim" not in _names(cluster):
                    break
        assert _names(cluster) == set()
        assert impostor is not None
        assert "lost its id to another key" in cluster.balancer.log()
        # and the id cannot be registered with the other key
        impostor.send_multipart(_register_frames("impostor"))
        kinds = []
        while impostor.poll(2000):
            frames = impostor.recv_multipart()
            kinds.append((frames[0][0], unpack_body(frames[1])))
        assert (Kind.ERROR, "IdentityInUse") in [(k, b.get("kind")) for k, b in kinds]
        assert not [k for k, _ in kinds if k in (Kind.DISPATCH, Kind.REGISTERED)]
        assert _names(cluster) == set()
        # a request finds no agent (it waits in the buffer): the impostor gets no prompt
        with client.continue_from_raw_prompt("secret prompt", max_tokens=3):
            assert not impostor.poll(1000), "the impostor received a frame"
            assert client.buffered_requests() == 1
    finally:
        victim.close()
        if impostor is not None:
            impostor.close()
        context.term()


def test_a_network_address_without_curve_is_refused(tmp_path: Path) -> None:
    argv = [
        sys.executable,
        "-m",
        "paddler",
        "balancer",
        "--agents-addr",
        f"tcp://0.0.0.0:{free_port()}",
        "--clients-addr",
        f"tcp://127.0.0.1:{free_port()}",
        "--inference-addr",
        f"127.0.0.1:{free_port()}",
        "--management-addr",
        f"127.0.0.1:{free_port()}",
    ]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "paddler keys generate" in result.stderr
    assert "--allow-insecure-network" in result.stderr


def test_paddler_keys_generate_writes_a_private_secret(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "paddler", "keys", "generate", "--out", str(tmp_path), "box-1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert (tmp_path / "box-1.key").is_file()
    assert (tmp_path / "box-1.key_secret").stat().st_mode & 0o777 == 0o600
    assert fingerprint(load_public(tmp_path / "box-1.key", "key")) in result.stdout
