"""Measures the sandbox VM: median seconds of
    cold image build     (only with --cold: builds into a throw-away cache folder)
    up, fresh disk       from nothing (image cached) to ssh answering: what an e2e run pays
    up, existing disk    from `down` to ssh answering
    reboot               from `systemctl reboot` to ssh answering again
Usage: .venv/bin/python bench/sandbox_bench.py [--os bookworm trixie] [--runs 3] [--cold]
Writes the figures to bench/results/sandbox-<time>.json too (gitignored).
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.sandbox import image, qemu  # noqa: E402
from tasks.sandbox import machine as sb  # noqa: E402


def timed(fn, *args, **kwargs) -> float:
    started = time.monotonic()
    fn(*args, **kwargs)
    return time.monotonic() - started


def cold_build(flavour: str) -> float:
    """A whole build (base tar, mmdebstrap, mkfs, preparation boot) in an empty cache."""
    saved = os.environ.get("XDG_CACHE_HOME")
    tmp = tempfile.mkdtemp(prefix="ng-bench-cache-")
    os.environ["XDG_CACHE_HOME"] = tmp
    try:
        return timed(image.ensure_image, flavour)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if saved is None:
            os.environ.pop("XDG_CACHE_HOME", None)
        else:
            os.environ["XDG_CACHE_HOME"] = saved


def warm(flavour: str, runs: int) -> dict:
    name = f"bench-{flavour}"
    image.ensure_image(flavour)  # not measured here
    fresh, again, reboots = [], [], []
    try:
        for _ in range(runs):
            fresh.append(timed(sb.ensure_up, name, flavour, fresh=True, timeout=900))
        for _ in range(runs):
            sb.down(name)
            again.append(timed(sb.ensure_up, name, flavour, timeout=900))
        for _ in range(runs):
            reboots.append(timed(sb.reboot, name, timeout=900))
    finally:
        sb.down(name, destroy=True)
    return {"up_fresh_disk": fresh, "up_existing_disk": again, "reboot": reboots}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--os", nargs="+", default=["bookworm"], choices=image.FLAVOURS)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--cold", action="store_true", help="also time cold image builds (minutes each)"
    )
    parser.add_argument("--cold-runs", type=int, default=1)
    args = parser.parse_args()
    results = {}
    for flavour in args.os:
        figures = {}
        if args.cold:
            figures["cold_build"] = [cold_build(flavour) for _ in range(args.cold_runs)]
        figures.update(warm(flavour, args.runs))
        results[flavour] = figures
        for what, values in figures.items():
            print(
                f"{flavour:9} {what:17} median {statistics.median(values):6.1f} s   "
                f"runs: {' '.join(f'{v:.1f}' for v in values)}",
                flush=True,
            )
    out = ROOT / "bench" / "results" / f"sandbox-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"accel": qemu.choose_accel(), "cores": os.cpu_count(), "results": results}, indent=1
        )
    )
    print(f"written to {out}")


if __name__ == "__main__":
    main()
