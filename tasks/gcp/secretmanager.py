"""Google Secret Manager: read a secret version's value, and put a value in as a new
version (``inv secrets.to-gcp``), through Google's own client (REST transport).

Credentials are the ones ``vm.*`` uses (``nightguard.gcp.credentials_file`` or Application
Default Credentials), with the cloud-platform scope Secret Manager needs; none against an
``http://`` fake (``nightguard.gcp.secrets_endpoint``). A value is returned to the caller
and never printed; every failure is ``GcpError``, one line naming the secret and what to
do, with no retry loop hiding a dead store.

Config keys: ``nightguard.gcp.secrets_endpoint``, ``nightguard.gcp.credentials_file``.
"""

from __future__ import annotations

import re

import requests
from google.api_core import exceptions as api_exceptions
from google.api_core.client_options import ClientOptions
from google.auth.exceptions import DefaultCredentialsError, RefreshError

from ..config import Settings
from .api import GcpError, credentials

SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]
DEFAULT_HOST = "secretmanager.googleapis.com"


def client(settings: Settings):
    """A Secret Manager client for these settings (imported on first use: it is large)."""
    from google.cloud import secretmanager_v1

    endpoint = settings["gcp.secrets_endpoint"]
    account = credentials(settings, SCOPES, "gcp.secrets_endpoint")
    options = ClientOptions(api_endpoint=endpoint) if endpoint else None
    return secretmanager_v1.SecretManagerServiceClient(credentials=account, transport="rest",
                                                       client_options=options)


def _short(exc: Exception) -> str:
    message = getattr(exc, "message", "") or str(exc)
    message = (message.strip().splitlines() or ["no detail"])[0]
    return re.sub(r"^[A-Z]+ \S+: ", "", message)[:200]  # the client's "GET <url>: "


def explain(settings: Settings, what: str, ref: str, exc: Exception) -> str:
    """One line for a failed call about ``ref`` (``what``: e.g. "secret gemini_api_key")."""
    where = settings["gcp.secrets_endpoint"] or DEFAULT_HOST
    secret = ref.split("/versions/")[0]
    if isinstance(exc, api_exceptions.NotFound):
        return (f"{what}: {ref} not found in Google Secret Manager (create it: `gcloud "
                f"secrets create {secret.rsplit('/', 1)[-1]} --data-file=-`, or fix "
                "nightguard.secrets)")
    # REST answers map by HTTP status (Forbidden, BadRequest...), gRPC ones by code
    if isinstance(exc, (api_exceptions.PermissionDenied, api_exceptions.Forbidden)):
        return (f"{what}: permission denied reading {ref} - grant your account "
                f"roles/secretmanager.secretAccessor on {secret} (and check the Secret "
                "Manager API is enabled)")
    if isinstance(exc, api_exceptions.FailedPrecondition) or (
            isinstance(exc, api_exceptions.BadRequest) and
            re.search(r"DISABLED|DESTROYED", _short(exc))):
        return f"{what}: {ref} is disabled or destroyed ({_short(exc)})"
    if isinstance(exc, (api_exceptions.Unauthenticated, api_exceptions.Unauthorized,
                        RefreshError, DefaultCredentialsError)):
        return (f"{what}: credentials rejected by Google Secret Manager ({_short(exc)}): run "
                "`gcloud auth application-default login` or set nightguard.gcp.credentials_file")
    if isinstance(exc, (requests.exceptions.Timeout, api_exceptions.DeadlineExceeded)):
        return f"{what}: no answer from Google Secret Manager at {where} in time - retry"
    if isinstance(exc, requests.exceptions.ConnectionError):
        return (f"{what}: cannot reach Google Secret Manager at {where}: check the network "
                "or nightguard.gcp.secrets_endpoint")
    code = getattr(exc, "code", None)
    return f"{what}: Google Secret Manager error{f' {code}' if code else ''}: {_short(exc)}"


ERRORS = (api_exceptions.GoogleAPICallError, requests.exceptions.RequestException,
          RefreshError, DefaultCredentialsError)


def access(settings: Settings, refs: dict[str, tuple[str, float]]) -> dict[str, str]:
    """name -> value for ``refs`` (name -> (version's full name, timeout in seconds)).
    A value that is not UTF-8, empty, or several lines is refused like a .env value."""
    sm = client(settings)
    values: dict[str, str] = {}
    for name, (ref, timeout) in refs.items():
        what = f"secret {name}"
        try:
            answer = sm.access_secret_version(name=ref, timeout=timeout, retry=None)
        except ERRORS as exc:
            raise GcpError("read secrets", explain(settings, what, ref, exc)) from None
        try:
            value = answer.payload.data.decode("utf-8")
        except UnicodeDecodeError:
            raise GcpError("read secrets", f"{what}: {ref} is not UTF-8 text") from None
        values[name] = value.removesuffix("\n")
    return values


def put(settings: Settings, project: str, secret_id: str, value: str,
        timeout: float = 30.0) -> str:
    """Store ``value`` as the newest version of ``projects/PROJECT/secrets/SECRET_ID``
    (created with automatic replication when missing); the version's full name."""
    from google.cloud import secretmanager_v1

    sm = client(settings)
    parent = f"projects/{project}"
    name = f"{parent}/secrets/{secret_id}"
    what = f"secret {secret_id}"
    try:
        try:
            sm.get_secret(name=name, timeout=timeout, retry=None)
        except api_exceptions.NotFound:
            secret = secretmanager_v1.Secret(replication=secretmanager_v1.Replication(
                automatic=secretmanager_v1.Replication.Automatic()))
            sm.create_secret(parent=parent, secret_id=secret_id, secret=secret,
                             timeout=timeout, retry=None)
        version = sm.add_secret_version(parent=name, payload=secretmanager_v1.SecretPayload(
            data=value.encode("utf-8")), timeout=timeout, retry=None)
    except ERRORS as exc:
        raise GcpError("store secret", explain(settings, what, name, exc)) from None
    return version.name
