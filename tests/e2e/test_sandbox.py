"""The sandbox VM looks like the e2-micro we deploy to: 1 GB, no swap, systemd, cgroup v2,
rootful Podman with the preloaded base image, ssh as ubuntu with a pinned host key."""

import subprocess
import sys
from pathlib import Path

from tasks.sandbox import image
from tasks.sandbox import machine as sb

ROOT = Path(__file__).resolve().parents[2]
PODMAN = {"bookworm": "4.3.1", "trixie": "5.4.2"}


def inv(*args):
    return subprocess.run(
        [sys.executable, "-m", "invoke", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )


def test_ssh_as_ubuntu_with_passwordless_sudo(sandbox, ssh_run):
    done = ssh_run(sandbox, "whoami && sudo -n true && echo sudo-ok")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ubuntu", "sudo-ok"]


def test_memory_is_about_one_gigabyte_and_no_swap(sandbox, ssh_run):
    done = ssh_run(sandbox, "grep MemTotal /proc/meminfo; tail -n +2 /proc/swaps | wc -l")
    meminfo, swaps = done.stdout.splitlines()
    assert 900 <= int(meminfo.split()[1]) / 1024 <= 1024
    assert swaps.strip() == "0"


def test_systemd_is_running_with_cgroup_v2(sandbox, ssh_run):
    done = ssh_run(
        sandbox,
        "stat -fc %T /sys/fs/cgroup; nproc; "
        "timeout 240 systemctl is-system-running --wait; systemctl --failed --no-legend",
    )
    assert done.stdout.split()[:3] == ["cgroup2fs", "2", "running"], done.stdout + done.stderr


def test_podman_from_the_distribution(sandbox, request, ssh_run):
    flavour = request.node.callspec.params["sandbox"]
    done = ssh_run(
        sandbox,
        "sudo podman info --format '{{.Version.Version}} {{.Host.OCIRuntime.Name}} "
        "{{.Host.CgroupsVersion}}'",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [PODMAN[flavour], "crun", "v2"]


def test_base_image_is_preloaded_and_runs_with_networking(sandbox, ssh_run):
    done = ssh_run(
        sandbox,
        f"sudo podman images --format '{{{{.Repository}}}}:{{{{.Tag}}}}'; "
        f"sudo podman run --rm {image.BASE_IMAGE} python3 -c 'print(6*7)'",
    )
    assert done.returncode == 0, done.stderr
    assert image.BASE_IMAGE in done.stdout.splitlines()
    assert done.stdout.splitlines()[-1] == "42"


def test_known_hosts_pins_the_guests_own_key(sandbox, ssh_run):
    guest = ssh_run(sandbox, "cut -d' ' -f1,2 /etc/ssh/ssh_host_ed25519_key.pub").stdout.strip()
    line = Path(sandbox["known_hosts"]).read_text()
    assert line == f"[127.0.0.1]:{sandbox['port']} {guest}\n"


def test_a_wrong_host_key_is_rejected(sandbox_bookworm, ssh_run, tmp_path):
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True
    )
    other = (tmp_path / "other.pub").read_text().split()[:2]
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sandbox_bookworm['port']} {' '.join(other)}\n")
    done = ssh_run(dict(sandbox_bookworm, known_hosts=str(known)), "echo should-not-run")
    assert done.returncode == 255
    assert "should-not-run" not in done.stdout
    assert (
        "Host key verification failed" in done.stderr
        or "HOST IDENTIFICATION HAS CHANGED" in done.stderr
    )


def test_cached_image_ships_no_host_keys(sandbox_bookworm):
    disk = (
        Path(sb.state_dir(sandbox_bookworm["name"]).joinpath("image").read_text().strip())
        / "disk.img"
    )
    listing = subprocess.run(
        ["debugfs", "-R", "ls -l /etc/ssh", str(disk)], capture_output=True, text=True
    )
    assert "sshd_config" in listing.stdout
    assert "ssh_host_" not in listing.stdout


def test_status_and_ssh_tasks(sandbox_bookworm):
    name = sandbox_bookworm["name"]
    assert inv("sandbox.status", "--name", name).stdout == "up\n"
    assert inv("sandbox.status", "--name", "e2e-never-made").stdout == "absent\n"
    assert inv("sandbox.up", "--name", name).stdout.startswith(f"sandbox {name}: already up")
    done = inv("sandbox.ssh", "--name", name, "--command", "echo hi; exit 3")
    assert (done.returncode, done.stdout) == (3, "hi\n")
