"""A loopback HTTP/1.1 proxy in front of the S3 test server: adds a fixed delay to every request and
logs every request the server receives.

Object storage answers in tens of milliseconds; the test server on 127.0.0.1 in microseconds. The
proxy holds each request ``delay_s`` before passing it on, so a reader that waits for one request at a
time slows down by the delay per request, and one with enough requests in flight does not. It sits on
the server's side of the connection and parses the HTTP messages themselves (request line, headers,
``Content-Length`` or chunked bodies, both ways), so the counts are the requests the server got and the
body bytes it sent, not what the client believes it asked for.

Loopback only (it binds 127.0.0.1 and connects to 127.0.0.1), one asyncio loop on a daemon thread;
``stop()`` closes it.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

__all__ = ["LatencyProxy", "Request"]


@dataclass
class Request:
    """One HTTP request the server received through the proxy, and the body bytes of its response."""

    method: str
    path: str
    range: str | None
    status: int = 0
    body_bytes: int = 0


@dataclass
class LatencyProxy:
    upstream_port: int
    delay_s: float = 0.05
    port: int = 0
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="latency-proxy")
        self._server: asyncio.AbstractServer | None = None
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LatencyProxy:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(asyncio.start_server(self._client, "127.0.0.1", self.port), self._loop)
        self._server = fut.result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def reset(self) -> list[Request]:
        """The requests logged so far; the log starts again empty."""
        with self._lock:
            done, self.requests = self.requests, []
        return done

    # ------------------------------------------------------------------------------------------ relay

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        pending: asyncio.Queue[Request] = asyncio.Queue()
        back = asyncio.ensure_future(self._responses(up_reader, writer, pending))
        try:
            while True:
                head = await _read_head(reader)
                if head is None:
                    break
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = (lines[0].split(" ", 2) + ["", ""])[:3]
                headers = _headers(lines[1:])
                request = Request(method, path, headers.get("range"))
                with self._lock:
                    self.requests.append(request)
                await asyncio.sleep(self.delay_s)  # the latency of object storage
                await pending.put(request)
                up_writer.write(head)
                await _relay_body(reader, up_writer, headers, has_body=True)
                await up_writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:  # stop(): end quietly
            back.cancel()
            return
        finally:
            up_writer.close()
        try:
            await asyncio.wait_for(back, 30)
        except (asyncio.TimeoutError, asyncio.CancelledError, ConnectionError):
            back.cancel()
        writer.close()

    async def _responses(
        self, up_reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pending: asyncio.Queue[Request]
    ) -> None:
        try:
            while True:
                head = await _read_head(up_reader)
                if head is None:
                    return
                request = await pending.get()
                lines = head.decode("latin-1").split("\r\n")
                request.status = int(lines[0].split(" ")[1])
                headers = _headers(lines[1:])
                writer.write(head)
                has_body = request.method != "HEAD" and request.status not in (204, 304)
                request.body_bytes = await _relay_body(up_reader, writer, headers, has_body)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    """The start line and headers of the next message, or None at a clean end of the connection."""
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise
        return None


def _headers(lines: list[str]) -> dict[str, str]:
    out = {}
    for line in lines:
        if ":" in line:
            name, value = line.split(":", 1)
            out[name.strip().lower()] = value.strip()
    return out


async def _relay_body(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, headers: dict[str, str], has_body: bool
) -> int:
    """Copy one message body (``Content-Length`` or chunked) and return its length in bytes."""
    if not has_body:
        return 0
    if "chunked" in headers.get("transfer-encoding", "").lower():
        total = 0
        while True:
            size_line = await reader.readuntil(b"\r\n")
            writer.write(size_line)
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            data = await reader.readexactly(size + 2)  # the chunk and its CRLF
            writer.write(data)
            total += size
            if size == 0:
                return total
    remaining = int(headers.get("content-length", "0") or 0)
    total = remaining
    while remaining:
        data = await reader.read(min(remaining, 1 << 20))
        if not data:
            raise asyncio.IncompleteReadError(b"", remaining)
        writer.write(data)
        remaining -= len(data)
    return total
