"""Local sandbox VMs: e2-micro look-alikes under QEMU, the default target of `inv deploy`.

Tasks sandbox.up / down / status / ssh / reboot, and the Python API the deploy code and
the e2e tests use: target, ensure_up, status, down, reboot, ssh_argv. The image comes
from tasks.sandbox_image (built once per machine, cached). Each sandbox keeps its state
in <project>/.sandbox/<name>/:
    disk.qcow2     copy-on-write overlay on the cached base image (fresh one in seconds)
    qemu.pid, port, os      the running QEMU, its 127.0.0.1 ssh port, the flavour
    console.log    serial console since QEMU started (console.log.1: the run before)
    qemu.log       QEMU's own messages;  monitor.sock: QEMU monitor
    known_hosts    [127.0.0.1]:PORT ssh-ed25519 ..., read from the console: host keys
                   are verified like for a real VM
Environment: NG_SANDBOX_ACCEL = auto (default) | tcg | kvm. auto uses KVM only after a
probe boot on this machine reached the guest's host key under it (result cached in
the cache folder); otherwise TCG, which always works. NG_SANDBOX_DIR moves .sandbox/.
"""
from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from invoke import Collection, Exit, task

from tasks import sandbox_image as image

SANDBOX_USER = "ubuntu"
HOST = "127.0.0.1"
KVM_PROBE_SECONDS = 60  # under KVM the host key shows in a few seconds
_HOSTKEY_RE = re.compile(r"ssh-ed25519 [A-Za-z0-9+/=]+")
_children: dict[int, subprocess.Popen] = {}  # polled here, else they linger as zombies
_held: set[str] = set()


def state_dir(name: str) -> Path:
    root = os.environ.get("NG_SANDBOX_DIR") or Path(__file__).resolve().parent.parent / ".sandbox"
    return Path(root) / name


