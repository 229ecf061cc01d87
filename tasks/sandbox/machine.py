"""Local sandbox VMs: e2-micro look-alikes under QEMU, the default target of `inv deploy`.

The Python API the tasks (``tasks.sandbox.tasks``), the deploy code and the e2e tests use:
target, ssh_target, ensure_up, status, down, reboot, ssh_argv. The image comes from
``tasks.sandbox.image`` (built once per machine, cached), the QEMU process is handled by
``tasks.sandbox.qemu``. Each sandbox keeps its state in <project>/.sandbox/<name>/:
    disk.qcow2     copy-on-write overlay on the cached image (a fresh one in a second)
    os, image      the flavour and the image folder the disk was made from
    console.log    serial console since QEMU started (console.log.1: the run before)
    known_hosts    [127.0.0.1]:PORT ssh-ed25519 ..., read from the console: host keys
                   are verified like for a real VM, never trusted on first use
    metadata       a cloud flavour's metadata server, as the guest reaches it (a fake
                   Compute API on the laptop's loopback is http://10.0.2.2:PORT inside)
    qemu.pid, port, accel, qemu.log, monitor.sock: see tasks/sandbox/qemu.py
Environment: NG_SANDBOX_ACCEL (auto | tcg | kvm), NG_SANDBOX_DIR (moves .sandbox/),
XDG_CACHE_HOME and NG_SANDBOX_MIRROR (image cache and Debian mirror).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..config import Settings
from ..errors import ConfigError
from ..progress import Step
from ..ssh.address import SshTarget
from . import image, qemu, support
from .qemu import HOST, state_dir

SANDBOX_USER = "ubuntu"
KVM_PROBE_SECONDS = 60  # under KVM the host key shows in a few seconds
_HOSTKEY_RE = re.compile(r"ssh-ed25519 [A-Za-z0-9+/=]+")
_held: set[str] = set()


def build_ssh_argv(port: int, key: str, known_hosts: str, command: str | None = None) -> list[str]:
    opts = [
        f"UserKnownHostsFile={known_hosts}", "GlobalKnownHostsFile=/dev/null",
        "StrictHostKeyChecking=yes", "IdentitiesOnly=yes", "BatchMode=yes",
        "ConnectTimeout=10", "LogLevel=ERROR",
    ]  # fmt: skip
    argv = ["ssh", "-F", "/dev/null", "-i", key, "-p", str(port)]
    for opt in opts:
        argv += ["-o", opt]
    return argv + [f"{SANDBOX_USER}@{HOST}"] + ([command] if command is not None else [])


def parse_hostkeys(console_text: str) -> list[str]:
    """Every valid 'ssh-ed25519 BASE64' the guest printed between the markers, in boot order.
    systemd's status lines may land between the marker lines, so other lines are skipped."""
    keys, inside, found = [], False, None
    for line in console_text.replace("\r", "\n").split("\n"):
        line = line.strip()
        if line == image.HOSTKEY_BEGIN:
            inside, found = True, None
        elif line == image.HOSTKEY_END and inside:
            inside = False
            if found:
                keys.append(found)
        elif inside and _HOSTKEY_RE.fullmatch(line) and _valid_ed25519(line.split()[1]):
            found = line
    return keys


def _valid_ed25519(b64: str) -> bool:
    try:  # a kernel message landing mid-line would corrupt the key: check the blob
        blob = base64.b64decode(b64, validate=True)
    except ValueError:
        return False
    return len(blob) == 51 and blob[4:15] == b"ssh-ed25519"


def known_hosts_line(port: int, key: str) -> str:
    return f"[{HOST}]:{port} {key}\n"


def classify(has_disk: bool, running: bool, ssh_answers: bool) -> str:
    if running:
        return "up" if ssh_answers else "booting"
    return "down" if has_disk else "absent"


@contextlib.contextmanager
def _locked(name: str):
    """One up/down/reboot per sandbox at a time (re-entrant within this process)."""
    if name in _held:
        yield
        return
    lock = state_dir(name).parent / f".{name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        _held.add(name)
        try:
            yield
        finally:
            _held.discard(name)


def status(name: str = "default") -> str:
    d, running = state_dir(name), qemu.pid(name) is not None
    port = qemu.read(d / "port")
    return classify(
        (d / "disk.qcow2").exists(), running, running and port.isdigit() and qemu.banner(int(port))
    )


def target(name: str = "default") -> dict:
    d = state_dir(name)
    if qemu.pid(name) is None or not (d / "known_hosts").exists():
        if problem := support.boot_problem():  # e.g. a Mac: say so, not "run sandbox.up"
            raise RuntimeError(f"sandbox {name} is not up, and cannot run here: {problem}")
        raise RuntimeError(f"sandbox {name} is not up: run `inv sandbox.up`")
    return {
        "host": HOST, "port": int(qemu.read(d / "port")), "user": SANDBOX_USER,
        "key_filename": str(image.ssh_key()), "known_hosts": str(d / "known_hosts"),
    }  # fmt: skip


