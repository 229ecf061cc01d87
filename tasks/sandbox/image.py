"""Builds and caches the disk image of the local sandbox VM (an e2-micro look-alike).

The guest is a Debian root filesystem made offline from Debian's packages by mmdebstrap,
packed into an ext4 file with `mkfs.ext4 -d` (no loop devices, no mounts), next to the
kernel and initrd that QEMU boots directly. It is built once per machine and recipe:

    ${XDG_CACHE_HOME:-~/.cache}/nightguard-deploy/
        ssh/id_ed25519[.pub]      key that logs in as `ubuntu` (made once per machine)
        base/<key>/base.tar       Debian bookworm with python3, pip and venv: the app's base
                                  image, as python:3.x-slim gives an agent (wheels, no compiler)
        images/<os>-<key>/        disk.img, vmlinuz, initrd.img, recipe.json
        locks/                    one lock per build: concurrent builds never overlap

What goes into the guest besides packages is the file tree tasks/sandbox/guest/ (units,
scripts, config), plus commands run in the chroot; see image_recipe().
<key> is a hash of the recipe (packages, files, commands, the SSH public key): a changed
recipe builds a new image instead of reusing a stale one. Builds go to a temporary folder
renamed into place at the end, so an interrupted build never counts as done.

The SSH public key is baked into the image as ubuntu's authorized_keys (the cache is per
machine anyway). Host keys are not: the guest makes them on first boot and prints the
ed25519 one to the serial console between HOSTKEY_BEGIN and HOSTKEY_END.

The guest and the base image trust the laptop's own extra certificate authorities
(/usr/local/share/ca-certificates): they reach Debian's mirror and the package index the
way the laptop does, through QEMU's user network (and whatever proxy the laptop's DNS and
CAs imply). Inside, the base tar is /var/lib/nightguard-sandbox/base.tar (root imports it
at boot; a rootless user's deploy imports it through nightguard.base_image_archive).

Environment: XDG_CACHE_HOME, NG_SANDBOX_MIRROR (default http://deb.debian.org/debian).
Needs Linux and root (mmdebstrap root mode and chroot); elsewhere ensure_image stops with one
line (tasks.sandbox.support), and a cache folder copied from a Linux machine is used as is.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from ..progress import Step
from . import support

RECIPE_VERSION = 5  # bump to rebuild every image; 4: the laptop's CAs; 5: base tar apart
BASE_RECIPE_VERSION = 4  # 3: without docs, man pages, locales; 4: venv, pip, laptop's CAs
FLAVOURS = ("bookworm", "trixie", "bookworm-cloud")
# Flavours that boot like a brand-new Compute Engine VM (-> their Debian suite): no Podman,
# apt-daily and unattended-upgrades on, the login user made late by a stand-in of Google's
# guest agent, the startup-script metadata run at boot (tasks/sandbox/guest-cloud/)
CLOUD = {"bookworm-cloud": "bookworm"}
PODMAN_PACKAGES = frozenset("podman crun iptables uidmap netavark aardvark-dns slirp4netns "
                            "catatonit passt nftables".split())
CLOUD_PACKAGES = ("unattended-upgrades",)
BASE_IMAGE = "localhost/nightguard-base:latest"
BASE_TAR_IN_GUEST = "/var/lib/nightguard-sandbox/base.tar"  # readable by all: rootless imports it
HOSTKEY_BEGIN = "-----BEGIN NIGHTGUARD HOST KEY-----"
HOSTKEY_END = "-----END NIGHTGUARD HOST KEY-----"
DISK_SIZE = "10G"  # an e2-micro's default boot disk; the file is sparse

# Podman's recommends are listed explicitly: mmdebstrap installs no recommends.
PACKAGES = tuple(
    "linux-image-cloud-amd64 systemd systemd-sysv dbus dbus-user-session libnss-myhostname"
    " openssh-server sudo python3 rsync ca-certificates procps iproute2"
    " podman crun iptables uidmap netavark aardvark-dns slirp4netns catatonit".split()
)
# Debian 13: pasta is rootless Podman 5's network; netavark 1.14 drives nftables, not iptables
EXTRA_PACKAGES = {"bookworm": (), "trixie": ("passt", "nftables"), "bookworm-cloud": ()}
# What python:3.x-slim gives an agent: pip and venv, wheels only (no compiler)
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "ca-certificates")
# The laptop's own extra certificate authorities: the guest and the app image reach the
# package mirrors and PyPI the way the laptop does (through the same proxy, if any).
LOCAL_CA_DIR = Path("/usr/local/share/ca-certificates")
GUEST_CA_DIR = "/usr/local/share/ca-certificates/nightguard-laptop"
# Smaller image, faster mkfs and boot; nothing in the guest reads these.
DPKG_EXCLUDES = ("/usr/share/man/*", "/usr/share/doc/*", "/usr/share/locale/*", "/usr/share/info/*")

GUEST_FILES = Path(__file__).with_name("guest")  # copied into the guest's root
CLOUD_FILES = Path(__file__).with_name("guest-cloud")  # and these into a cloud flavour's
# BASE_IMAGE, BASE_TAR_IN_GUEST, HOSTKEY_* and BUILD_OK appear in those files too (a unit
# test checks that they agree).
BUILD_OK = "NIGHTGUARD-BUILD-OK"  # ng-build-finish prints it when the build-time boot worked


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(root) / "nightguard-deploy"


def mirror() -> str:
    return os.environ.get("NG_SANDBOX_MIRROR", "http://deb.debian.org/debian")


def recipe_key(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def local_cas(folder: Path = LOCAL_CA_DIR) -> dict[str, str]:
    """{file name: PEM text} of the laptop's extra CAs (none on most laptops)."""
    if not folder.is_dir():
        return {}
    return {p.name: p.read_text() for p in sorted(folder.rglob("*.crt")) if p.is_file()}


