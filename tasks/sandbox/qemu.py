"""The QEMU process behind one sandbox VM (see tasks/sandbox.py): its argv, the choice of
accelerator, starting it detached, telling whether it still runs, stopping it.

State lives in .sandbox/<name>/ (NG_SANDBOX_DIR moves .sandbox/): qemu.pid, port, accel,
qemu.log (QEMU's own messages), console.log (serial console; console.log.1 the run
before), monitor.sock (QEMU monitor).
Environment: NG_SANDBOX_TCG = thread=single (default) | thread=multi (see tcg_threads).
NG_SANDBOX_ACCEL = auto (default) | tcg | kvm. auto uses KVM only where
/dev/kvm opens and a probe boot under KVM worked on this machine before (verdict kept in
the cache folder); otherwise TCG, which always works. On a machine where KVM kills Linux
guests, the probe costs one failed start, once.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ..config import PROJECT_ROOT
from . import image

HOST = "127.0.0.1"
PROCFS = sys.platform.startswith("linux")  # else (macOS) ask ps about a process
_children: dict[int, subprocess.Popen] = {}  # polled here, else they linger as zombies


def state_dir(name: str) -> Path:
    root = os.environ.get("NG_SANDBOX_DIR") or PROJECT_ROOT / ".sandbox"
    return Path(root) / name


def tcg_threads() -> str:
    """QEMU's TCG threading: one host thread for both vCPUs (thread=single) unless
    NG_SANDBOX_TCG says otherwise (thread=multi). Measured on a 2-core machine, the guest
    still seeing 2 vCPUs: alone, a cold deploy 29.7 s single / 35.0 s multi; two VMs at
    once 33 s / 45 s, with a fifth less host CPU - multi-threaded TCG pays for cross-vCPU
    memory ordering and, with more vCPU threads than cores, for guests spinning on locks
    whose holder is descheduled."""
    wanted = os.environ.get("NG_SANDBOX_TCG", "")
    return wanted if wanted in ("thread=single", "thread=multi") else "thread=single"


def qemu_argv(*, kernel, initrd, disk, port, console, monitor, accel="tcg",
              metadata: str = "") -> list[str]:
    """An e2-micro's shape: 2 vCPUs, 1 GB, one virtio disk, one NIC with ssh on loopback.
    ``metadata``: the metadata server's URL as the guest reaches it (a cloud flavour's guest
    software reads it from the kernel command line: ng.metadata=URL)."""
    cpu = "-accel kvm -cpu host" if accel == "kvm" else f"-accel tcg,{tcg_threads()} -cpu max"
    return [
        "qemu-system-x86_64", "-nodefaults", "-no-user-config", *cpu.split(),
        "-m", "1024", "-smp", "2",
        "-kernel", str(kernel), "-initrd", str(initrd),
        # panic=-1: a kernel that panics while booting under emulation boots again
        "-append", "root=/dev/vda rw console=ttyS0 net.ifnames=0 panic=-1"
                   + (f" ng.metadata={metadata}" if metadata else ""),
        # cache=unsafe: guest flushes stay in the host page cache; only a host crash loses them
        "-drive", f"file={disk},format=qcow2,if=virtio,discard=unmap,cache=unsafe",
        "-netdev", f"user,id=n0,hostfwd=tcp:{HOST}:{port}-:22",
        "-device", "virtio-net-pci,netdev=n0",
        "-device", "virtio-rng-pci",  # entropy for the first-boot host key
        "-serial", f"file:{console}", "-monitor", f"unix:{monitor},server=on,wait=off",
        "-display", "none",
    ]  # fmt: skip


def read(path: Path, default: str = "") -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return default


def tail(path: Path, lines: int = 15) -> str:
    return "\n".join(read(path).splitlines()[-lines:])


def process(pid: int) -> tuple[str, bytes] | None:
    """(state letter, command line) of a running process, or None. From /proc on Linux;
    elsewhere (macOS) from ps, whose `stat` and `command` columns procps and BSD share."""
    if PROCFS:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, IndexError):
            return None
        return state, cmdline
    try:  # -ww: the whole command line, however long
        argv = ["ps", "-ww", "-o", "stat=", "-o", "command=", "-p", str(pid)]
        out = subprocess.run(argv, capture_output=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    fields = out.split(None, 1)
    return (fields[0][:1].decode(), fields[1]) if len(fields) == 2 else None


def pid(name: str) -> int | None:
    """The sandbox's live QEMU pid, checked against the process table (pid reuse, zombies)."""
    found = read(state_dir(name) / "qemu.pid")
    if not found.isdigit() or (
        int(found) in _children and _children[int(found)].poll() is not None
    ):
        return None
    running = process(int(found))
    if running is None or running[0] == "Z":
        return None
    return int(found) if str(state_dir(name) / "disk.qcow2").encode() in running[1] else None


