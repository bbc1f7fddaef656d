"""One NATS connection on its own background thread and asyncio loop.

Used by the NATS control channel and event sink (any process). Logs in with
``KVBM_NATS_USER``/``KVBM_NATS_PASSWORD`` or ``KVBM_NATS_CREDS`` and verifies the server
with ``KVBM_NATS_TLS_CA`` when set. The constructor connects or
raises :class:`ServiceUnavailableError` naming the URL within ``connect_timeout_secs`` (never
hangs); afterwards nats-py reconnects forever and re-subscribes by itself, and this class
counts disconnects and reconnects. ``publish_soon`` queues a publish from any thread without
blocking; a single sender task keeps the order of what one thread queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NatsClient

from kvbm_core.config import ConfigError, KvbmConfig
from kvbm_discovery._loop import BackgroundLoop
from kvbm_discovery.errors import ServiceUnavailableError

__all__ = ["NatsConnection", "nats_servers"]

log = logging.getLogger(__name__)

_PENDING_BYTES = 8 * 1024 * 1024


def nats_servers(config: KvbmConfig) -> list[str]:
    if not config.nats_url:
        raise ConfigError("KVBM_NATS_URL is not set: set it to the NATS server, e.g. nats://127.0.0.1:4222")
    servers = [s.strip() for s in config.nats_url.split(",") if s.strip()]
    for server in servers:
        if "://" not in server:
            raise ConfigError(
                f"KVBM_NATS_URL={config.nats_url!r} is invalid: expected URLs such as "
                "nats://127.0.0.1:4222 or tls://host:4222 (comma-separated)"
            )
    return servers


def _tls_context(config: KvbmConfig) -> ssl.SSLContext | None:
    if not config.nats_tls_ca:
        return None
    if not Path(config.nats_tls_ca).is_file():
        raise ConfigError(
            f"KVBM_NATS_TLS_CA={config.nats_tls_ca!r} is not a readable file: point it at the PEM "
            "CA certificate of the NATS server"
        )
    return ssl.create_default_context(cafile=config.nats_tls_ca)


def _credentials(config: KvbmConfig) -> str | None:
    if config.nats_creds and not Path(config.nats_creds).is_file():
        raise ConfigError(
            f"KVBM_NATS_CREDS={config.nats_creds!r} is not a readable file: point it at the "
            ".creds file (user JWT and NKey seed) issued for this account"
        )
    return config.nats_creds


def _user_password(config: KvbmConfig) -> dict[str, str]:
    if bool(config.nats_user) != bool(config.nats_password):
        raise ConfigError("KVBM_NATS_USER and KVBM_NATS_PASSWORD go together: set both or neither")
    if config.nats_user and config.nats_creds:
        raise ConfigError("KVBM_NATS_USER/_PASSWORD and KVBM_NATS_CREDS are both set: use one way to log in")
    if not config.nats_user or not config.nats_password:
        return {}
    return {"user": config.nats_user, "password": config.nats_password}


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else f"{type(exc).__name__} (no answer)"


class NatsConnection:
    def __init__(self, config: KvbmConfig, name: str, connect_timeout_secs: float = 3.0) -> None:
        self.servers = nats_servers(config)
        tls = _tls_context(config)
        creds = _credentials(config)
        self._login = _user_password(config)
        self.name = name
        self.num_disconnects = 0
        self.num_reconnects = 0
        self.num_send_errors = 0
        self.last_error: Exception | None = None
        self._is_closing = False
        self._loop = BackgroundLoop(f"kvbm-nats-{name}")
        self.nc = NatsClient()
        self._outbox: asyncio.Queue[tuple[str, bytes]] | None = None
        try:
            self._loop.call(self._connect(tls, creds, connect_timeout_secs), connect_timeout_secs + 2)
        except Exception as exc:  # noqa: BLE001 - every start-up failure gets the same clear error
            self._loop.stop(self._close_client)
            raise ServiceUnavailableError(
                "NATS",
                ",".join(self.servers),
                f"{_describe(self.last_error or exc)} (waited {connect_timeout_secs:g}s)",
                "Start nats-server there, fix KVBM_NATS_URL (and KVBM_NATS_USER / KVBM_NATS_PASSWORD, "
                "KVBM_NATS_CREDS or KVBM_NATS_TLS_CA if the server asks for them), or set "
                "KVBM_DISCOVERY_FALLBACK_INPROC=1 to run in-process only",
            ) from None

    async def _connect(self, tls: ssl.SSLContext | None, creds: str | None, timeout: float) -> None:
        options: dict[str, Any] = {
            "servers": self.servers,
            "name": f"kvbm-{self.name}",
            "connect_timeout": max(1, int(timeout)),
            "reconnect_time_wait": 0.5,
            # A few tries at start (a refused connection fails in ~1 s), forever once connected.
            "max_reconnect_attempts": 2,
            "pending_size": _PENDING_BYTES,
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnect,
            "reconnected_cb": self._on_reconnect,
        }
        if tls is not None:
            options["tls"] = tls
        if creds is not None:
            options["user_credentials"] = creds
        options.update(self._login)
        # A server that accepts TCP but never answers must not hang us either: bound it.
        await asyncio.wait_for(self.nc.connect(**options), timeout)
        self.nc.options["max_reconnect_attempts"] = -1
        self._outbox = asyncio.Queue()
        asyncio.get_running_loop().create_task(self._send_forever(self._outbox))

    async def _on_error(self, exc: Exception) -> None:
        self.last_error = exc
        log.debug("kvbm NATS %s: %r", self.name, exc)

    async def _on_disconnect(self) -> None:
        if self._is_closing:
            return
        self.num_disconnects += 1
        log.warning("kvbm NATS %s: disconnected from %s; reconnecting", self.name, ",".join(self.servers))

    async def _on_reconnect(self) -> None:
        self.num_reconnects += 1
        log.warning("kvbm NATS %s: reconnected to %s", self.name, self.nc.connected_url)

    async def _send_forever(self, outbox: asyncio.Queue[tuple[str, bytes]]) -> None:
        while True:
            subject, payload = await outbox.get()
            try:
                await self.nc.publish(subject, payload)
            except Exception as exc:  # noqa: BLE001 - a failed publish must not end the sender
                self.num_send_errors += 1
                log.warning("kvbm NATS %s: publish to %s failed: %r", self.name, subject, exc)

    @property
    def is_connected(self) -> bool:
        return self.nc.is_connected

    def publish_soon(self, subject: str, payload: bytes) -> None:
        """Queue a publish from any thread; returns at once."""
        if self._outbox is not None:
            self._loop.call_soon(self._outbox.put_nowait, (subject, payload))

    def call_soon(self, func: Callable[..., Any], *args: Any) -> None:
        """Run a plain callback on the connection's loop; returns at once."""
        self._loop.call_soon(func, *args)

    def call(self, coro_fn: Callable[[], Awaitable[Any]], timeout: float = 5.0) -> Any:
        """Run ``coro_fn()`` on the connection's loop and wait for its result."""

        async def run() -> Any:
            return await coro_fn()

        return self._loop.call(run(), timeout)

    def submit(self, coro_fn: Callable[[], Awaitable[Any]]) -> None:
        async def run() -> Any:
            return await coro_fn()

        self._loop.submit(run())

    async def _close_client(self) -> None:
        if not self.nc.is_closed:
            with contextlib.suppress(Exception):  # closing anyway
                await asyncio.wait_for(self.nc.flush(), 1.0)
            await self.nc.close()

    async def _drain_outbox(self) -> None:
        while self._outbox is not None and not self._outbox.empty():
            await asyncio.sleep(0.01)

    def close(self) -> None:
        """Send what is queued (bounded wait), close the connection and join the thread."""

        self._is_closing = True

        async def finish() -> None:
            if self.nc.is_connected:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._drain_outbox(), 2.0)
            await self._close_client()

        self._loop.stop(finish)