def base_recipe() -> dict:
    return {
        "version": BASE_RECIPE_VERSION,
        "suite": "bookworm",
        "variant": "apt",
        "packages": list(BASE_PACKAGES),
        "cas": local_cas(),
    }


def guest_files(root: Path = GUEST_FILES) -> dict[str, tuple[int, str]]:
    """{guest path: (mode, text)} from the tree in tasks/sandbox/guest/."""
    files = {}
    for path in sorted(p for p in root.rglob("*")
                       if p.is_file() and "__pycache__" not in p.parts):
        guest = "/" + path.relative_to(root).as_posix()
        mode = 0o755 if os.access(path, os.X_OK) else 0o644
        files[guest] = (0o440 if guest.startswith("/etc/sudoers.d/") else mode, path.read_text())
    return files


def image_recipe(flavour: str, pubkey: str, base_key: str) -> dict:
    """Everything that decides the image's content; its hash names the cache entry."""
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown os flavour {flavour!r}: choose one of {', '.join(FLAVOURS)}")
    if flavour in CLOUD:
        return cloud_recipe(flavour, base_key)
    files = guest_files()
    files["/home/ubuntu/.ssh/authorized_keys"] = (0o600, pubkey.strip() + "\n")
    for name, text in local_cas().items():
        files[f"{GUEST_CA_DIR}/{name}"] = (0o644, text)
    return {
        "version": RECIPE_VERSION,
        "suite": flavour,
        "variant": "apt",
        "disk_size": DISK_SIZE,
        "packages": sorted(PACKAGES + EXTRA_PACKAGES[flavour]),
        "base_tar": base_key,
        "pre": [
            ["useradd", "-m", "-s", "/bin/bash", "-G", "sudo", "ubuntu"],
            ["usermod", "-p", "*", "ubuntu"],
        ],  # '*': no password, yet not locked for sshd
        "files": {path: [mode, text] for path, (mode, text) in sorted(files.items())},
        "post": [
            ["chown", "-R", "ubuntu:ubuntu", "/home/ubuntu/.ssh"],
            ["chmod", "700", "/home/ubuntu/.ssh"],
            "systemctl enable systemd-networkd ng-hostkeys ng-import-base".split(),
            ["update-ca-certificates"],
            # unattended apt runs would only compete with the tests for the 2 vCPUs
            ["systemctl", "mask", "apt-daily.timer", "apt-daily-upgrade.timer"],
            ["sh", "-c", "rm -f /etc/ssh/ssh_host_*"],
        ],
    }


def cloud_recipe(flavour: str, base_key: str) -> dict:
    """A new Compute Engine VM's first boot: no Podman (Google's images have none), apt's
    timers and unattended-upgrades on, no login user (the guest agent's stand-in makes it
    from the ssh-keys metadata, late), the startup-script metadata run at boot. No build
    boot: there is no Podman to import the base image into; the deploy imports the tar."""
    files = {path: entry for path, entry in guest_files().items()
             if path not in ("/etc/sudoers.d/ubuntu", "/usr/local/sbin/ng-import-base",
                             "/etc/systemd/system/ng-import-base.service")
             and "ng-build" not in path}
    files.update(guest_files(CLOUD_FILES))
    for name, text in local_cas().items():
        files[f"{GUEST_CA_DIR}/{name}"] = (0o644, text)
    suite = CLOUD[flavour]
    packages = [p for p in PACKAGES + EXTRA_PACKAGES[flavour] if p not in PODMAN_PACKAGES]
    return {
        "version": RECIPE_VERSION,
        "suite": suite,
        "variant": "apt",
        "disk_size": DISK_SIZE,
        "packages": sorted(packages + list(CLOUD_PACKAGES)),
        "base_tar": base_key,
        "pre": [],
        "files": {path: [mode, text] for path, (mode, text) in sorted(files.items())},
        "post": [
            ("systemctl enable systemd-networkd ng-hostkeys google-guest-agent "
             "google-startup-scripts ng-memwatch apt-daily.timer "
             "apt-daily-upgrade.timer").split(),
            ["update-ca-certificates"],
            ["/usr/local/sbin/ng-drill-repo"],
            ["sh", "-c", "rm -f /etc/ssh/ssh_host_* /var/lib/systemd/random-seed "
                         "&& : > /etc/machine-id"],
        ],
        "prepare": False,
    }


