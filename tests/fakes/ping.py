"""A fake dead-man-switch endpoint (healthchecks.io's convention) for tests.

Standard library only, a ThreadingHTTPServer in a background thread, like
``tests.fakes.telegram_api``: bind 0.0.0.0 and give a QEMU guest ``url_for(address)``.

    ping = FakePing().start()                    # 127.0.0.1, a free port
    ping.url                                     # "http://127.0.0.1:PORT/ping/<uuid>"
    ping.wait_for(lambda: ping.kinds(), timeout=5)
    ping.kinds()                                 # ["ok", "ok", "fail", ...] in arrival order
    ping.stop()

GET <path> is a success signal, GET <path>/fail a failure; anything else answers 404 and
is recorded as "unknown". ``status`` (default 200) is what every known ping answers.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Ping:
    kind: str  # "ok", "fail" or "unknown"
    method: str
    path: str
    time: float  # time.monotonic()
    peer: tuple[str, int]


class FakePing:
    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.path = f"/ping/{uuid.uuid4()}"
        self.status = 200
        self.pings: list[Ping] = []
        self._cond = threading.Condition()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                fake._handle(self)

            do_POST = do_HEAD = do_GET

            def log_message(self, format, *args):
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        name="fake-ping", daemon=True)

    def start(self) -> FakePing:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakePing:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def url_for(self, host: str) -> str:
        return f"http://{host}:{self.port}{self.path}"

    @property
    def url(self) -> str:
        return self.url_for("127.0.0.1")

    def kinds(self) -> list[str]:
        with self._cond:
            return [p.kind for p in self.pings]

    def wait_for(self, predicate, timeout: float = 5.0):
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate()
                remaining = deadline - time.monotonic()
                if value or remaining <= 0:
                    return value
                self._cond.wait(min(0.05, remaining))

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        path = handler.path.split("?", 1)[0]
        kind = {self.path: "ok", self.path + "/fail": "fail"}.get(path, "unknown")
        status = self.status if kind != "unknown" else 404
        body = b"OK" if status == 200 else b"not found"
        handler.send_response(status)
        handler.send_header("Content-Type", "text/plain")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(body)
        with self._cond:
            self.pings.append(Ping(kind, handler.command, path, time.monotonic(),
                                   tuple(handler.client_address[:2])))
            self._cond.notify_all()
