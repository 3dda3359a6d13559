"""WSGI (PEP 3333) apps, served as ASGI: each request runs in a pool of --threads threads.

The event loop keeps turning while the app runs.  `wsgi.input` streams the
body: a read that needs more asks the loop for the next chunk (the
connection's reading resumes only then, so a large upload is never buffered
whole).  A response that is a list is joined in the thread and sent in one
write with its head; any other iterable is sent chunk by chunk, the thread
waiting for each send to finish (so a slow reader holds back the app, not
the worker's memory).  The iterable's close() is always called.

a2wsgi was considered and not used: its worker threads block forever once a
client disconnects mid-response, its readline() stops at an empty buffer,
and it costs three loop round trips per request (measured: 200-450 us).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import logging
import sys
import threading
from urllib.parse import unquote_to_bytes

from pyworker.asgi import ClientDisconnected

log = logging.getLogger("cydispatch.worker")

# A pool thread waiting on the event loop looks this often whether the worker
# is stopping.
THREAD_WAIT_SLICE = 0.5
# Request headers WSGI has its own keys for.
SPECIAL_HEADERS = {b"content-type": "CONTENT_TYPE", b"content-length": "CONTENT_LENGTH"}


class InputStream(io.RawIOBase):
    """wsgi.input: the request body, fetched from the event loop as the app reads."""

    def __init__(self, app: WsgiApp, loop: asyncio.AbstractEventLoop, receive, first: bytes,
                 more: bool) -> None:
        super().__init__()
        self.app = app
        self.loop = loop
        self.receive = receive
        self.buffer = bytearray(first)
        self.more = more

    def readable(self) -> bool:
        return True

    def fill(self) -> bool:
        """Fetch the next chunk into the buffer; False at the end of the body."""
        if not self.more:
            return False
        message = self.app.on_loop(self.receive())
        if message["type"] == "http.disconnect":
            self.more = False
            raise ClientDisconnected("the client went away while sending the body")
        self.buffer += message.get("body", b"")
        self.more = message.get("more_body", False)
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            while self.fill():
                pass
            size = len(self.buffer)
        while len(self.buffer) < size and self.fill():
            pass
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def readinto(self, target) -> int:
        data = self.read(len(target))
        target[:len(data)] = data
        return len(data)

    def readline(self, size: int | None = -1) -> bytes:
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                end += 1
                break
            if size is not None and 0 <= size <= len(self.buffer):
                break
            if not self.fill():
                break
        if end < 0:
            end = len(self.buffer)
        if size is not None and size >= 0:
            end = min(end, size)
        data = bytes(self.buffer[:end])
        del self.buffer[:end]
        return data

    def readlines(self, hint: int = -1) -> list[bytes]:
        lines = []
        total = 0
        while line := self.readline():
            lines.append(line)
            total += len(line)
            if 0 < hint <= total:
                break
        return lines

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line


def build_environ(scope: dict, root_path: str, body: InputStream, threads: int) -> dict:
    """The PEP 3333 environ: native strings hold bytes as latin-1.

    PATH_INFO is the target's own bytes, percent-decoded: scope["path"] is
    text, decoded as UTF-8, and bytes that are not (/%FF) would come out
    as U+FFFD.  Gunicorn and waitress keep them too.
    """
    root = root_path.encode("utf-8")
    raw_path = scope.get("raw_path")    # optional in ASGI; ours always has it
    if raw_path is None:
        target = scope["path"].encode("utf-8")
    else:
        # --root-path is prefixed as given, not percent-encoded: off first.
        if root and raw_path.startswith(root):
            raw_path = raw_path[len(root):]
            root = b""
        target = unquote_to_bytes(raw_path) if b"%" in raw_path else raw_path
    if root and target.startswith(root):
        target = target[len(root):]
    path = target.decode("latin-1")
    script_name = root_path.encode("utf-8").decode("latin-1")
    server = scope["server"] or ("localhost", 80)
    client = scope["client"]
    environ = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": script_name,
        "PATH_INFO": path,
        "QUERY_STRING": scope["query_string"].decode("latin-1"),
        "SERVER_NAME": str(server[0]),
        "SERVER_PORT": str(server[1]),
        "SERVER_PROTOCOL": "HTTP/" + scope["http_version"],
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope["scheme"],
        "wsgi.input": body,
        "wsgi.input_terminated": True,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": threads > 1,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    if client:
        environ["REMOTE_ADDR"] = client[0]
        environ["REMOTE_PORT"] = str(client[1])
    for name, value in scope["headers"]:
        key = SPECIAL_HEADERS.get(name)
        if key is None:
            if b"_" in name:
                # X_Forwarded_For would become HTTP_X_FORWARDED_FOR too:
                # a client could pass it off as the proxy's (CGI's ambiguity).
                continue
            key = "HTTP_" + name.decode("latin-1").upper().replace("-", "_")
        text = value.decode("latin-1")
        if key in environ:
            separator = "; " if key == "HTTP_COOKIE" else ","
            text = environ[key] + separator + text
        environ[key] = text
    return environ


class WsgiRequest:
    """One request's trip through the WSGI app, from a pool thread."""

    def __init__(self, app: WsgiApp, send, environ: dict) -> None:
        self.app = app
        self.send = send
        self.environ = environ
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_sent = False

    def start_response(self, status: str, headers, exc_info=None):
        if exc_info is not None:
            try:
                if self.head_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status:
            raise RuntimeError("start_response called a second time without exc_info")
        code, _, _ = status.partition(" ")
        try:
            self.status = int(code)
        except ValueError:
            raise RuntimeError(f"invalid WSGI status {status!r}") from None
        self.headers = [(name.encode("latin-1"), value.encode("latin-1"))
                        for name, value in headers]
        return self.write

    def write(self, data: bytes) -> None:
        """The legacy write() callable, and each chunk of a streamed response."""
        if not self.status:
            raise RuntimeError("the application wrote before calling start_response")
        self.app.on_loop(self.send_chunk(data, True))

    async def send_chunk(self, data: bytes, more: bool) -> None:
        if not self.head_sent:
            self.head_sent = True
            await self.send({"type": "http.response.start", "status": self.status,
                             "headers": self.headers})
        await self.send({"type": "http.response.body", "body": data, "more_body": more})

    def run(self, app) -> bytes | None:
        """Call the app; the whole body if it gave a list, else None (streamed)."""
        result = app(self.environ, self.start_response)
        try:
            if isinstance(result, (list, tuple)):
                body = b"".join(result)
                if not self.status:
                    raise RuntimeError("the application returned without calling "
                                       "start_response")
                return body
            for chunk in result:
                if chunk:
                    self.write(chunk)
            if not self.status:
                raise RuntimeError("the application returned without calling "
                                   "start_response")
            return None
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()