def mmdebstrap_argv(
    suite: str, packages, target: str, mirror_url: str, excludes=DPKG_EXCLUDES, hooks=()
) -> list[str]:
    argv = [
        "mmdebstrap",
        "--variant=apt",
        "--mode=root",
        '--aptopt=Acquire::Retries "5"',
        '--aptopt=Acquire::http::Timeout "30"',
        f"--include={','.join(packages)}",
    ]
    argv += [f"--dpkgopt=path-exclude={glob}" for glob in excludes]
    # keep copyright files: licences travel with the binaries
    if excludes:
        argv.append("--dpkgopt=path-include=/usr/share/doc/*/copyright")
    argv += [f"--customize-hook={hook}" for hook in hooks]
    return argv + [suite, target, mirror_url]


def mkfs_argv(rootfs: str, image: str, size: str = DISK_SIZE) -> list[str]:
    return ["mkfs.ext4", "-q", "-F", "-L", "ngroot", "-d", rootfs, image, size]


def prepare_argv(image_dir: str, console: str) -> list[str]:
    """QEMU boot of the raw image that runs ng-build.target once, then powers off.
    Multi-threaded TCG can crash a booting kernel while it patches its own code ("Oops:
    int3", rare): the kernel then reboots, QEMU (-no-reboot) exits, the boot is retried."""
    machine = "-nodefaults -no-user-config -accel tcg,thread=multi -cpu max -m 1024 -smp 2"
    cmdline = "root=/dev/vda rw console=ttyS0 net.ifnames=0 panic=-1 systemd.unit=ng-build.target"
    return [
        "qemu-system-x86_64", *machine.split(), "-display", "none", "-no-reboot",
        "-kernel", f"{image_dir}/vmlinuz", "-initrd", f"{image_dir}/initrd.img", "-append", cmdline,
        "-drive", f"file={image_dir}/disk.img,format=raw,if=virtio,cache=unsafe",
        "-serial", f"file:{console}",
    ]  # fmt: skip


def _run(argv: list[str], log, attempts: int = 1, timeout: float = 1800) -> None:
    for attempt in range(1, attempts + 1):
        log.write(f"+ {' '.join(argv)}\n")
        log.flush()
        try:
            rc = subprocess.run(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=timeout,
            ).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        if rc == 0:
            return
        if attempt < attempts:
            time.sleep(5)
    raise RuntimeError(f"{argv[0]} failed (exit {rc}); see {cache_dir() / 'failed'}")


@contextlib.contextmanager
def _lock(name: str):
    path = cache_dir() / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # a second builder waits, then finds the result
        yield


def _build_atomically(final: Path, build, label: str) -> Path:
    """Runs build(tmpdir, log) unless `final` exists; renames tmpdir to `final` on success."""
    if final.is_dir():
        return final
    with _lock(final.name):
        if final.is_dir():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in final.parent.glob(f".tmp-{final.name}-*"):  # left by a killed build
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
        started = time.monotonic()
        print(
            f"sandbox: building {label} (once per machine and recipe; log {tmp}/build.log)",
            flush=True,
        )
        try:
            with open(tmp / "build.log", "w") as log, \
                    Step("sandbox", f"building {label}", every=15):
                build(tmp, log)
            os.rename(tmp, final)
        except BaseException:
            logs = cache_dir() / "failed"  # the logs outlive the half-built folder
            logs.mkdir(parents=True, exist_ok=True)
            for kept in tmp.glob("*.log"):
                shutil.copyfile(kept, logs / f"{final.name}-{kept.name}")
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        print(f"sandbox: built {label} in {time.monotonic() - started:.0f} s", flush=True)
        return final


def ssh_key() -> Path:
    """The machine's sandbox login key (ed25519, 0600), made on first use."""
    key = cache_dir() / "ssh" / "id_ed25519"
    if key.exists() and key.with_suffix(".pub").exists():
        return key
    key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with _lock("ssh-key"):
        if not key.exists():
            tmp = key.parent / f".tmp-{os.getpid()}"
            subprocess.run(
                [
                    "ssh-keygen",
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-C",
                    "nightguard-sandbox",
                    "-f",
                    str(tmp),
                ],
                check=True,
                stdin=subprocess.DEVNULL,
            )
            os.rename(f"{tmp}.pub", f"{key}.pub")
            os.rename(tmp, key)  # the private key last: it marks the pair complete
    os.chmod(key, 0o600)
    return key


