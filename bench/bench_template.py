"""Benchmark sandboxes on a built template vs the ``host`` template, per tier (issue 12).

Measures, in the same run and interleaved (host, template, host, template...):
  create -> first ``run_code`` result (``1+1``) through the public SDK, per tier;
and disk per template: the root's size (``du``, apparent and allocated) and the microVM image.
The first sandbox of each (template, tier) pair is a warm-up and not counted: it may build the
microVM image and booted snapshot, which are cached per template (reported separately).

The template is the test suite's Debian root (tests/template_support.py: mmdebstrap, cached),
or with ``--template NAME`` a built one (``code-interpreter``: the default, issue 12).

Usage: python bench/bench_template.py [-n 5] [--tiers container,gvisor,microvm] [--template N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.template_support

from tests import template_support

from moat import Sandbox
from moat.runtime.microvm import rootimage
from moat.templates import ref

NAME = "bench-debian"


def create_to_result(template: str, tier: str) -> float:
    t0 = time.monotonic()
    with Sandbox.create(template=template, isolation=tier, timeout=300) as s:
        text = s.run_code("1+1").text
        took = time.monotonic() - t0
    assert text == "2", text
    return took


def _du(path: Path, apparent: bool) -> int:
    argv = ["du", "-s", "--block-size=1", *(["--apparent-size"] if apparent else []), str(path)]
    return int(subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split()[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=5)
    ap.add_argument("--tiers", default="container,gvisor,microvm")
    ap.add_argument("--template", default=None, help="a built template (default: the test root)")
    args = ap.parse_args()
    os.environ.setdefault("MOAT_WARM_POOL", "0")
    name = args.template or NAME
    built = ref.find(name) if args.template else template_support.install(NAME)
    if built is None:
        sys.exit(f"template {name!r} is not built (moat template build --defaults)")
    found = built
    print(f"template {name}: {found.id[:12]}..., root {found.rootfs}")
    for tier in args.tiers.split(","):
        runs: dict[str, list[float]] = {"host": [], name: []}
        for which in runs:  # warm-up: builds the image and snapshot on first use
            took = create_to_result(which, tier)
            print(f"{tier:9} {which:16} first use (warm-up) {took:6.2f} s")
        for _ in range(args.n):
            for which, times in runs.items():
                times.append(create_to_result(which, tier))
        for which, times in runs.items():
            print(
                f"{tier:9} {which:16} create->first result median {statistics.median(times):6.3f} s"
                f"  range {min(times):.3f}-{max(times):.3f}  (n={len(times)})"
            )
    root = found.rootfs
    print(
        f"disk: root {_du(root, True) / 2**20:.0f} MiB apparent, "
        f"{_du(root, False) / 2**20:.0f} MiB allocated (hard links to the test cache: "
        "a built template owns its files)"
    )
    image = root.parent / rootimage.IMAGE
    if image.exists():
        print(
            f"disk: microVM image {image.stat().st_size / 2**20:.0f} MiB apparent, "
            f"{_du(image, False) / 2**20:.0f} MiB allocated"
        )


if __name__ == "__main__":
    main()
