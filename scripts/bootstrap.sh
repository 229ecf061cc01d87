#!/usr/bin/env bash
# Sets up the laptop side on any Unix with Python 3.11+ (Linux, macOS): a virtualenv in
# .venv with this project and its pinned dependencies (pip install -c requirements.txt
# -e '.[dev]'). Where apt-get exists it first installs the Debian packages the local
# sandbox VM needs; elsewhere it says in one line what the sandbox would need there.
#
#   bash scripts/bootstrap.sh [--no-sandbox]
#   PYTHON=python3.12         the interpreter for .venv (default: python3)
#   NG_BOOTSTRAP_SANDBOX=0    same as --no-sandbox: no Debian packages
#
# Safe to run again: it only installs what is missing or changed. Written for bash 3.2
# too (macOS's).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(qemu-system-x86 qemu-utils mmdebstrap openssh-client openssh-server e2fsprogs rsync ca-certificates)
GET_PYTHON="install Python 3.11 or newer (macOS: brew install python@3.12, or python.org; Debian/Ubuntu: apt-get install python3 python3-venv; Fedora: dnf install python3) or name one with PYTHON=/path/to/python3"
REAL_VM="without the sandbox, deploy to a real VM: .venv/bin/inv deploy --host HOST (or nightguard.target: gcp)"

die() {
    echo "bootstrap: $*" >&2
    exit 1
}

sandbox=yes
case ${NG_BOOTSTRAP_SANDBOX:-1} in
    0 | no | false | off) sandbox=no ;;
esac
while [[ $# -gt 0 ]]; do
    case $1 in
        --no-sandbox) sandbox=no ;;
        -h | --help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "bootstrap: unknown argument '$1' (only --no-sandbox)" >&2; exit 2 ;;
    esac
    shift
done

as_root() {
    if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

# Prints the interpreter's X.Y and fails if it is older than 3.11 (Python 2 says 2.7 too).
python_version() {
    "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2]); sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

# Python first: without it nothing else is of use.
python=${PYTHON:-python3}
command -v "$python" >/dev/null 2>&1 || die "no '$python' found: $GET_PYTHON"
if ! version=$(python_version "$python"); then
    die "'$python' is Python ${version:-of unknown version}; this project needs 3.11 or newer: $GET_PYTHON"
fi

# The sandbox's system packages: only through apt, only when wanted.
if [[ $sandbox == no ]]; then
    echo "bootstrap: skipping the sandbox's Debian packages (--no-sandbox); $REAL_VM"
elif command -v apt-get >/dev/null 2>&1 && command -v dpkg-query >/dev/null 2>&1; then
    missing=()
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        if [[ $(id -u) -ne 0 ]] && ! command -v sudo >/dev/null 2>&1; then
            die "installing the sandbox's Debian packages needs root or sudo; or skip them with --no-sandbox"
        fi
        echo "bootstrap: installing Debian packages: ${missing[*]}"
        as_root apt-get update -qq
        # through env: sudo would drop DEBIAN_FRONTEND from the environment
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
else
    case $(uname -s) in
        Darwin) needs="QEMU (brew install qemu) to boot it, and a Linux host or VM with mmdebstrap to build its image once" ;;
        Linux) needs="qemu-system-x86_64, qemu-img, ssh, ssh-keygen, and for its image (built once, as root) mmdebstrap and mkfs.ext4 (e2fsprogs), from the system's package manager" ;;
        *) needs="QEMU to boot it, and a Linux host or VM with mmdebstrap to build its image once" ;;
    esac
    echo "bootstrap: no apt-get here, so no sandbox packages: the local sandbox VM needs $needs; $REAL_VM"
fi

if [[ -x .venv/bin/python ]]; then
    # a venv made earlier by an older Python cannot take this project
    venv_version=$(python_version .venv/bin/python) ||
        die ".venv has Python ${venv_version:-of unknown version}; remove it (rm -rf .venv) and run this again"
elif ! out=$("$python" -m venv .venv 2>&1); then
    rm -rf .venv # half made: without pip, the next run would skip it
    die "'$python -m venv .venv' failed (Debian/Ubuntu: apt-get install python3-venv): $(printf '%s\n' "$out" | grep -v '^$' | tail -n 1)"
fi
# The project itself (editable: `inv` and the tests use the working tree) with the versions
# pinned in requirements.txt; the dev extra brings the test and lint tools. Skipped when
# neither file changed since the last install: a rerun needs no network (removing
# .venv/.bootstrap-stamp forces a reinstall).
stamp=$(cat pyproject.toml requirements.txt | cksum)
if [[ ! -f .venv/.bootstrap-stamp || $(cat .venv/.bootstrap-stamp) != "$stamp" ]]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check -c requirements.txt -e '.[dev]'
    echo "$stamp" >.venv/.bootstrap-stamp
fi
echo "bootstrap: ready (.venv, Python $(python_version .venv/bin/python))"
