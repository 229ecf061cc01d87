"""The base image: pulled or imported, its id before and after."""

from .base import OpError, run_streaming
from .podman_store import image_info


def op_base(s, req):
    """Pull (or import) the base image; answer its id before and after, so the client
    tags and builds from the base it has really got (`inv deploy --refresh`)."""
    name = req["name"]
    before = image_info(s.paths, name)
    code, tail, killed = run_streaming(s, req["id"], req["argv"], req.get("timeout", 1800),
                                       on_interrupt="kill")
    if code != 0:
        raise OpError(f"`{' '.join(req['argv'][:2])} {name}` {killed or f'exited {code}'}",
                      tail[-15:])
    after = image_info(s.paths, name)
    if after is None:
        raise OpError(f"{name} is not in Podman's storage after `{' '.join(req['argv'][:2])}`")
    return {"before": before, "after": after,
            "changed": (before or {}).get("id") != after.get("id")}