def banner(port: int, timeout: float = 3.0) -> bool:
    """Does sshd answer? QEMU's forwarder accepts any connection, so read the banner."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            return sock.recv(8).startswith(b"SSH-")
    except OSError:
        return False


def free_port(preferred: str) -> int:
    """The sandbox's previous port if still free (stable known_hosts), else any free one."""
    for port in ([int(preferred)] if preferred.isdigit() else []) + [0]:
        with socket.socket() as sock, contextlib.suppress(OSError):
            sock.bind((HOST, port))
            return sock.getsockname()[1]
    raise RuntimeError("no free port on 127.0.0.1")


def kvm_marker() -> Path:
    """Where the verdict of the KVM probe is kept, per host kernel and QEMU version."""
    argv = ["qemu-system-x86_64", "--version"]
    version = "".join(subprocess.run(argv, capture_output=True, text=True).stdout.split()[3:4])
    return (
        image.cache_dir() / "accel" / re.sub(r"[^\w.]+", "_", f"kvm-{os.uname().release}-{version}")
    )


def choose_accel() -> str:
    """tcg, kvm, or kvm-probe: KVM opens but is untried here, so try it and remember."""
    wanted = os.environ.get("NG_SANDBOX_ACCEL", "auto")
    if wanted in ("tcg", "kvm"):
        return wanted
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
    except OSError:
        return "tcg"
    return {"ok": "kvm", "bad": "tcg"}.get(read(kvm_marker()), "kvm-probe")


def start(name: str, img: Path, accel: str) -> None:
    """Starts QEMU detached on the sandbox's disk, with a free port and a fresh console log."""
    d = state_dir(name)
    if (d / "console.log").exists():
        os.replace(d / "console.log", d / "console.log.1")
    for _attempt in range(3):
        port = free_port(read(d / "port"))
        (d / "port").write_text(f"{port}\n")
        argv = qemu_argv(kernel=img / "vmlinuz", initrd=img / "initrd.img", disk=d / "disk.qcow2",
                         port=port, console=d / "console.log", monitor=d / "monitor.sock",
                         accel=accel, metadata=read(d / "metadata"))  # fmt: skip
        with open(d / "qemu.log", "w") as log:  # own session: outlives `inv`, ignores its Ctrl-C
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        _children[proc.pid] = proc
        (d / "qemu.pid").write_text(f"{proc.pid}\n")
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1)
        # another program took the port between our check and QEMU's bind: take another
        if proc.poll() is None or "host forwarding" not in read(d / "qemu.log"):
            break
        (d / "port").unlink()
    (d / "accel").write_text(accel + "\n")


def wait_gone(name: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while pid(name) is not None and time.monotonic() < deadline:
        time.sleep(0.3)
    return pid(name) is None


def kill(name: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        running = pid(name)
        if running is None:
            return
        os.kill(running, sig)
        wait_gone(name, 10)


def monitor(name: str, command: str) -> None:
    """Sends one command to the QEMU monitor (quit, system_powerdown); ignores failures."""
    with socket.socket(socket.AF_UNIX) as sock, contextlib.suppress(OSError):
        sock.settimeout(3)
        sock.connect(str(state_dir(name) / "monitor.sock"))
        sock.sendall(command.encode() + b"\n")
        time.sleep(0.3)
