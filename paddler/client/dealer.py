"""The options of a client's DEALER socket, the same for both drivers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import zmq

from paddler.curve import client_keys, secure_client
from paddler.protocol.codec import MAX_BODY_BYTES


def configure_dealer(
    socket: zmq.Socket[Any],
    broker_public_key: str | Path | None = None,
    curve_secret_key: str | Path | None = None,
) -> None:
    """Options of a client's DEALER; with both key files, CurveZMQ to the broker
    (``ConfigurationError`` if only one is given or a file cannot be read)."""
    keys = client_keys(broker_public_key, curve_secret_key, "Client")
    if keys is not None:
        secure_client(socket, *keys)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDHWM, 100_000)
    socket.setsockopt(zmq.RCVHWM, 100_000)
    socket.setsockopt(zmq.MAXMSGSIZE, MAX_BODY_BYTES + 4096)


def open_dealer(
    context: Any,
    address: str,
    broker_public_key: str | Path | None,
    curve_secret_key: str | Path | None,
    own_context: bool,
) -> Any:
    """A configured DEALER of ``context`` (sync or asyncio) connected to ``address``;
    if the options are refused, nothing is left open (``own_context`` is terminated)."""
    socket = context.socket(zmq.DEALER)
    try:
        configure_dealer(socket, broker_public_key, curve_secret_key)
    except BaseException:
        socket.close(linger=0)
        if own_context:
            context.term()
        raise
    socket.connect(address)
    return socket
