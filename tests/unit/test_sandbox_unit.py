"""The sandbox's pure parts: QEMU/ssh/mmdebstrap argv, recipe keys, console parsing, status."""

import base64

import pytest

from tasks.sandbox import image, qemu
from tasks.sandbox import machine as sandbox

KEY = (
    "ssh-ed25519 "
    + base64.b64encode(b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20" + bytes(range(32))).decode()
)


def test_qemu_argv_is_an_e2_micro_lookalike_on_loopback_only():
    argv = qemu.qemu_argv(
        kernel="/c/vmlinuz",
        initrd="/c/initrd.img",
        disk="/s/disk.qcow2",
        port=2222,
        console="/s/console.log",
        monitor="/s/monitor.sock",
    )
    assert argv[0] == "qemu-system-x86_64"
    assert argv[argv.index("-m") + 1] == "1024"
    assert argv[argv.index("-smp") + 1] == "2"
    # one host thread for both vCPUs (measured faster on a 2-core machine; see tcg_threads)
    assert argv[argv.index("-accel") + 1] == "tcg,thread=single"
    assert "user,id=n0,hostfwd=tcp:127.0.0.1:2222-:22" in argv
    assert "file=/s/disk.qcow2,format=qcow2,if=virtio,discard=unmap,cache=unsafe" in argv
    append = argv[argv.index("-append") + 1].split()
    assert {"console=ttyS0", "net.ifnames=0", "root=/dev/vda"} <= set(append)
    assert "file:/s/console.log" in argv


def test_qemu_argv_kvm():
    argv = qemu.qemu_argv(
        kernel="k", initrd="i", disk="d", port=1, console="c", monitor="m", accel="kvm"
    )
    assert argv[argv.index("-accel") + 1] == "kvm"
    assert argv[argv.index("-cpu") + 1] == "host"


def test_ssh_argv_pins_host_key_and_key():
    argv = sandbox.build_ssh_argv(2222, "/k/id", "/s/known_hosts", "uptime")
    assert argv[:3] == ["ssh", "-F", "/dev/null"]
    assert argv[argv.index("-i") + 1] == "/k/id"
    assert argv[argv.index("-p") + 1] == "2222"
    opts = [argv[i + 1] for i, a in enumerate(argv) if a == "-o"]
    assert "StrictHostKeyChecking=yes" in opts
    assert "UserKnownHostsFile=/s/known_hosts" in opts
    assert argv[-2:] == ["ubuntu@127.0.0.1", "uptime"]
    assert sandbox.build_ssh_argv(1, "k", "h")[-1] == "ubuntu@127.0.0.1"


def test_hostkey_parsing_from_console_log():
    log = (
        f"[    1.0] systemd[1]: Starting...\r\n\r\n{image.HOSTKEY_BEGIN}\r\n{KEY}\r\n"
        f"{image.HOSTKEY_END}\r\n"
        "Debian GNU/Linux 12 nightguard-sandbox ttyS0\r\n"
    )
    assert sandbox.parse_hostkeys(log) == [KEY]
    assert sandbox.parse_hostkeys(log + log) == [KEY, KEY]  # one per boot
    assert sandbox.parse_hostkeys("nothing here") == []


def test_hostkey_parsing_rejects_a_corrupted_key():
    broken = KEY[:30] + "[ 3.1] eth0" + KEY[30:]
    assert sandbox.parse_hostkeys(f"{image.HOSTKEY_BEGIN}\n{broken}\n{image.HOSTKEY_END}\n") == []
    wrong_len = "ssh-ed25519 " + base64.b64encode(b"\x00\x00\x00\x0bssh-ed25519\x00").decode()
    assert (
        sandbox.parse_hostkeys(f"{image.HOSTKEY_BEGIN}\n{wrong_len}\n{image.HOSTKEY_END}\n") == []
    )


def test_overlay_argv():
    assert sandbox.overlay_argv("/c/disk.img", "/s/disk.qcow2") == [
        "qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/c/disk.img", "/s/disk.qcow2"
    ]  # fmt: skip


def test_known_hosts_line():
    assert sandbox.known_hosts_line(2222, KEY) == f"[127.0.0.1]:2222 {KEY}\n"


@pytest.mark.parametrize(
    "disk,running,answers,expected",
    [
        (False, False, False, "absent"),
        (True, False, False, "down"),
        (True, True, False, "booting"),
        (True, True, True, "up"),
    ],
)
def test_status_logic(disk, running, answers, expected):
    assert sandbox.classify(disk, running, answers) == expected


def test_status_of_an_unknown_sandbox_is_absent(tmp_path, monkeypatch):
    monkeypatch.setenv("NG_SANDBOX_DIR", str(tmp_path))
    assert sandbox.status("nope") == "absent"
    # where QEMU can run (said here, not found on this machine's PATH)
    monkeypatch.setattr(sandbox.support, "boot_problem", lambda: None)
    with pytest.raises(RuntimeError, match="sandbox nope is not up: run `inv sandbox.up`"):
        sandbox.target("nope")
    monkeypatch.setattr(sandbox.support, "boot_problem", lambda: "no QEMU here")
    with pytest.raises(RuntimeError, match="not up, and cannot run here: no QEMU here"):
        sandbox.target("nope")


def test_recipe_key_follows_the_recipe():
    one = image.image_recipe("bookworm", "ssh-ed25519 AAAA one", "b1")
    assert image.recipe_key(one) == image.recipe_key(
        image.image_recipe("bookworm", "ssh-ed25519 AAAA one", "b1")
    )
    changed = [
        image.image_recipe("trixie", "ssh-ed25519 AAAA one", "b1"),
        image.image_recipe("bookworm", "ssh-ed25519 AAAA two", "b1"),
        image.image_recipe("bookworm", "ssh-ed25519 AAAA one", "b2"),
    ]
    extra = image.image_recipe("bookworm", "ssh-ed25519 AAAA one", "b1")
    extra["packages"].append("htop")
    keys = {image.recipe_key(r) for r in [one, *changed, extra]}
    assert len(keys) == 5


def test_recipe_has_no_swap_no_host_keys_and_the_flavours_packages():
    recipe = image.image_recipe("trixie", "ssh-ed25519 AAAA x", "b")
    fstab = recipe["files"]["/etc/fstab"][1].splitlines()
    assert [line for line in fstab if "swap" in line and not line.startswith("#")] == []
    assert ["sh", "-c", "rm -f /etc/ssh/ssh_host_*"] in recipe["post"]
    assert {
        "podman",
        "crun",
        "iptables",
        "uidmap",
        "openssh-server",
        "sudo",
        "python3",
        "rsync",
        "linux-image-cloud-amd64",
        "passt",
    } <= set(recipe["packages"])
    assert "passt" not in image.image_recipe("bookworm", "k", "b")["packages"]
    with pytest.raises(ValueError):
        image.image_recipe("sid", "k", "b")


def test_mmdebstrap_and_mkfs_argv():
    argv = image.mmdebstrap_argv(
        "bookworm", ["python3", "ca-certificates"], "/t/base.tar", "http://m/debian", ()
    )
    assert argv[0] == "mmdebstrap" and "--variant=apt" in argv
    assert 'Acquire::Retries "5"' in " ".join(argv)
    assert "--include=python3,ca-certificates" in argv
    assert argv[-3:] == ["bookworm", "/t/base.tar", "http://m/debian"]
    assert image.mkfs_argv("/r", "/t/disk.img") == [
        "mkfs.ext4",
        "-q",
        "-F",
        "-L",
        "ngroot",
        "-d",
        "/r",
        "/t/disk.img",
        "10G",
    ]


def test_atomic_build_leaves_nothing_when_interrupted(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    final = tmp_path / "images" / "x-1"

    def failing(tmp, log):
        (tmp / "disk.img").write_text("half")
        raise RuntimeError("network gone")

    with pytest.raises(RuntimeError):
        image._build_atomically(final, failing, "x")
    assert not final.exists() and list(final.parent.iterdir()) == []

    def ok(tmp, log):
        (tmp / "disk.img").write_text("whole")

    assert (image._build_atomically(final, ok, "x") / "disk.img").read_text() == "whole"
    assert image._build_atomically(final, failing, "x") == final  # done: not rebuilt


def test_hostkey_parsing_skips_status_lines_between_the_markers():
    log = (
        f"\r\n{image.HOSTKEY_BEGIN}\r\n[\x1b[0m\x1b[0;31m*     \x1b[0m] (1 of 5) Job "
        f"systemd-networkd.service/start running (17s / 1min 42s)\r\r\n{KEY}\r\n"
        f"{image.HOSTKEY_END}\r\n"
    )
    assert sandbox.parse_hostkeys(log) == [KEY]


def test_guest_files_agree_with_the_constants_the_host_reads():
    files = image.guest_files()
    hostkeys = files["/usr/local/sbin/ng-hostkeys"]
    assert hostkeys[0] == 0o755
    assert image.HOSTKEY_BEGIN in hostkeys[1] and image.HOSTKEY_END in hostkeys[1]
    assert image.BUILD_OK in files["/usr/local/sbin/ng-build-finish"][1]
    importer = files["/usr/local/sbin/ng-import-base"][1]
    assert image.BASE_IMAGE in importer and image.BASE_TAR_IN_GUEST in importer
    assert files["/etc/sudoers.d/ubuntu"] == (0o440, "ubuntu ALL=(ALL) NOPASSWD:ALL\n")
    argv = image.prepare_argv("/i", "/c")
    assert "systemd.unit=ng-build.target" in argv[argv.index("-append") + 1]


def test_prepare_boot_argv():
    argv = image.prepare_argv("/img", "/img/prepare-console.log")
    assert "file=/img/disk.img,format=raw,if=virtio,cache=unsafe" in argv
    assert "-no-reboot" in argv and "-netdev" not in argv  # powers off at the end; no network


def test_prune_keeps_the_new_image_the_newest_other_and_other_flavours(tmp_path):
    import os

    for age, name in enumerate(("bookworm-new", "bookworm-old1", "bookworm-old2", "trixie-old")):
        (tmp_path / name).mkdir()
        os.utime(tmp_path / name, (1_000_000 - age, 1_000_000 - age))
    image.prune(tmp_path / "bookworm-new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bookworm-new", "bookworm-old1", "trixie-old"]


# -- the flavour that boots like a new Compute Engine VM ------------------------------------
def test_the_cloud_flavour_has_no_podman_no_login_user_and_apt_timers_on():
    recipe = image.image_recipe("bookworm-cloud", "ssh-ed25519 AAAA x", "b")
    assert recipe["suite"] == "bookworm" and recipe["prepare"] is False
    packages = set(recipe["packages"])
    assert not packages & {"podman", "crun", "conmon", "netavark", "slirp4netns", "uidmap"}
    assert {"unattended-upgrades", "openssh-server", "sudo", "python3"} <= packages
    assert recipe["pre"] == []  # no ubuntu user: the guest agent's stand-in makes it
    files = recipe["files"]
    assert not [p for p in files if "authorized_keys" in p or p.startswith("/etc/sudoers.d/")]
    assert "/usr/local/sbin/ng-import-base" not in files  # no Podman to import into
    for unit in ("google-guest-agent", "google-startup-scripts"):
        assert f"/etc/systemd/system/{unit}.service" in files
    enable = next(argv for argv in recipe["post"] if argv[:2] == ["systemctl", "enable"])
    assert {"google-guest-agent", "google-startup-scripts", "apt-daily.timer",
            "apt-daily-upgrade.timer"} <= set(enable)
    assert not [argv for argv in recipe["post"] if "mask" in argv]
    periodic = files["/etc/apt/apt.conf.d/20auto-upgrades"][1]
    assert 'APT::Periodic::Unattended-Upgrade "1";' in periodic
    assert image.recipe_key(recipe) != image.recipe_key(
        image.image_recipe("bookworm", "ssh-ed25519 AAAA x", "b"))


def test_the_metadata_server_reaches_the_guest_on_its_kernel_command_line():
    argv = qemu.qemu_argv(kernel="k", initrd="i", disk="d", port=1, console="c", monitor="m",
                          metadata="http://10.0.2.2:8123")
    assert "ng.metadata=http://10.0.2.2:8123" in argv[argv.index("-append") + 1].split()
    plain = qemu.qemu_argv(kernel="k", initrd="i", disk="d", port=1, console="c", monitor="m")
    assert "ng.metadata" not in plain[plain.index("-append") + 1]
    assert sandbox.guest_url("http://127.0.0.1:8123") == "http://10.0.2.2:8123"
    assert sandbox.guest_url("http://localhost:80/") == "http://10.0.2.2:80/"
    assert sandbox.guest_url("http://192.0.2.7:80") == "http://192.0.2.7:80"


@pytest.mark.parametrize("bad", ["http://127.0.0.1:80 init=/bin/sh", "file:///etc/passwd",
                                 "http://user@127.0.0.1:80", "http://127.0.0.1:80/x?y"])
def test_a_metadata_url_that_is_not_a_plain_host_and_port_is_refused(bad, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setenv("NG_SANDBOX_DIR", str(tmp_path))
    monkeypatch.setattr(sandbox.support, "require_boot", lambda: None)
    with pytest.raises(ValueError, match="is not an http URL of a host and port"):
        sandbox.ensure_up("s", os_flavour="bookworm-cloud", metadata=bad)
    assert not (tmp_path / "s" / "metadata").exists()


def test_tcg_threads_follow_ng_sandbox_tcg(monkeypatch):
    monkeypatch.setenv("NG_SANDBOX_TCG", "thread=multi")
    assert qemu.tcg_threads() == "thread=multi"
    monkeypatch.setenv("NG_SANDBOX_TCG", "thread=multi,tb-size=9999999")  # not passed through
    assert qemu.tcg_threads() == "thread=single"
    monkeypatch.delenv("NG_SANDBOX_TCG")
    assert qemu.tcg_threads() == "thread=single"
