"""The options of a client's DEALER socket, the same for both drivers."""

from __future__ import annotations

from typing import Any

import zmq

from paddler.protocol.codec import MAX_BODY_BYTES


def configure_dealer(socket: zmq.Socket[Any]) -> None:
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDHWM, 100_000)
    socket.setsockopt(zmq.RCVHWM, 100_000)
    socket.setsockopt(zmq.MAXMSGSIZE, MAX_BODY_BYTES + 4096)
