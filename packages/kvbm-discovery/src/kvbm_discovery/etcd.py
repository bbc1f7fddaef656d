"""Discovery through etcd (``aetcd``, asyncio) on a background loop thread (one per process,
shared by every ``EtcdDiscovery``), called from synchronous code with timeouts.

Which process: every kvbm process when ``KVBM_DISCOVERY=etcd``; one ``EtcdDiscovery`` each.

- Start: the first answering endpoint of ``KVBM_ETCD_ENDPOINTS`` is used (see
  :mod:`kvbm_discovery.etcd_client`; TLS from
  ``KVBM_ETCD_CA_CERT``/``_CERT_KEY``/``_CERT_CERT``, auth from ``KVBM_ETCD_USER``/``_PASSWORD``);
  none answering within ``connect_timeout_secs`` raises :class:`ServiceUnavailableError`
  naming them. Then a lease of ``lease_ttl_secs`` is granted for the whole process.
- Values are signed (:mod:`kvbm_discovery.envelope`, scope ``<instance_id>@<lease>``) with the
  deployment secret (:mod:`kvbm_discovery.control_secret`: required unless
  ``KVBM_CONTROL_INSECURE=1``). A value is a registration only if it verifies, names its own
  key and is held under the lease it was signed for: anything else (no lease, unsigned, a
  value copied from another key or lease, not a bounded ``InstanceInfo``) is skipped and
  counted in ``num_ignored``, so it neither counts for the barrier nor stalls the watch.
- ``register``: a transaction puts ``kvbm/<ns>/instances/<instance_id>`` only if the key
  does not exist (or is ours, or holds no registration as above: that is replaced, atomically
  against its revision). A key held by another lease is retried until that lease could
  have lapsed (a predecessor killed moments ago), then :class:`DuplicateInstanceError`
  naming the key.
- Keep-alive every ``ttl/3`` s. If the server lost the lease (restarted with fresh data, or
  we were cut off longer than the TTL) a new lease is granted and every registration is put
  again (``num_reregistrations``). While etcd is down the keep-alive retries every 0.5 s;
  after a login error (a restarted etcd voids tokens) or every 4th failure in a row the client
  is replaced, on the next endpoint if there are several (``num_reconnects``).
- Watch: a snapshot of the prefix, then a watch from the snapshot's revision; any error
  (server restart, compaction) leads to a fresh snapshot that is diffed into the view, so
  members that vanished meanwhile are reported ``removed``.
- ``close()`` revokes the lease so peers see this process leave at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from dataclasses import replace
from typing import Any

import aetcd

from kvbm_core.config import ConfigError, KvbmConfig
from kvbm_discovery.control_secret import control_secret
from kvbm_discovery.discovery import MAX_INFO_BYTES, Discovery, InstanceInfo, Registration
from kvbm_discovery.envelope import seal, unseal
from kvbm_discovery.errors import (
    DiscoveryError,
    DuplicateInstanceError,
    MessageError,
    ServiceUnavailableError,
)
from kvbm_discovery.etcd_client import (
    CHANNEL_OPTIONS,
    EtcdEndpoint,
    TlsClient,
    grpc_loop,
    parse_endpoints,
    tls_credentials,
)
from kvbm_discovery.naming import check_token, instance_key, instance_prefix

__all__ = ["EtcdDiscovery", "EtcdEndpoint", "parse_endpoints"]

log = logging.getLogger(__name__)

_RETRY_SECS = 0.5


def _reraise_if_cancelled(exc: asyncio.CancelledError) -> None:
    """grpc-aio raises CancelledError for a call its channel cancelled (we closed a replaced
    client): that is a failed call to retry. Only a cancellation of our own task ends it."""
    task = asyncio.current_task()
    if task is None or task.cancelling():
        raise exc


def _is_auth_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, aetcd.exceptions.UnauthenticatedError) or "auth" in text or "token" in text


class EtcdDiscovery(Discovery):
    def __init__(
        self,
        config: KvbmConfig,
        lease_ttl_secs: int = 10,
        connect_timeout_secs: float = 3.0,
        call_timeout_secs: float = 5.0,
        sender_id: str | None = None,
    ) -> None:
        super().__init__(check_token(config.namespace), config.leader_worker_init_timeout_secs, sender_id)
        self._secret = control_secret(config, "etcd discovery")
        if int(lease_ttl_secs) < 2:
            raise ConfigError(f"etcd lease TTL must be >= 2 s (etcd's minimum), got {lease_ttl_secs}")
        if bool(config.etcd_user) != bool(config.etcd_password):
            raise ConfigError("KVBM_ETCD_USER and KVBM_ETCD_PASSWORD go together: set both or neither")
        self.endpoints = parse_endpoints(config)
        self.lease_ttl_secs = int(lease_ttl_secs)
        self.call_timeout_secs = call_timeout_secs
        self.num_reregistrations = 0
        self.num_resyncs = 0
        self.lost_instance_ids: list[str] = []
        self.num_reconnects = 0
        self._num_watch_failures = 0
        self._reconnect_lock = asyncio.Lock()
        self._config = config
        self._credentials = tls_credentials(config) if any(e.is_tls for e in self.endpoints) else None
        self._prefix = instance_prefix(self.namespace)
        self._registrations: dict[str, InstanceInfo] = {}
        self._client: aetcd.Client | None = None
        self._endpoint = self.endpoints[0]
        self._lease_id = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._synced = threading.Event()
        self._is_closed = False
        self._loop = grpc_loop()
        try:
            self._loop.call(self._start(connect_timeout_secs), connect_timeout_secs * len(self.endpoints) + 2)
        except Exception as exc:  # noqa: BLE001 - every start-up failure gets one clear error
            with contextlib.suppress(Exception):
                self._loop.call(self._close_client(), 3.0)
            hint = (
                "Check KVBM_ETCD_USER / KVBM_ETCD_PASSWORD"
                if _is_auth_error(exc)
                else "Start etcd there, fix KVBM_ETCD_ENDPOINTS, or set KVBM_DISCOVERY_FALLBACK_INPROC=1 "
                "to run in-process only"
            )
            raise ServiceUnavailableError(
                "etcd",
                ", ".join(map(str, self.endpoints)),
                f"{type(exc).__name__}: {exc or 'no answer'} (waited {connect_timeout_secs:g}s per endpoint)",
                hint,
            ) from None
        if not self._synced.wait(call_timeout_secs):
            self.close()
            raise ServiceUnavailableError("etcd", str(self._endpoint), "the first listing did not arrive in time")

    # -- connection -------------------------------------------------------------------------

    def _make_client(self, endpoint: EtcdEndpoint) -> aetcd.Client:
        kwargs: dict[str, Any] = {
            "host": endpoint.host,
            "port": endpoint.port,
            "username": self._config.etcd_user,
            "password": self._config.etcd_password,
            "timeout": self.call_timeout_secs,
            "options": dict(CHANNEL_OPTIONS),
        }
        if endpoint.is_tls:
            return TlsClient(credentials=self._credentials, **kwargs)
        return aetcd.Client(**kwargs)

    async def _start(self, connect_timeout: float) -> None:
        errors = []
        for endpoint in self.endpoints:
            client = self._make_client(endpoint)
            try:
                await asyncio.wait_for(client.get(self._prefix), connect_timeout)
            except Exception as exc:  # noqa: BLE001 - try the next endpoint
                errors.append(f"{endpoint}: {type(exc).__name__} {exc}")
                log.info("kvbm etcd: %s", errors[-1])
                await self._close_quietly(client)
                continue
            self._client, self._endpoint = client, endpoint
            break
        else:
            raise DiscoveryError("; ".join(errors))
        self._lease_id = (await self._client.lease(self.lease_ttl_secs)).id
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._keepalive_forever()), loop.create_task(self._watch_forever())]

    async def _reconnect(self) -> None:
        """A new client on the next endpoint (the same one if there is one): it also logs in
        again, which a restarted etcd with authentication requires (old tokens are void)."""
        index = (self.endpoints.index(self._endpoint) + 1) % len(self.endpoints)
        old, self._endpoint = self._client, self.endpoints[index]
        self._client = self._make_client(self._endpoint)
        self.num_reconnects += 1
        log.warning("kvbm etcd: reconnecting to %s", self._endpoint)
        if old is not None:  # in the background: closing a broken channel may take a while
            asyncio.get_running_loop().create_task(self._close_quietly(old))

    @staticmethod
    async def _close_quietly(client: aetcd.Client) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), 2.0)

    async def _close_client(self) -> None:
        if self._client is not None:
            try:  # grpc-aio's channel close now and then waits for a wake-up that never comes
                await asyncio.wait_for(self._client.close(), 0.5)
            except TimeoutError:
                log.debug("kvbm etcd: client close timed out; dropping the channel")

    # -- registration -----------------------------------------------------------------------

    def register(self, info: InstanceInfo) -> Registration:
        if self._is_closed:
            raise RuntimeError("register() on a closed EtcdDiscovery")
        info = self._stamped(info)
        wait = self.lease_ttl_secs + 1.0
        try:
            self._loop.call(self._register(info, time.monotonic() + wait), wait + self.call_timeout_secs + 1)
        except TimeoutError:
            raise ServiceUnavailableError("etcd", str(self._endpoint), "registration got no answer") from None
        except (aetcd.ClientError, asyncio.CancelledError, concurrent.futures.CancelledError) as exc:
            raise ServiceUnavailableError("etcd", str(self._endpoint), f"registration failed: {exc!r}") from None
        return Registration(info, self._release)

    async def _register(self, info: InstanceInfo, deadline: float) -> None:
        await self._put_if_free(info, deadline)
        self._registrations[info.instance_id] = info
        self._apply(info.instance_id, info)  # our own view holds it on return; the watch agrees

    def _sealed(self, info: InstanceInfo) -> bytes:
        scope = f"{info.instance_id}@{self._lease_id:x}"
        return seal(self._secret, self.sender_id, 0, scope, info.to_json())

    async def _put_if_free(self, info: InstanceInfo, deadline: float) -> None:
        assert self._client is not None
        key = instance_key(self.namespace, info.instance_id)
        tx = self._client.transactions
        while True:
            value = self._sealed(info)
            is_created, replies = await self._client.transaction(
                compare=[tx.create(key) == 0],
                success=[tx.put(key, value, self._lease_id)],
                failure=[tx.get(key)],
            )
            if is_created:
                return
            held = replies[0][0][1] if replies and replies[0] else None
            if held is None or held.lease == self._lease_id:
                await self._client.put(key, value, lease=self._lease_id)
                return
            if isinstance(self._registration(key, held), str):
                await self._take_over(key, held, value)  # not a registration: nobody holds the rank
                continue
            if time.monotonic() >= deadline:
                raise DuplicateInstanceError(self._describe_holder(key, held))
            await asyncio.sleep(0.25)

    async def _take_over(self, key: bytes, held: Any, value: bytes) -> None:
        assert self._client is not None
        tx = self._client.transactions
        is_replaced, _ = await self._client.transaction(
            compare=[tx.mod(key) == held.mod_revision],
            success=[tx.put(key, value, self._lease_id)],
            failure=[],
        )
        if is_replaced:
            log.warning("kvbm etcd: replaced %r, which held no valid registration (lease %x)", key, held.lease)

    def _describe_holder(self, key: bytes, held: Any) -> str:
        info = self._registration(key, held)
        holder = info if isinstance(info, str) else info.describe()
        instance_id = key[len(self._prefix) :].decode(errors="replace")
        return (
            f"{instance_id} is already registered in namespace {self.namespace!r} by {holder} "
            f"(etcd key {key.decode(errors='replace')!r}, lease {held.lease:x}) and did not lapse "
            f"within the {self.lease_ttl_secs}s lease TTL; give each rank its own rank number or "
            "stop the other process"
        )

    def _release(self, instance_id: str) -> None:
        if self._is_closed:
            return

        async def release() -> None:
            self._registrations.pop(instance_id, None)
            assert self._client is not None
            await self._client.delete(instance_key(self.namespace, instance_id))
            self._apply(instance_id, None)

        try:
            self._loop.call(release(), self.call_timeout_secs)
        except Exception as exc:  # noqa: BLE001 - the lease still removes it when we exit
            log.warning("kvbm etcd: could not withdraw %s now (%r); its lease will", instance_id, exc)

    async def _reregister(self) -> None:
        assert self._client is not None
        self._lease_id = (await self._client.lease(self.lease_ttl_secs)).id
        for info in list(self._registrations.values()):
            try:
                await self._put_if_free(info, time.monotonic() + self.lease_ttl_secs + 1.0)
            except DuplicateInstanceError as exc:  # another process took our rank meanwhile
                self._registrations.pop(info.instance_id, None)
                self.lost_instance_ids.append(info.instance_id)
                log.error("kvbm etcd: could not re-register: %s", exc)
        self.num_reregistrations += 1
        log.warning("kvbm etcd: lease was lost; re-registered %s", sorted(self._registrations) or "nothing")

    async def _keepalive_forever(self) -> None:
        num_failures = 0
        while not self._is_closed:
            await asyncio.sleep(self.lease_ttl_secs / 3 if num_failures == 0 else _RETRY_SECS)
            client = self._client
            try:
                assert client is not None
                # bounded well below the TTL, so one stuck call cannot let the lease lapse
                reply = await asyncio.wait_for(client.refresh_lease(self._lease_id), self.lease_ttl_secs / 3)
                if reply is None or reply.TTL <= 0:
                    await self._reregister()
                if num_failures:
                    log.warning("kvbm etcd: %s answers again", self._endpoint)
                num_failures = 0
            except asyncio.CancelledError as exc:
                _reraise_if_cancelled(exc)
                num_failures += 1
                await self._after_failure(client, num_failures, exc, "keep-alive")
            except Exception as exc:  # noqa: BLE001 - keep trying until closed
                num_failures += 1
                await self._after_failure(client, num_failures, exc, "keep-alive")

    async def _after_failure(
        self, client: aetcd.Client | None, num_failures: int, exc: BaseException, what: str
    ) -> None:
        """Log the first failure of a streak; on a login error, or every 4th failure, replace
        the client (once, however many tasks saw it fail)."""
        if num_failures == 1:
            log.warning("kvbm etcd: %s on %s failed (%r); retrying", what, self._endpoint, exc)
        else:
            log.debug("kvbm etcd: %s on %s failed again (%r)", what, self._endpoint, exc)
        if num_failures % 4 == 0 or _is_auth_error(exc):
            async with self._reconnect_lock:
                if self._client is client:
                    await self._reconnect()

    # -- watch ------------------------------------------------------------------------------

    def _registration(self, key: bytes, kv: Any) -> InstanceInfo | str:
        """The registration ``kv`` holds, or why it holds none."""
        instance_id = key[len(self._prefix) :].decode(errors="replace")
        if not kv.lease:
            return "no lease (kvbm registers only under a lease)"
        try:
            envelope = unseal(self._secret, kv.value, MAX_INFO_BYTES + 1024)
            if envelope.scope != f"{instance_id}@{kv.lease:x}":
                return f"signed for {envelope.scope!r:.80}, not for this key and lease"
            info = InstanceInfo.from_json(envelope.payload)
        except MessageError as exc:
            return str(exc)
        except Exception as exc:  # noqa: BLE001 - no value may stop the watch
            return f"unreadable ({type(exc).__name__})"
        if info.instance_id != instance_id:
            return f"holds {info.instance_id}, not {instance_id}"
        return replace(info, sender=envelope.sender)

    def _parse(self, kv: Any) -> tuple[str, InstanceInfo | None]:
        instance_id = kv.key[len(self._prefix) :].decode(errors="replace")
        info = self._registration(kv.key, kv)
        if isinstance(info, str):
            self._ignore(f"etcd key {kv.key!r}", info)
            return instance_id, None
        return instance_id, info

    async def _watch_forever(self) -> None:
        while not self._is_closed:
            client = self._client
            try:
                await self._sync_and_watch()
            except asyncio.CancelledError as exc:
                _reraise_if_cancelled(exc)
                self._num_watch_failures += 1
                await self._after_failure(client, self._num_watch_failures, exc, "watch")
                await asyncio.sleep(_RETRY_SECS)
            except Exception as exc:  # noqa: BLE001 - resync after any stream error
                self._num_watch_failures += 1
                await self._after_failure(client, self._num_watch_failures, exc, "watch")
                await asyncio.sleep(_RETRY_SECS)

    async def _sync_and_watch(self) -> None:
        assert self._client is not None
        snapshot = await self._client.get_prefix(self._prefix)
        members = {}
        for kv in snapshot:
            instance_id, info = self._parse(kv)
            if info is not None:
                members[instance_id] = info
        self._replace_all(members)
        self.num_resyncs += 1
        self._num_watch_failures = 0
        self._synced.set()
        watch = await self._client.watch_prefix(self._prefix, start_revision=snapshot.header.revision + 1)
        async for event in watch:
            if event.kind == "DELETE":
                self._apply(event.kv.key[len(self._prefix) :].decode(errors="replace"), None)
                continue
            instance_id, info = self._parse(event.kv)
            if info is not None:
                self._apply(instance_id, info)

    # -- shutdown ---------------------------------------------------------------------------

    def close(self) -> None:
        if self._is_closed:
            return
        self._is_closed = True

        async def shutdown() -> None:
            keepalive, watch = self._tasks or (None, None)
            if keepalive is not None:  # first, so a revoked lease is not re-granted
                keepalive.cancel()
            if self._client is not None and self._lease_id:
                try:
                    await asyncio.wait_for(self._client.revoke_lease(self._lease_id), 2.0)
                except Exception as exc:  # noqa: BLE001 - it lapses by itself
                    log.info("kvbm etcd: lease not revoked (%r); it lapses within its TTL", exc)
            # Closing the channel ends its calls; a grpc-aio call cancelled while the channel
            # is open sometimes never finishes cancelling.
            await self._close_client()
            if watch is not None:
                watch.cancel()
            pending = [t for t in self._tasks if not t.done()]
            if pending:
                await asyncio.wait(pending, timeout=1.0)

        try:
            self._loop.call(shutdown(), 5.0)
        except Exception as exc:  # noqa: BLE001 - the lease lapses by itself
            log.warning("kvbm etcd: close did not finish cleanly (%r)", exc)
