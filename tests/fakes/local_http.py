"""The base of the fakes that answer HTTP on 127.0.0.1 (the Compute API, Secret Manager):
one free port, every request handed to ``self._handle(handler, method)``, ``start()`` /
``stop()``, ``endpoint``. ``self._release`` is set on stop, so that a request a fake holds
on purpose (a hanging API) ends with it."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LocalHttpFake:
    METHODS = ("GET", "POST", "PUT")

    def _serve(self) -> None:
        """Make the server; call once, from the fake's own __init__/__post_init__."""
        self._release = threading.Event()
        fake = self

        def answer(method):
            return lambda handler: fake._handle(handler, method)

        handler = type("Handler", (BaseHTTPRequestHandler,), {
            **{f"do_{method}": answer(method) for method in self.METHODS},
            "log_message": lambda handler, *args: None})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        # A short poll interval keeps shutdown() (and so each test's teardown) fast.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,),
                                        daemon=True)

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        raise NotImplementedError

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
