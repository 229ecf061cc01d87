"""What runs on the host, as root (``sudo -n python3``) or as the SSH user when rootless:
standard library only, for the python3 Debian 12 (3.11), Ubuntu 24.04 (3.12) and Debian 13
(3.13) ship, so no syntax newer than 3.11. Never imported there as a package: each program
travels as one text joined from these modules (``bundle.py``), whose hash is its version.

Two programs:
  helper   one process per task over the SSH channel's stdin/stdout (``session.py``:
           protocol, lock, audit; ``server.py``: the table of ops and the main loop)
  watcher  the alert watcher, one pass per run of the nightguard-watch timer
           (``watch_rules.py``, ``watch_send.py``, ``watch_main.py``)

Layers, each importing only those before it (the bundle's order; ``tasks/contract.py``
first, shared with the laptop):
  base · statedir                     small helpers; the host's paths, lock and audit files
  host_facts · podman_store · verdict readers of the host and of Podman's files; the one
                                      verdict of "healthy"
  aptlock · nofollow · session        apt's locks; the app dir without following links;
                                      the request session
  watch_send · watch_rules · watch_main   the watcher
  ops_*                               the helper's ops, one module per family
  server                              OPS (contract.OP_NAMES), handle, main

A new op: a function ``op_NAME(s, req)`` in its family's module, its name in
``contract.OP_NAMES`` (and ``READ_ONLY_OPS`` if a read-only session may run it), its entry
in ``server.OPS``. A new fact: read it in ``ops_facts.op_facts`` and declare it in
``contract.Facts``.

This file is not part of a bundle.
"""