def ssh_target(settings: Settings) -> SshTarget:
    """The configured sandbox's SSH address: the resolver of target sandbox (registered
    with ``tasks.ssh.targets`` by the root collection)."""
    name = settings["sandbox.name"]
    try:
        found = target(name)
    except RuntimeError as exc:
        raise ConfigError(str(exc)) from None
    return SshTarget(host=found["host"], port=int(found["port"]), user=found["user"],
                     key_filename=found["key_filename"],
                     known_hosts=found["known_hosts"], label=f"sandbox {name}")


def ssh_argv(name: str = "default", command: str | None = None) -> list[str]:
    t = target(name)
    return build_ssh_argv(t["port"], t["key_filename"], t["known_hosts"], command)


def _check_alive(name: str) -> None:
    d = state_dir(name)
    kvm_failed = "KVM internal error" in qemu.read(d / "qemu.log")
    if qemu.pid(name) is None or kvm_failed:
        time.sleep(0.5)  # QEMU's last words may land in its log just after it exits
        child = qemu._children.get(int(qemu.read(d / "qemu.pid") or 0))
        # named in the first line: the log's tail is a register dump, and _boot falls back
        # to TCG on this verdict
        why = " on a KVM internal error" if kvm_failed else ""
        raise RuntimeError(
            f"sandbox {name}: QEMU stopped{why} (exit {child.poll() if child else '?'})\n"
            f"{qemu.tail(d / 'qemu.log')}\n{qemu.tail(d / 'console.log')}"
        )


def _wait_hostkey(name: str, deadline: float, count: int = 1) -> None:
    """Waits for the count-th host key on this QEMU run's console and pins it."""
    d = state_dir(name)
    while time.monotonic() < deadline:
        _check_alive(name)
        keys = parse_hostkeys(qemu.read(d / "console.log"))
        if len(keys) >= count:
            (d / "known_hosts").write_text(
                known_hosts_line(int(qemu.read(d / "port")), keys[count - 1])
            )
            return
        time.sleep(0.5)
    raise TimeoutError(
        f"sandbox {name}: no host key on its console in time; see {d / 'console.log'}"
    )


def _wait_ssh(name: str, deadline: float) -> None:
    if qemu.read(state_dir(name) / "os") in image.CLOUD:
        return _wait_banner(name, deadline)
    while time.monotonic() < deadline:
        _check_alive(name)
        with contextlib.suppress(subprocess.TimeoutExpired):
            probe = ssh_argv(name, "true")
            if (
                subprocess.run(
                    probe, stdin=subprocess.DEVNULL, capture_output=True, timeout=60
                ).returncode
                == 0
            ):
                return
        time.sleep(1)
    raise TimeoutError(
        f"sandbox {name}: ssh did not answer in time; see {state_dir(name) / 'console.log'}"
    )


def _wait_banner(name: str, deadline: float) -> None:
    """A cloud flavour's sshd answers long before anyone may log in (the guest agent's
    stand-in makes the user from the metadata, late, as on a new VM): up means sshd speaks."""
    port = int(qemu.read(state_dir(name) / "port"))
    while time.monotonic() < deadline:
        _check_alive(name)
        if qemu.banner(port):
            return
        time.sleep(1)
    raise TimeoutError(
        f"sandbox {name}: sshd did not answer in time; see {state_dir(name) / 'console.log'}"
    )


def guest_url(url: str) -> str:
    """A URL on the laptop's loopback as the guest reaches it (QEMU's user network)."""
    return re.sub(r"^(https?://)(127\.0\.0\.1|localhost)(?=[:/]|$)", r"\g<1>10.0.2.2", url)


def _boot(name: str, img: Path, deadline: float) -> None:
    accel = qemu.choose_accel()
    if accel == "kvm-probe":
        qemu.start(name, img, "kvm")
        try:
            _wait_hostkey(name, min(deadline, time.monotonic() + KVM_PROBE_SECONDS))
            verdict = "ok"
        except (RuntimeError, TimeoutError) as err:
            if "kvm" not in str(err).lower() and isinstance(err, RuntimeError):
                raise  # QEMU failed for another reason: no verdict on KVM
            verdict = "bad"
            print(
                f"sandbox: KVM does not work here ({str(err).splitlines()[0]}); using TCG",
                file=sys.stderr,
            )
            qemu.kill(name)
        qemu.kvm_marker().parent.mkdir(parents=True, exist_ok=True)
        qemu.kvm_marker().write_text(verdict + "\n")
        if verdict == "ok":
            return
        accel = "tcg"
    qemu.start(name, img, accel)
    _wait_hostkey(name, deadline)


