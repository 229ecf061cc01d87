"""The one verdict of "healthy": the host's, from the container's state and the unit's.
`inv health` (the ``health`` op returns it) and the alert watcher both use it, so they
cannot disagree."""


def agent_status(container, unit):
    """(status, detail): healthy, unhealthy (a health check failing: Podman's failing
    streak, which checks in the start period do not raise), starting (no passed check
    yet, or systemd (re)starting it), down (the unit stopped or failed)."""
    active = unit.get("ActiveState") or ""
    if not container or not container.get("running"):
        if active in ("inactive", "failed"):
            result = unit.get("Result") or "?"
            return "down", f"the unit is {active} (result {result}), no container runs"
        return "starting", f"no container runs; the unit is {active or 'unknown'}"
    streak = int(container.get("failing_streak") or 0)
    if container.get("health") == "unhealthy" or streak > 0:
        log = container.get("health_log") or []
        output = (log[-1].get("output") or "").strip() if log else ""
        return "unhealthy", (f"{streak} failed check(s) in a row"
                             + (f": {output[-200:]}" if output else ""))
    if container.get("health") == "healthy":
        return "healthy", ""
    return "starting", "its health check has not passed yet"


def problem_line(container, status):
    """The verdict as `inv health` words it (None when healthy)."""
    if status == "healthy":
        return None
    if not container:
        return "container does not exist"
    if not container.get("running"):
        return f"container is {container.get('status')}"
    health = container.get("health")
    if status == "unhealthy" and health != "unhealthy":  # a check failing, not yet the last
        return (f"health is {health or 'unknown'}, "
                f"{int(container.get('failing_streak') or 0)} failed check(s) in a row")
    return f"health is {health or 'unknown'}"


def verdict(container, unit):
    """The verdict as the ``health`` op answers it (``tasks.contract.Verdict``)."""
    status, detail = agent_status(container, unit)
    return {"status": status, "detail": detail, "problem": problem_line(container, status)}
