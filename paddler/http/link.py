"""Each worker's connection to the broker: one ``AsyncClient``, opened on first use
(the broker may start after the workers) and opened again after a failure."""

from __future__ import annotations

import asyncio
import logging

from paddler.client import AsyncClient

log = logging.getLogger("paddler.http")


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

    async def client(self) -> AsyncClient:
        if self._client is not None:
            return self._client
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._client is None:
                broker_key, secret_key = self.curve_keys or (None, None)
                self._client = await AsyncClient.connect(
                    self.address,
                    timeout_s=self.timeout_s,
                    broker_public_key=broker_key,
                    curve_secret_key=secret_key,
                )
        return self._client

    async def reset(self) -> None:
        """Drop a client that stopped answering; the next call opens a new one."""
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def close(self) -> None:
        await self.reset()
