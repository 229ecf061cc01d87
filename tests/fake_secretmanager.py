"""A local fake of Google Secret Manager's REST API (v1), for the real Python client.

Serves what the project calls: access a version (``latest`` or a number), get and create a
secret, add a version. Knobs: ``deny`` (secret ids answered 403), ``disabled`` (versions
answered 400 FAILED_PRECONDITION), ``hang`` (accepts and never answers). It records each
request's method and path, never a payload (``fake.requests``); ``accessed`` counts reads.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlparse

from tests.fakes.local_http import LocalHttpFake

_VERSION = re.compile(r"/v1/projects/([^/]+)/secrets/([^/]+)/versions/([^/:]+):access")
_SECRET = re.compile(r"/v1/projects/([^/]+)/secrets/([^/:]+)")
_ADD = re.compile(r"/v1/projects/([^/]+)/secrets/([^/:]+):addVersion")
_CREATE = re.compile(r"/v1/projects/([^/]+)/secrets")


def _error(code: int, status: str, message: str) -> tuple[int, dict]:
    return code, {"error": {"code": code, "message": message, "status": status}}


@dataclass
class FakeSecretManager(LocalHttpFake):
    # (project, secret id) -> the versions' values, oldest first
    secrets: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    deny: set[str] = field(default_factory=set)
    disabled: set[tuple[str, str, int]] = field(default_factory=set)
    hang: bool = False
    requests: list[tuple[str, str]] = field(default_factory=list)
    accessed: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._serve()

    def add(self, project: str, secret: str, value: str) -> int:
        """A new version of the secret (created if missing); its number."""
        with self._lock:
            versions = self.secrets.setdefault((project, secret), [])
            versions.append(value)
            return len(versions)

    # -- serving ----------------------------------------------------------------------
    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        url = urlparse(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        with self._lock:
            self.requests.append((method, url.path))
        if self.hang:
            self._release.wait(120)
            return
        body = json.loads(raw) if raw else {}
        with self._lock:
            status, payload = self._route(method, url.path, parse_qs(url.query), body)
        data = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _route(self, method: str, path: str, query: dict, body: dict) -> tuple[int, dict]:
        if method == "GET" and (match := _VERSION.fullmatch(path)):
            return self._access(*match.groups())
        if method == "POST" and (match := _ADD.fullmatch(path)):
            project, secret = match.groups()
            if (project, secret) not in self.secrets:
                return _error(404, "NOT_FOUND", f"Secret [projects/{project}/secrets/"
                                                f"{secret}] not found.")
            value = base64.b64decode(body["payload"]["data"]).decode()
            self.secrets[(project, secret)].append(value)
            number = len(self.secrets[(project, secret)])
            return 200, {"name": f"projects/{project}/secrets/{secret}/versions/{number}",
                         "state": "ENABLED"}
        if method == "GET" and (match := _SECRET.fullmatch(path)):
            project, secret = match.groups()
            if (project, secret) not in self.secrets:
                return _error(404, "NOT_FOUND", f"Secret [projects/{project}/secrets/"
                                                f"{secret}] not found.")
            return 200, {"name": f"projects/{project}/secrets/{secret}"}
        if method == "POST" and (match := _CREATE.fullmatch(path)):
            project = match.group(1)
            secret = (query.get("secretId") or [""])[0]
            if (project, secret) in self.secrets:
                return _error(409, "ALREADY_EXISTS", "Secret already exists.")
            self.secrets[(project, secret)] = []
            return 200, {"name": f"projects/{project}/secrets/{secret}", **body}
        return _error(404, "NOT_FOUND", f"no route for {method} {path}")

    def _access(self, project: str, secret: str, version: str) -> tuple[int, dict]:
        if secret in self.deny:
            return _error(403, "PERMISSION_DENIED", "Permission 'secretmanager.versions."
                                                    "access' denied for resource (or it may "
                                                    "not exist).")
        versions = self.secrets.get((project, secret))
        if not versions:
            return _error(404, "NOT_FOUND", f"Secret [projects/{project}/secrets/{secret}] "
                                            "not found or has no versions.")
        number = len(versions) if version == "latest" else int(version)
        if not 1 <= number <= len(versions):
            return _error(404, "NOT_FOUND", f"Secret Version [projects/{project}/secrets/"
                                            f"{secret}/versions/{version}] not found.")
        if (project, secret, number) in self.disabled:
            return _error(400, "FAILED_PRECONDITION", f"Secret Version [projects/{project}/"
                                                      f"secrets/{secret}/versions/{number}] "
                                                      "is in DISABLED state.")
        self.accessed += 1
        data = base64.b64encode(versions[number - 1].encode()).decode()
        return 200, {"name": f"projects/{project}/secrets/{secret}/versions/{number}",
                     "payload": {"data": data}}