def qemu_argv(*, kernel, initrd, disk, port, console, monitor, accel="tcg") -> list[str]:
    cpu = ["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else ["-accel", "tcg,thread=multi", "-cpu", "max"]
    return ["qemu-system-x86_64", "-nodefaults", "-no-user-config", *cpu, "-m", "1024", "-smp", "2",
            "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", "root=/dev/vda rw console=ttyS0 net.ifnames=0",
            # cache=unsafe: guest flushes stay in the host page cache; only a host crash loses them
            "-drive", f"file={disk},format=qcow2,if=virtio,discard=unmap,cache=unsafe",
            "-netdev", f"user,id=n0,hostfwd=tcp:{HOST}:{port}-:22", "-device", "virtio-net-pci,netdev=n0",
            "-device", "virtio-rng-pci",  # entropy for first-boot host keys
            "-serial", f"file:{console}", "-monitor", f"unix:{monitor},server=on,wait=off",
            "-display", "none"]


def build_ssh_argv(port: int, key: str, known_hosts: str, command: str | None = None) -> list[str]:
    opts = {"UserKnownHostsFile": known_hosts, "GlobalKnownHostsFile": "/dev/null",
            "StrictHostKeyChecking": "yes", "IdentitiesOnly": "yes", "BatchMode": "yes",
            "ConnectTimeout": "10", "LogLevel": "ERROR"}
    argv = ["ssh", "-F", "/dev/null", "-i", key, "-p", str(port)]
    for opt, value in opts.items():
        argv += ["-o", f"{opt}={value}"]
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


def _read(path: Path, default: str = "") -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return default


def _pid(name: str) -> int | None:
    """The sandbox's live QEMU pid, checked against /proc (pid reuse, zombies)."""
    pid = _read(state_dir(name) / "qemu.pid")
    if not pid.isdigit() or (int(pid) in _children and _children[int(pid)].poll() is not None):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        zombie = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return None
    return None if zombie or str(state_dir(name) / "disk.qcow2").encode() not in cmdline else int(pid)


def _banner(port: int, timeout: float = 3.0) -> bool:
    """Does sshd answer? QEMU's forwarder accepts any connection, so read the banner."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            return sock.recv(8).startswith(b"SSH-")
    except OSError:
        return False


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
    d, running = state_dir(name), _pid(name) is not None
    port = _read(d / "port")
    return classify((d / "disk.qcow2").exists(), running, running and port.isdigit() and _banner(int(port)))


def target(name: str = "default") -> dict:
    d = state_dir(name)
    if _pid(name) is None or not (d / "known_hosts").exists():
        raise RuntimeError(f"sandbox {name} is not up: run `inv sandbox.up`")
    return {"host": HOST, "port": int(_read(d / "port")), "user": SANDBOX_USER,
            "key_filename": str(image.ssh_key()), "known_hosts": str(d / "known_hosts")}


def ssh_argv(name: str = "default", command: str | None = None) -> list[str]:
    t = target(name)
    return build_ssh_argv(t["port"], t["key_filename"], t["known_hosts"], command)


def _free_port(preferred: str) -> int:
    """The sandbox's previous port if still free (stable known_hosts), else any free one."""
    for port in ([int(preferred)] if preferred.isdigit() else []) + [0]:
        with socket.socket() as sock, contextlib.suppress(OSError):
            sock.bind((HOST, port))
            return sock.getsockname()[1]
    raise RuntimeError("no free port on 127.0.0.1")


def _kvm_marker() -> Path:
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout.split()
    return image.cache_dir() / "accel" / re.sub(r"[^\w.]+", "_", f"kvm-{os.uname().release}-{''.join(qemu[3:4])}")


def choose_accel() -> str:
    """tcg, kvm, or kvm-probe: KVM opens but is untried here, so try it and remember."""
    wanted = os.environ.get("NG_SANDBOX_ACCEL", "auto")
    if wanted in ("tcg", "kvm"):
        return wanted
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
    except OSError:
        return "tcg"
    return {"ok": "kvm", "bad": "tcg"}.get(_read(_kvm_marker()), "kvm-probe")


def _start(name: str, img: Path, accel: str) -> None:
    d = state_dir(name)
    if (d / "console.log").exists():
        os.replace(d / "console.log", d / "console.log.1")
    port = _free_port(_read(d / "port"))
    (d / "port").write_text(f"{port}\n")
    (d / "known_hosts").unlink(missing_ok=True)
    argv = qemu_argv(kernel=img / "vmlinuz", initrd=img / "initrd.img", disk=d / "disk.qcow2", port=port,
                     console=d / "console.log", monitor=d / "monitor.sock", accel=accel)
    with open(d / "qemu.log", "w") as log:  # own session: outlives `inv`, ignores its Ctrl-C
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    _children[proc.pid] = proc
    (d / "qemu.pid").write_text(f"{proc.pid}\n")
    (d / "accel").write_text(accel + "\n")


def _check_alive(name: str) -> None:
    d = state_dir(name)
    if _pid(name) is None or "KVM internal error" in _read(d / "qemu.log"):
        time.sleep(0.5)  # QEMU's last words may land in its log just after it exits
        raise RuntimeError(f"sandbox {name}: QEMU stopped\n{_tail(d / 'qemu.log')}\n{_tail(d / 'console.log')}")


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(_read(path).splitlines()[-lines:])


def _wait_hostkey(name: str, deadline: float, count: int = 1) -> None:
    """Waits for the count-th host key on this QEMU run's console and pins it."""
    d = state_dir(name)
    while time.monotonic() < deadline:
        _check_alive(name)
        keys = parse_hostkeys(_read(d / "console.log"))
        if len(keys) >= count:
            (d / "known_hosts").write_text(known_hosts_line(int(_read(d / "port")), keys[count - 1]))
            return
        time.sleep(0.5)
    raise TimeoutError(f"sandbox {name}: no host key on its console in time; see {d / 'console.log'}")


def _wait_ssh(name: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        _check_alive(name)
        with contextlib.suppress(subprocess.TimeoutExpired):
            if subprocess.run(ssh_argv(name, "true"), stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=60).returncode == 0:
                return
        time.sleep(1)
    raise TimeoutError(f"sandbox {name}: ssh did not answer in time; see {state_dir(name) / 'console.log'}")


def _wait_gone(name: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _pid(name) is not None and time.monotonic() < deadline:
        time.sleep(0.3)
    return _pid(name) is None


def _kill(name: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pid = _pid(name)
        if pid is None:
            return
        os.kill(pid, sig)
        _wait_gone(name, 10)


def _boot(name: str, img: Path, deadline: float) -> None:
    accel = choose_accel()
    if accel == "kvm-probe":
        _start(name, img, "kvm")
        try:
            _wait_hostkey(name, min(deadline, time.monotonic() + KVM_PROBE_SECONDS))
            verdict = "ok"
        except (RuntimeError, TimeoutError) as err:
            if "kvm" not in str(err).lower() and isinstance(err, RuntimeError):
                raise  # QEMU failed for another reason: no verdict on KVM
            verdict = "bad"
            print(f"sandbox: KVM does not work here ({str(err).splitlines()[0]}); using TCG", file=sys.stderr)
            _kill(name)
        _kvm_marker().parent.mkdir(parents=True, exist_ok=True)
        _kvm_marker().write_text(verdict + "\n")
        if verdict == "ok":
            return
        accel = "tcg"
    _start(name, img, accel)
    _wait_hostkey(name, deadline)


def ensure_up(name: str = "default", os_flavour: str = "bookworm", fresh: bool = False, timeout: float = 300) -> dict:
    """Boots the sandbox (building its image first if needed) and returns target(name)."""
    img = image.ensure_image(os_flavour)  # minutes, once per machine: not counted in timeout
    with _locked(name):
        d, started = state_dir(name), time.monotonic()
        deadline = started + timeout
        if fresh:
            down(name, destroy=True)
        if _pid(name) is None:
            overlay = d / "disk.qcow2"
            if overlay.exists() and (_read(d / "os"), _read(d / "image")) != (os_flavour, str(img)):
                print(f"sandbox {name}: its disk comes from another image; starting on a new one", file=sys.stderr)
                overlay.unlink()
            if not overlay.exists():
                d.mkdir(parents=True, exist_ok=True)
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                                str(img / "disk.img"), str(overlay)], check=True)
                (d / "os").write_text(os_flavour + "\n")
                (d / "image").write_text(f"{img}\n")
            _boot(name, img, deadline)
        elif status(name) == "up" and (d / "known_hosts").exists():
            return target(name)
        else:  # booting, started by another process: wait for the current boot
            _wait_hostkey(name, deadline, len(parse_hostkeys(_read(d / "console.log"))) or 1)
        _wait_ssh(name, deadline)
        print(f"sandbox {name}: up in {time.monotonic() - started:.1f} s "
              f"({_read(d / 'accel')}, ssh port {_read(d / 'port')})")
        return target(name)


def _monitor(name: str, command: str) -> None:
    with socket.socket(socket.AF_UNIX) as sock, contextlib.suppress(OSError):
        sock.settimeout(3)
        sock.connect(str(state_dir(name) / "monitor.sock"))
        sock.sendall(command.encode() + b"\n")
        time.sleep(0.3)


def down(name: str = "default", destroy: bool = False) -> None:
    """Stops QEMU: `systemctl poweroff`, then the ACPI button, then a kill. destroy: drop the disk."""
    with _locked(name):
        if _pid(name) is not None and destroy:
            _monitor(name, "quit")  # the disk is thrown away: no clean shutdown needed
        elif _pid(name) is not None:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                subprocess.run(ssh_argv(name, "sudo -n systemctl poweroff"), capture_output=True, timeout=30)
            if not _wait_gone(name, 60):
                _monitor(name, "system_powerdown")
        if not _wait_gone(name, 30):
            _kill(name)
        if destroy:
            shutil.rmtree(state_dir(name), ignore_errors=True)


def reboot(name: str = "default", timeout: float = 300) -> None:
    """Reboots the guest and waits until ssh answers again."""
    with _locked(name):
        boots = len(parse_hostkeys(_read(state_dir(name) / "console.log")))
        started = time.monotonic()
        subprocess.run(ssh_argv(name, "sudo -n systemctl reboot"), capture_output=True, timeout=60)
        _wait_hostkey(name, started + timeout, boots + 1)  # same QEMU run: the console log goes on
        _wait_ssh(name, started + timeout)
        print(f"sandbox {name}: rebooted in {time.monotonic() - started:.1f} s")


NAME_HELP = "sandbox name (default: default); several can run at once"
TIMEOUT_HELP = "seconds to wait for ssh (default 300; an image build comes on top)"


@task(help={"name": NAME_HELP, "os": "bookworm (Debian 12, Podman 4.3) or trixie (Debian 13, Podman 5.4)",
            "fresh": "throw the sandbox's disk away first", "timeout": TIMEOUT_HELP})
def up(c, name="default", os="bookworm", fresh=False, timeout=300):
    """Boot a sandbox VM (1 GB, 2 vCPUs, Podman), building its image once; wait for ssh."""
    if not fresh and status(name) == "up":
        print(f"sandbox {name}: already up (ssh port {target(name)['port']})")
        return
    ensure_up(name, os_flavour=os, fresh=fresh, timeout=float(timeout))


@task(name="down", help={"name": NAME_HELP, "destroy": "also remove the sandbox's disk and state"})
def down_task(c, name="default", destroy=False):
    """Shut a sandbox VM down (clean poweroff, killed after a timeout)."""
    down(name, destroy=destroy)


@task(name="status", help={"name": NAME_HELP})
def status_task(c, name="default"):
    """Print one of: absent, down, booting, up (up: ssh answers)."""
    print(status(name))


@task(help={"name": NAME_HELP, "command": "run this one command and exit with its exit code"})
def ssh(c, name="default", command=None):
    """Open a shell as ubuntu on a sandbox VM, or run one command."""
    try:
        argv = ssh_argv(name, command)
    except RuntimeError as err:
        raise Exit(str(err), code=2)
    rc = subprocess.call(argv)
    if rc:
        raise Exit(code=rc)


@task(name="reboot", help={"name": NAME_HELP, "timeout": TIMEOUT_HELP})
def reboot_task(c, name="default", timeout=300):
    """Reboot a sandbox VM and wait until ssh is back."""
    reboot(name, timeout=float(timeout))


ns = Collection("sandbox", up, down_task, status_task, ssh, reboot_task)
