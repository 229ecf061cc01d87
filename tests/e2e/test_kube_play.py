"""`inv kube.export` played by Podman on both sandboxes (Debian 12 / Podman 4.3, Debian 13 /
Podman 5.4), and back to the systemd-managed service afterwards.

Per sandbox, once (module-scoped): `inv deploy` (its image is the export's base), `inv
kube.export`, the deployed image tagged as the Containerfile's FROM names it (the export has
no host: its tag cannot hold the id of the host's base image, as the deploy's does), the
code layer built on the VM from the exported Containerfile, the unit
stopped (two pollers on one token get 409), the Podman secret the pod's Secret volume names
created from stdin, `podman kube play`. Then, in order: healthy with the limits in the
cgroup; secret files that only the agent reads; the security context in force; a frozen
agent restarted by the liveness probe; `podman kube down` and `inv deploy` back to the unit
with nothing left over.

What Podman 4.3 cannot do, and how the test copes:
  * read a Kubernetes Secret document: it ignores stringData and does not base64-decode
    data (4.4 does both), so on 4.3 the plain values go under data;
  * restart a container whose liveness probe fails, when the check runs from its systemd
    timer (containers/podman#17777, fixed in 4.5): an xfail on Podman < 4.5 if it stays
    down.
No value reaches a file: the secret document travels over the SSH channel's stdin.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import yaml

from tasks.deploy.commands import unit_name
from tests.e2e.deploy_helpers import (
    CONTAINER,
    GEMINI,
    ROOT,
    TOKEN,
    healthy_now,
    inv,
    inv_env,
    make_env_file,
    past_journal_race,
    probe_argv,
    wait_until,
)

REMOTE = "/tmp/ng-kube-export"
VALUES = {"telegram_bot_token": TOKEN, "gemini_api_key": GEMINI}
MiB = 1024 * 1024
UNIT = unit_name(CONTAINER)


def ssh(target, cmd: str, data: bytes | None = None, timeout: int = 600):
    """A command on the sandbox, with ``data`` on its stdin (never in argv or a file)."""
    stdin = data if data is not None else b""
    return subprocess.run(probe_argv(target, cmd), input=stdin, capture_output=True,
                          timeout=timeout)


def out(done) -> str:
    return (done.stdout + done.stderr).decode(errors="replace")


def podman_version(target) -> tuple[int, int]:
    text = ssh(target, "sudo -n podman version --format '{{.Client.Version}}'").stdout.decode()
    major, minor = text.strip().split(".")[:2]
    return int(major), int(minor)


def secret_document(name: str, version: tuple[int, int]) -> bytes:
    """The Kubernetes Secret the pod reads, as Podman's secret store must hold it."""
    if version >= (4, 4):
        body = {"stringData": VALUES}
    else:  # 4.3 reads data as plain strings and ignores stringData
        body = {"data": VALUES}
    return json.dumps({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
                       "type": "Opaque", **body}).encode()