def overlay_argv(base: Path, overlay: Path) -> list[str]:
    return ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base), str(overlay)]


def _image_for(name: str, os_flavour: str) -> Path:
    """The image a sandbox boots: the one its disk was made from while that still exists (a
    disk outlives a recipe change, like a VM's), else the current one, built if missing."""
    d = state_dir(name)
    made_from = Path(qemu.read(d / "image") or "/nonexistent")
    if (d / "disk.qcow2").exists():
        if qemu.read(d / "os") == os_flavour and (made_from / "disk.img").exists():
            if made_from != image.image_dir(os_flavour):
                print(f"sandbox {name}: runs an older image; --fresh moves it to the current one")
            return made_from
        print(f"sandbox {name}: its disk's image is gone or another os; starting on a new disk")
        (d / "disk.qcow2").unlink()
    return image.ensure_image(os_flavour)


def ensure_up(
    name: str = "default", os_flavour: str = "bookworm", fresh: bool = False, timeout: float = 300,
    metadata: str | None = None,
) -> dict:
    """Boots the sandbox (building its image first if needed) and returns target(name).
    ``metadata``: the metadata server a cloud flavour's guest asks (a URL on this machine;
    kept for later boots). Raises support.SandboxUnavailable (one line) where the sandbox
    cannot run."""
    support.require_boot()
    with _locked(name):
        if fresh:
            down(name, destroy=True)
        d = state_dir(name)
        if metadata is not None:
            if not re.fullmatch(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?/?", metadata):
                # it lands on the guest's kernel command line: nothing but a scheme and host
                raise ValueError(f"metadata {metadata!r} is not an http URL of a host and port "
                                 "(e.g. http://127.0.0.1:8080)")
            d.mkdir(parents=True, exist_ok=True)
            (d / "metadata").write_text(guest_url(metadata) + "\n")
        if qemu.pid(name) is None:
            img = _image_for(name, os_flavour)  # a build takes minutes, once: not in timeout
            started = time.monotonic()
            if not (d / "disk.qcow2").exists():
                d.mkdir(parents=True, exist_ok=True)
                subprocess.run(overlay_argv(img / "disk.img", d / "disk.qcow2"), check=True)
                (d / "os").write_text(os_flavour + "\n")
                (d / "image").write_text(f"{img}\n")
            with Step(f"sandbox {name}", "booting (about a minute under emulation)", every=15):
                _boot(name, img, started + timeout)
                _wait_ssh(name, started + timeout)
        elif qemu.read(d / "os") != os_flavour:
            raise RuntimeError(
                f"sandbox {name} runs {qemu.read(d / 'os')}, not {os_flavour}: "
                f"`inv sandbox.up --name {name} --os {os_flavour} --fresh` replaces it"
            )
        elif status(name) == "up" and (d / "known_hosts").exists():
            return target(name)
        else:  # booting, started by another process: wait for the current boot
            started = time.monotonic()
            boots = len(parse_hostkeys(qemu.read(d / "console.log")))
            _wait_hostkey(name, started + timeout, boots or 1)
        _wait_ssh(name, started + timeout)
        took = time.monotonic() - started
        accel, port = qemu.read(d / "accel"), qemu.read(d / "port")
        print(f"sandbox {name}: up in {took:.1f} s ({accel}, ssh port {port})")
        return target(name)


def down(name: str = "default", destroy: bool = False) -> None:
    """Stops QEMU: `systemctl poweroff`, then ACPI power button, then kill. destroy: drop disk."""
    with _locked(name):
        if qemu.pid(name) is not None and destroy:
            qemu.monitor(name, "quit")  # the disk is thrown away: no clean shutdown needed
        elif qemu.pid(name) is not None:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                subprocess.run(
                    ssh_argv(name, "sudo -n systemctl poweroff"), capture_output=True, timeout=30
                )
            if not qemu.wait_gone(name, 60):
                qemu.monitor(name, "system_powerdown")
        if not qemu.wait_gone(name, 30):
            qemu.kill(name)
        if destroy:
            shutil.rmtree(state_dir(name), ignore_errors=True)


def reboot(name: str = "default", timeout: float = 300) -> None:
    """Reboots the guest and waits until ssh answers again."""
    with _locked(name):
        boots = len(parse_hostkeys(qemu.read(state_dir(name) / "console.log")))
        started = time.monotonic()
        with contextlib.suppress(subprocess.TimeoutExpired):  # the connection may just drop
            subprocess.run(
                ssh_argv(name, "sudo -n systemctl reboot"), capture_output=True, timeout=60
            )
        _wait_hostkey(name, started + timeout, boots + 1)  # same QEMU run: the console log goes on
        _wait_ssh(name, started + timeout)
        print(f"sandbox {name}: rebooted in {time.monotonic() - started:.1f} s")


