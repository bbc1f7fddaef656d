"""A small HTTP server for ``/metrics`` whose threads and sockets are bounded.

prometheus-client's own server starts a thread per connection, so a few hundred clients
that connect and never finish a request hold a few hundred threads in the engine's process.
Here one selector thread accepts connections and reads requests without blocking; only a
complete request goes to one of ``num_workers`` threads, which renders and sends the reply.

Operations:
- ``BoundedHttpServer(addr, port, render, ...)``: listen at once (``OSError`` when the port is
  taken); ``render()`` returns ``(body, content type)`` for ``GET /metrics`` (and ``/``).
- ``port``: the port bound (useful with 0). ``close()``: stop, close every socket; idempotent.

Contracts: at most ``max_connections`` connections are open or being answered; when one more
arrives, the oldest still sending its request is dropped. A request not complete within
``request_timeout_s`` or larger than ``MAX_REQUEST_BYTES`` is dropped. Sending a reply gives
up after ``request_timeout_s`` too, so a client that stops reading frees its worker.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

__all__ = ["BoundedHttpServer", "MAX_REQUEST_BYTES"]

MAX_REQUEST_BYTES = 16 << 10
_TICK_S = 0.2  # how often the selector thread looks at deadlines and the stop flag


@dataclass
class _Pending:
    sock: socket.socket
    deadline: float
    data: bytearray = field(default_factory=bytearray)


class BoundedHttpServer:
    def __init__(
        self,
        addr: str,
        port: int,
        render: Callable[[], tuple[bytes, str]],
        *,
        num_workers: int = 2,
        max_connections: int = 64,
        request_timeout_s: float = 5.0,
    ) -> None:
        self._render = render
        self._max_connections = max_connections
        self._timeout_s = request_timeout_s
        self._listener = socket.create_server(
            (addr, port), family=_family(addr), backlog=128, reuse_port=False
        )
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._pending: dict[int, _Pending] = {}
        self._num_answering = 0
        self._count_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(num_workers, thread_name_prefix="kvbm-metrics")
        self._is_stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kvbm-metrics-accept", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._is_stopping.is_set():
            return
        self._is_stopping.set()
        self._thread.join(timeout=5)
        self._pool.shutdown(wait=True, cancel_futures=True)

    # ---- selector thread ----------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._is_stopping.is_set():
                for key, _ in self._selector.select(_TICK_S):
                    if key.fileobj is self._listener:
                        self._accept()
                    else:
                        self._read(self._pending[key.fd])
                self._expire(time.monotonic())
        finally:
            for pending in list(self._pending.values()):
                self._drop(pending)
            self._selector.close()
            self._listener.close()

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # e.g. EMFILE: the client is refused, the server lives on
            return
        with self._count_lock:
            num_open = len(self._pending) + self._num_answering
        if num_open >= self._max_connections and self._pending:
            self._drop(min(self._pending.values(), key=lambda p: p.deadline))
        elif num_open >= self._max_connections:
            sock.close()  # every slot is answering a complete request
            return
        sock.setblocking(False)
        pending = _Pending(sock, time.monotonic() + self._timeout_s)
        self._pending[sock.fileno()] = pending
        self._selector.register(sock, selectors.EVENT_READ)

    def _read(self, pending: _Pending) -> None:
        try:
            chunk = pending.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        pending.data += chunk
        if not chunk or len(pending.data) > MAX_REQUEST_BYTES:
            self._drop(pending)
        elif b"\r\n\r\n" in pending.data or b"\n\n" in pending.data:
            self._selector.unregister(pending.sock)
            del self._pending[pending.sock.fileno()]
            with self._count_lock:
                self._num_answering += 1
            self._pool.submit(self._answer, pending.sock, bytes(pending.data))

    def _expire(self, now: float) -> None:
        for pending in [p for p in self._pending.values() if p.deadline < now]:
            self._drop(pending)

    def _drop(self, pending: _Pending) -> None:
        self._pending.pop(pending.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):  # already handed to a worker
            self._selector.unregister(pending.sock)
        pending.sock.close()

    # ---- worker threads -----------------------------------------------------------------

    def _answer(self, sock: socket.socket, request: bytes) -> None:
        try:
            sock.setblocking(True)
            sock.settimeout(self._timeout_s)
            sock.sendall(self._reply(request))
        except OSError:
            pass  # the client went away or stopped reading: nothing to tell it
        finally:
            sock.close()
            with self._count_lock:
                self._num_answering -= 1

    def _reply(self, request: bytes) -> bytes:
        method, _, rest = request.partition(b" ")
        path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
        if method != b"GET":
            return _response(405, b"only GET\n", "text/plain")
        if path not in (b"/metrics", b"/"):
            return _response(404, b"see /metrics\n", "text/plain")
        try:
            body, content_type = self._render()
        except Exception as exc:  # noqa: BLE001 - a scrape error must not kill the worker
            return _response(500, f"kvbm metrics: {type(exc).__name__}: {exc}\n".encode(), "text/plain")
        return _response(200, body, content_type)


def _family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error"}


def _response(status: int, body: bytes, content_type: str) -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body