def base_tar() -> Path:
    recipe = base_recipe()
    final = cache_dir() / "base" / recipe_key(recipe)

    def build(tmp: Path, log) -> None:
        hooks = []
        if recipe["cas"]:
            cas = tmp / "cas"
            cas.mkdir()
            for name, text in recipe["cas"].items():
                (cas / name).write_text(text)
            hooks = [f'mkdir -p "$1{GUEST_CA_DIR}"',
                     f'cp {cas}/*.crt "$1{GUEST_CA_DIR}/"',
                     'chroot "$1" update-ca-certificates']
        _run(mmdebstrap_argv(recipe["suite"], recipe["packages"], str(tmp / "base.tar"),
                             mirror(), hooks=hooks), log, 2)
        (tmp / "recipe.json").write_text(json.dumps(recipe, indent=1, sort_keys=True))

    return _build_atomically(final, build, "the app base image (bookworm, python3, pip)") \
        / "base.tar"


def current_recipe(flavour: str) -> tuple[dict, str]:
    pubkey = ssh_key().with_suffix(".pub").read_text()
    recipe = image_recipe(flavour, pubkey, recipe_key(base_recipe()))
    return recipe, recipe_key(recipe)


def image_dir(flavour: str) -> Path:
    recipe, key = current_recipe(flavour)
    return cache_dir() / "images" / f"{flavour}-{key}"


def ensure_image(flavour: str) -> Path:
    """Folder with disk.img, vmlinuz, initrd.img for `flavour`; builds it if missing."""
    recipe, key = current_recipe(flavour)
    final = cache_dir() / "images" / f"{flavour}-{key}"
    if final.is_dir():
        return final
    support.require_build(cache_dir())  # one line, not a failed mmdebstrap, where it cannot
    tar = base_tar()

    def build(tmp: Path, log) -> None:
        root = tmp / "rootfs"
        _run(mmdebstrap_argv(recipe["suite"], recipe["packages"], str(root), mirror()), log, 2)
        for argv in recipe["pre"]:
            _run(["chroot", str(root), *argv], log)
        for path, (mode, text) in recipe["files"].items():
            dest = root / path.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.is_symlink():
                dest.unlink()  # e.g. a resolv.conf link: write a plain file instead
            dest.write_text(text)
            os.chmod(dest, mode)
        for argv in recipe["post"]:
            _run(["chroot", str(root), *argv], log)
        guest_tar = root / BASE_TAR_IN_GUEST.lstrip("/")
        guest_tar.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tar, guest_tar)
        # QEMU boots kernel and initrd directly: no bootloader in the image
        shutil.copyfile(sorted((root / "boot").glob("vmlinuz-*"))[-1], tmp / "vmlinuz")
        shutil.copyfile(sorted((root / "boot").glob("initrd.img-*"))[-1], tmp / "initrd.img")
        _run(mkfs_argv(str(root), str(tmp / "disk.img"), recipe["disk_size"]), log)
        shutil.rmtree(root)
        console = tmp / "prepare-console.log"
        prepare = recipe.get("prepare", True)  # a cloud flavour has no build boot
        for _attempt in range(3 if prepare else 0):  # a kernel panic under TCG: boot again
            _run(prepare_argv(str(tmp), str(console)), log, timeout=1200)
            if BUILD_OK in console.read_text(errors="replace"):
                break
            shutil.copyfile(console, tmp / f"prepare-console-{_attempt}.log")
        else:
            if prepare:
                raise RuntimeError(f"preparing the image failed; see {cache_dir() / 'failed'}")
        (tmp / "recipe.json").write_text(json.dumps(recipe, indent=1, sort_keys=True))

    _build_atomically(final, build, f"the {flavour} sandbox image")
    prune(final)  # only after a build: a cache hit never removes anything
    return final


KEEP_IMAGES = 2  # per flavour: two checkouts on one machine (two branches) can coexist


def prune(keep: Path) -> None:
    """Removes the older images of keep's flavour (about 1 GB each) beyond the newest
    KEEP_IMAGES. A VM running on one keeps its open files; a stopped sandbox on one gets a
    new disk at its next start."""
    flavour = keep.name.rsplit("-", 1)[0]
    others = sorted((p for p in keep.parent.glob(f"{flavour}-*") if p.is_dir() and p != keep),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for old in others[KEEP_IMAGES - 1:]:
        shutil.rmtree(old, ignore_errors=True)
