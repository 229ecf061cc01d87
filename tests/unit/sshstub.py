"""SSH server stand-ins for the unit tier: one offers a host key and refuses every login,
enough for a client to read the key (pinning) and to be turned away (a login to retry);
one hangs up on every connection before the greeting (a host whose network went away)."""

from __future__ import annotations

import socket
import threading
from contextlib import contextmanager

import paramiko


class RefuseLogins(paramiko.ServerInterface):
    def get_allowed_auths(self, username):
        return "publickey"


@contextmanager
def _listening(on_accept, address: str, port: int = 0):
    """A listener whose thread hands each accepted connection to ``on_accept``; yields its
    port, and on exit shuts it down (a close alone leaves accept() blocked, the port held)."""
    listener = socket.create_server((address, port))

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            on_accept(conn)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()


@contextmanager
def ssh_server(host_key: paramiko.PKey, address: str = "127.0.0.1", port: int = 0):
    """An SSH server at address:port offering ``host_key`` and refusing every login."""
    transports = []

    def refuse(conn):
        transport = paramiko.Transport(conn)
        transport.add_server_key(host_key)
        transports.append(transport)
        try:
            transport.start_server(server=RefuseLogins())
        except (paramiko.SSHException, EOFError, OSError):
            pass  # the client read the key and hung up

    try:
        with _listening(refuse, address, port) as bound:
            yield bound
    finally:
        for transport in transports:
            transport.close()


@contextmanager
def hanging_up(address: str = "127.0.0.1"):
    """A port that takes each connection and hangs up at once; yields (port, a list that
    grows by one per connection taken)."""
    taken = []

    def hang_up(conn):
        taken.append(1)
        conn.close()

    with _listening(hang_up, address) as port:
        yield port, taken