class WsgiApp:
    """An ASGI app that runs a WSGI app in this worker's thread pool."""

    def __init__(self, app, settings) -> None:
        self.app = app
        self.root_path = settings.root_path
        self.threads = settings.threads
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=settings.threads, thread_name_prefix="wsgi")
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping = False
        # Counted on the event loop's thread only: no lock.
        self.busy_threads = 0
        # Counted in the pool's threads: calls into the app under way, which
        # nothing can interrupt (see threads_in_app).
        self.calls_in_app = 0
        self.calls_done = threading.Condition(threading.Lock())    # not re-entered
        self.saturated = None     # called with True/False as every thread is busy or not

    def watch_load(self, saturated) -> None:
        """Tell `saturated` when every thread is busy, and when one is free again.

        Not each time a thread finishes while requests wait for one: the pool
        is still full, and what the worker takes meanwhile waits for a
        thread.  So the primary reads the whole stretch as one (a full pool
        gets no more connections, and one full for 15 ms lowers the queue
        depth), even while the pool keeps finishing requests.  Stamped
        afresh at each, a pool of 4 threads kept full by 5 ms requests got
        connections between completions and held more: p99 62 ms against
        49 (bench/RESULTS.md, "A WSGI pool").
        """
        self.saturated = saturated

    def on_loop(self, coro):
        """Run `coro` on the event loop from a pool thread, and wait for its result.

        The wait gives up once the worker stops: a loop that no longer turns
        would leave the thread waiting forever, and the process unable to exit.
        """
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        while True:
            try:
                return future.result(timeout=THREAD_WAIT_SLICE)
            except concurrent.futures.TimeoutError:
                if self.stopping:
                    future.cancel()
                    raise ClientDisconnected("the worker is stopping") from None

    def call_app(self, request: WsgiRequest) -> bytes | None:
        """In a pool thread: the app's call, counted (threads_in_app)."""
        with self.calls_done:
            self.calls_in_app += 1
        try:
            return request.run(self.app)
        finally:
            with self.calls_done:
                self.calls_in_app -= 1
                if not self.calls_in_app:
                    self.calls_done.notify_all()

    def threads_left_in_app(self, timeout: float) -> int:
        """Pool threads still inside the app after up to `timeout` s.

        Once stopped, a thread waiting on the loop gives up within
        THREAD_WAIT_SLICE (and the app's iterable is closed); one that does
        not return, Python cannot stop, and would wait for at exit.
        """
        with self.calls_done:
            self.calls_done.wait_for(lambda: not self.calls_in_app, timeout)
            return self.calls_in_app

    def stop(self) -> None:
        """The loop has stopped: threads waiting on it give up; none start."""
        self.stopping = True
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] != "http":
            raise RuntimeError(f"a WSGI application cannot serve {scope['type']!r}")
        loop = self.loop = asyncio.get_running_loop()
        # The first chunk of the body is usually all of it, and here already:
        # taking it now spares the thread a round trip through the loop.
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body = InputStream(self, loop, receive, message.get("body", b""),
                           message.get("more_body", False))
        request = WsgiRequest(self, send, build_environ(scope, self.root_path, body,
                                                        self.threads))
        self.busy_threads += 1
        if self.busy_threads == self.threads and self.saturated is not None:
            self.saturated(True)
        try:
            whole = await loop.run_in_executor(self.executor, self.call_app, request)
        finally:
            if self.busy_threads == self.threads and self.saturated is not None:
                self.saturated(False)
            self.busy_threads -= 1
        if whole is None:
            await request.send_chunk(b"", False)
        elif request.head_sent:
            # The app wrote part of its body with write(), then returned the rest.
            await request.send_chunk(whole, False)
        else:
            await send({"type": "http.response.start", "status": request.status,
                        "headers": request.headers})
            await send({"type": "http.response.body", "body": whole})

