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
