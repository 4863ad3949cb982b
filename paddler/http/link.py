"""Each worker's connection to the broker: one ``AsyncClient``, opened on first use
(the broker may start after the workers) and opened again after a failure.

The link also answers ``/health`` from a cached liveness check: when the broker was
last heard (anything the client received, or the answer to a ping), refreshed by at
most one ping per ``PROBE_INTERVAL_S``, and only while someone asks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import zmq.asyncio

from paddler.client import AsyncClient
from paddler.errors import BrokerUnreachable

log = logging.getLogger("paddler.http")

PROBE_INTERVAL_S = 1.0
"""A broker heard this recently is not pinged; pings start at most this often."""
PROBE_TIMEOUT_S = 2.0
"""A ping (or a first connection) not answered within this is a failed check."""
LIVE_WINDOW_S = 3.0
"""The broker is taken as live while it was heard within this, and no check failed since."""


class BrokerLink:
    def __init__(
        self, address: str, timeout_s: float = 5.0, curve_keys: list[str] | None = None
    ) -> None:
        """``curve_keys``: the broker's public key file and this worker's secret key
        file, when the broker speaks CurveZMQ."""
        self.address = address
        self.timeout_s = timeout_s
        self.curve_keys = curve_keys
        self._client: AsyncClient | None = None
        self._lock: asyncio.Lock | None = None
        # one context for every client of the link: closing a failed client then never
        # waits for a context to terminate on the event loop
        self._context: zmq.asyncio.Context | None = None
        self._heard_at_s: float | None = None
        self._failed_at_s: float | None = None
        self._failure = ""
        self._reported_down = False
        self._probe: asyncio.Task[None] | None = None
        self._probe_started_at_s = -PROBE_INTERVAL_S

    async def client(self) -> AsyncClient:
        if self._client is not None:
            return self._client
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._client is None:
                if self._context is None:
                    self._context = zmq.asyncio.Context()
                broker_key, secret_key = self.curve_keys or (None, None)
                self._client = await AsyncClient.connect(
                    self.address,
                    timeout_s=self.timeout_s,
                    context=self._context,
                    broker_public_key=broker_key,
                    curve_secret_key=secret_key,
                )
        return self._client

    async def reset(self, failed_client: AsyncClient | None = None) -> None:
        """Drop the client that failed (it raised ``BrokerUnreachable``); the next call
        opens a new one. Only that client is closed: one that another request already
        opened in its place is left alone, with its streams. Without an argument: the
        current client, if it has failed. The streams still open on the dropped client
        end at once with ``BrokerUnreachable``."""
        client = self._client
        if client is None or (failed_client is not None and failed_client is not client):
            return  # already replaced (and closed by whoever replaced it)
        if failed_client is None and client.failure is None and not client.closed:
            return  # the current client works: the failure was an older client's
        self._client = None
        log.info("dropping the connection to the balancer at %s", self.address)
        reason = client.failure or "it was closed"
        await client.close(
            BrokerUnreachable(
                f"the connection to the balancer at {self.address} was dropped ({reason})"
            )
        )

    async def broker_down(self) -> str | None:
        """Why this worker cannot reach a live broker, or None when it can: cheap, from
        what the link last heard; a ping (at most one per ``PROBE_INTERVAL_S``, bounded
        by ``PROBE_TIMEOUT_S``) refreshes it in the background. With nothing known yet,
        or a broker silent for a while, the answer waits for that ping."""
        now = time.monotonic()
        heard = self._heard()
        if heard is not None and now - heard < PROBE_INTERVAL_S and not self._failed_since(heard):
            return None
        probe = self._start_probe(now)
        if probe is not None and not self._failed_since(heard):
            # nothing says the broker is down, but it has not been heard lately: ask it
            await asyncio.wait({probe}, timeout=PROBE_TIMEOUT_S + PROBE_INTERVAL_S)
            now = time.monotonic()
            heard = self._heard()
        if heard is not None and now - heard < LIVE_WINDOW_S and not self._failed_since(heard):
            return None
        if self._failed_since(heard):
            return self._failure
        if heard is None:
            return f"no answer from {self.address} yet"
        return f"no answer from {self.address} for {now - heard:.1f} s"

    def _heard(self) -> float | None:
        """When the broker was last heard, by the current client or a ping."""
        client = self._client
        heard = client.heard_at_s if client is not None else None
        if heard is not None and (self._heard_at_s is None or heard > self._heard_at_s):
            self._heard_at_s = heard
        return self._heard_at_s

    def _failed_since(self, heard: float | None) -> bool:
        return self._failed_at_s is not None and (heard is None or self._failed_at_s > heard)

    def _start_probe(self, now: float) -> asyncio.Task[None] | None:
        """The ping in flight, a new one if none is and the last started long enough
        ago, or None."""
        if self._probe is not None and not self._probe.done():
            return self._probe
        if now - self._probe_started_at_s < PROBE_INTERVAL_S:
            return None
        self._probe_started_at_s = now
        self._probe = asyncio.ensure_future(self._ping())
        return self._probe

    async def _ping(self) -> None:
        client: AsyncClient | None = None

        async def ping() -> None:
            nonlocal client
            client = await self.client()  # connects if the worker never did
            await client.ping()

        try:
            await asyncio.wait_for(ping(), PROBE_TIMEOUT_S)
        except BrokerUnreachable as exc:  # before TimeoutError, its base class
            self._failed(str(exc))
            await self.reset(client)
        except TimeoutError:
            self._failed(f"no answer to a ping from {self.address} within {PROBE_TIMEOUT_S} s")
        except Exception as exc:  # a refused connection, a version mismatch: not live
            self._failed(f"{type(exc).__name__}: {exc}")
        else:
            self._heard_at_s = time.monotonic()
            if self._reported_down:
                self._reported_down = False
                log.info("health check: the balancer at %s answers again", self.address)

    def _failed(self, reason: str) -> None:
        if not self._reported_down:
            self._reported_down = True
            log.warning("health check: %s", reason)
        self._failed_at_s = time.monotonic()
        self._failure = reason

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._probe
        client, self._client = self._client, None
        if client is not None:
            await client.close()
        if self._context is not None:
            self._context.destroy(linger=0)
            self._context = None