def ship(target, directory: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(directory, arcname=".")
    done = ssh(target, f"rm -rf {REMOTE} && mkdir -p {REMOTE} && tar -xzf - -C {REMOTE}",
               data=buffer.getvalue())
    assert done.returncode == 0, out(done)


LISTS = {"volume": "volume ls --format '{{.Name}}'", "secret": "secret ls --format '{{.Name}}'",
         "container": "ps -a --format '{{.Names}}'"}


def listed(target, what: str) -> set[str]:
    """The names of the host's volumes, secrets or containers."""
    done = ssh(target, f"sudo -n podman {LISTS[what]}")
    assert done.returncode == 0, out(done)
    return set(done.stdout.decode().split())


def inspect_pod_container(target, name: str) -> dict | None:
    done = ssh(target, f"sudo -n podman container inspect {name}")
    return json.loads(done.stdout)[0] if done.returncode == 0 else None


def in_pod(target, info: dict, cmd: str):
    return ssh(target, f"sudo -n podman exec {info['container']} sh -c '{cmd}'")


def cleanup(target, info: dict) -> None:
    """What NOTES.md tells a user to run after a rehearsal; safe to repeat."""
    ssh(target, f"sudo -n podman kube down {REMOTE}/nightguard.yaml; "
                f"sudo -n podman volume rm --force {info['secret']} {info['claim']}; "
                f"sudo -n podman secret rm {info['secret']}; "
                f"sudo -n podman rmi --ignore {info['image']}; rm -rf {REMOTE}")
    if info.get("from_tag"):  # only a second name of the deployed image: rmi untags it
        ssh(target, f"sudo -n podman rmi --ignore {info['from_tag']}")


# Podman 5.4 (Debian 13) only: 4.3 does not decode a Kubernetes Secret's data (4.4), ignores
# defaultMode (4.8), has no `kube down --force` (4.4) and may leave a hung container stopped
# instead of restarting it on a failing probe (4.5): NOTES.md says so. A CI run has the
# time for one engine; 4.9+ is the version a rehearsal on the VM needs.
@pytest.fixture(scope="module", params=["trixie"])
def vm(request):
    return request.getfixturevalue(f"sandbox_{request.param}")


@pytest.fixture(scope="module")
def played(vm, tmp_path_factory):
    work = tmp_path_factory.mktemp(f"kube-{vm['name']}")
    # a quick probe (the export carries the settings): a frozen agent is seen in ~30 s;
    # the compose file must agree with the settings, so a copy says the same
    compose = (ROOT / "deployment/podman-compose.nightguard.yml").read_text()
    compose = re.sub(r"interval: \S+", "interval: 5s", compose)
    compose = re.sub(r"retries: \S+", "retries: 2", compose).replace("start_period: 60s",
                                                                      "start_period: 10s")
    assert compose.count("interval: 5s") == 1 and "start_period: 10s" in compose
    (work / "compose.yml").write_text(compose)
    env = inv_env(vm, make_env_file(work), ROOT, NIGHTGUARD_HEALTH_INTERVAL="5s",
                  NIGHTGUARD_HEALTH_RETRIES="2", NIGHTGUARD_HEALTH_START_PERIOD="10s",
                  NIGHTGUARD_HEALTH_HEARTBEAT_MAX_AGE="15",
                  NIGHTGUARD_COMPOSE_FILE=str(work / "compose.yml"))
    done = inv(["deploy"], env)
    assert done.returncode == 0, done.stdout + done.stderr
    export = work / "export"
    done = inv(["kube.export", "--out", str(export), "--image", "localhost/nightguard-kube"],
               env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert TOKEN not in done.stdout + done.stderr and GEMINI not in done.stdout + done.stderr
    for path in export.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert TOKEN.encode() not in data and GEMINI.encode() not in data, path
    claim, deployment = yaml.safe_load_all((export / "nightguard.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    info = {
        "image": pod["containers"][0]["image"],
        "secret": pod["volumes"][0]["secret"]["secretName"],
        "claim": claim["metadata"]["name"],
        "deployment": deployment["metadata"]["name"],
        "container_name": pod["containers"][0]["name"],
        "podman": podman_version(vm),
        "before": {what: listed(vm, what) for what in ("volume", "secret", "container")},
        "env": env,
    }
    ship(vm, export)
    deployed = ssh(vm, f"sudo -n podman container inspect --format '{{{{.ImageName}}}}' "
                       f"{CONTAINER}")
    assert deployed.returncode == 0, out(deployed)
    (base,) = [line.split()[1] for line in (export / "Containerfile").read_text().splitlines()
               if line.startswith("FROM ")]
    try:
        if base != deployed.stdout.decode().strip():
            done = ssh(vm, f"sudo -n podman tag {deployed.stdout.decode().strip()} {base}")
            assert done.returncode == 0, out(done)
            info["from_tag"] = base
        done = ssh(vm, f"sudo -n podman build --format docker --pull=never --file "
                       f"{REMOTE}/Containerfile --tag {info['image']} {REMOTE}", timeout=900)
        assert done.returncode == 0, out(done)
        done = ssh(vm, f"sudo -n systemctl stop {UNIT}")
        assert done.returncode == 0, out(done)
        done = ssh(vm, f"sudo -n podman secret create {info['secret']} -",
                   data=secret_document(info["secret"], info["podman"]))
        assert done.returncode == 0, out(done)
        done = ssh(vm, f"sudo -n podman kube play {REMOTE}/nightguard.yaml", timeout=900)
        assert done.returncode == 0, out(done)
        # the Deployment's pod: <name>-pod on Podman 5, <name>-pod-0 (a replica index) on 4.3
        (info["pod"],) = [name for name in ssh(vm, "sudo -n podman pod ps --format "
                                                   "'{{.Name}}'").stdout.decode().split()
                          if name.startswith(f"{info['deployment']}-pod")]
        info["container"] = f"{info['pod']}-{info['container_name']}"
        assert inspect_pod_container(vm, info["container"]), info
        yield info
    finally:
        if not info.get("cleaned"):
            cleanup(vm, info)
            ssh(vm, f"sudo -n systemctl start {UNIT}")


def test_pod_comes_up_healthy_with_the_limits_in_the_cgroup(vm, played):
    healthy = wait_until(lambda: ssh(vm, f"sudo -n podman healthcheck run "
                                         f"{played['container']}").returncode == 0,
                         timeout=300, interval=5)
    assert healthy, out(ssh(vm, f"sudo -n podman logs --tail 20 {played['container']}"))
    host = inspect_pod_container(vm, played["container"])["HostConfig"]
    assert host["Memory"] == 700 * MiB
    assert host["MemoryReservation"] == 500 * MiB
    cgroup = in_pod(vm, played, "cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/memory.low "
                                "/sys/fs/cgroup/cpu.max /sys/fs/cgroup/memory.swap.max")
    assert cgroup.returncode == 0, out(cgroup)
    memory, low, quota, period, swap = cgroup.stdout.decode().split()
    assert (memory, low) == (str(700 * MiB), str(500 * MiB))
    assert int(quota) == int(period)  # one CPU
    # kube play has no swap field and sets no swap limit (NOTES.md says so)
    assert swap == "max", swap


def test_secret_files_are_readable_by_the_agent_alone(vm, played):
    for name, value in VALUES.items():
        path = f"/run/secrets/{name}"
        done = in_pod(vm, played, f"id -u; stat -c \"%a %u\" {path}; test -r {path} && "
                                  f"echo readable; test -w {path} || echo read-only; "
                                  f"sha256sum {path}")
        assert done.returncode == 0, out(done)
        uid, mode, owner, readable, read_only, digest, _ = done.stdout.decode().split()
        assert uid == "1000" and owner == "0"
        # 5.x applies defaultMode 0444; 4.3 ignores it (0644 under Podman's umask)
        assert mode == ("444" if played["podman"] >= (4, 8) else "644"), mode
        assert (readable, read_only) == ("readable", "read-only")
        assert digest == hashlib.sha256(value.encode()).hexdigest()
    # the pod runs one process, the agent, as uid 1000; nobody else is in the container
    procs = in_pod(vm, played, "for p in /proc/[0-9]*; do stat -c %u $p; done")
    assert set(procs.stdout.decode().split()) == {"1000"}, out(procs)
    # Podman's copy of the items lies in a root-only directory on the host
    assert ssh(vm, "sudo -n stat -c %a /var/lib/containers/storage/volumes").stdout \
        .decode().strip() == "700"
    # both probes must answer: a failed one would hide nothing and "find" no value
    inspected = ssh(vm, f"sudo -n podman inspect {played['container']}")
    logged = past_journal_race(lambda: ssh(vm, f"sudo -n podman logs {played['container']}"))
    for leaks in (inspected, logged):
        assert leaks.returncode == 0, out(leaks)
        assert TOKEN not in out(leaks) and GEMINI not in out(leaks)


def test_security_context_is_in_force(vm, played):
    status = in_pod(vm, played, "grep -E \"^(Uid|Gid|CapEff|NoNewPrivs):\" /proc/1/status")
    fields = {line.split(":")[0]: line.split()[1:] for line in
              status.stdout.decode().splitlines()}
    assert fields["Uid"][0] == "1000" and fields["Gid"][0] == "1000"
    assert fields["CapEff"] == ["0000000000000000"]
    assert fields["NoNewPrivs"] == ["1"]
    writes = in_pod(vm, played, "touch /app/x 2>/dev/null && echo app; touch /etc/x "
                                "2>/dev/null && echo etc; touch /tmp/x && echo tmp; "
                                "touch /data/x && echo data")
    assert writes.stdout.decode().split() == ["tmp", "data"], out(writes)


def test_frozen_agent_is_restarted_by_the_liveness_probe(vm, played):
    before = inspect_pod_container(vm, played["container"])["State"]["StartedAt"]
    done = in_pod(vm, played, "mkdir -p /tmp/nightguard/control && echo 1 > "
                              "/tmp/nightguard/control/.hang && mv /tmp/nightguard/control/.hang "
                              "/tmp/nightguard/control/hang")
    assert done.returncode == 0, out(done)
    started = time.monotonic()

    def restarted_and_healthy():
        state = (inspect_pod_container(vm, played["container"]) or {}).get("State") or {}
        return state.get("Running") and state.get("StartedAt") != before and \
            ssh(vm, f"sudo -n podman healthcheck run {played['container']}").returncode == 0

    # a stale heartbeat (15 s), 2 failed checks 5 s apart, a restart, a good check; TCG is
    # slow. Below 4.5 a restart is not expected: give it the time the checks take.
    fixed = played["podman"] >= (4, 5)
    back = wait_until(restarted_and_healthy, timeout=300 if fixed else 150, interval=5)
    if not back and not fixed:
        pytest.xfail(f"Podman {played['podman']}: the failing liveness probe did not restart "
                     "the container (containers/podman#17777, fixed in 4.5)")
    assert back, out(ssh(vm, f"sudo -n podman ps -a; sudo -n podman logs --tail 20 "
                             f"{played['container']}"))
    assert time.monotonic() - started > 15  # it took failed checks, not a crash


def test_down_and_deploy_return_to_the_unit_with_nothing_left(vm, played, ssh_run):
    done = ssh(vm, f"sudo -n podman kube down {REMOTE}/nightguard.yaml")
    assert done.returncode == 0, out(done)
    assert ssh(vm, f"sudo -n podman pod exists {played['pod']}").returncode == 1
    assert not [n for n in listed(vm, "container") if n.startswith(played["pod"])]
    # what NOTES.md says kube down leaves: the secret's copy and the data volume
    assert {played["secret"], played["claim"]} <= listed(vm, "volume")
    cleanup(vm, played)
    played["cleaned"] = True
    before = played["before"]
    assert listed(vm, "volume") == before["volume"]
    assert listed(vm, "secret") == before["secret"]
    assert ssh(vm, f"sudo -n podman image exists {played['image']}").returncode == 1
    done = inv(["deploy"], played["env"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert ssh(vm, f"systemctl is-active {UNIT}").stdout.decode().strip() == "active"
    assert healthy_now(ssh_run, vm)
    again = inv(["deploy"], played["env"])
    assert "no changes" in again.stdout, again.stdout + again.stderr
    assert listed(vm, "container") == before["container"] == {CONTAINER}
