"""``free_port`` gives every caller of the process a port of its own: the kernel
would hand a port it just gave out, and has not seen bound since, to the next caller
(about one cluster in two thousand then had two services on one port, and its
balancer exited at once)."""

from __future__ import annotations

import socket

from paddler.testing.cluster import RECENT_PORTS, free_port


def test_free_port_never_hands_out_a_port_twice() -> None:
    ports = [free_port() for _ in range(RECENT_PORTS // 2)]
    # the kernel alone repeats more than a hundred of 2000 ports
    assert len(set(ports)) == len(ports)


def test_a_port_from_free_port_can_be_bound() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", free_port()))
        listener.listen()
