"""Template build benchmark: the default templates from scratch and cached, and disk used.

    .venv/bin/python bench/bench_template_build.py [--dir /var/tmp/moat-bench-templates]

Builds ``base`` then ``code-interpreter`` (moat.templates.defaults) into a fresh store (an
empty layer cache: mmdebstrap, apt and the publishing copy all run), then both again
(unchanged: every layer is a cache hit), and prints wall times, each template's root size
and the layer cache's size. Reads MOAT_UNSAFE_BUILD_NETWORKS / MOAT_BUILD_CA_FILE like
``moat template build`` (docs/templates.md, for hosts behind a site mirror or proxy).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from moat.templates.build import Builder, BuildOptions
from moat.templates.defaults import DEFAULTS
from moat.templates.store import Store, remove_tree, tree_bytes


async def run(store: Store) -> None:
    builder = Builder(store, BuildOptions.from_env(), on_output=lambda b: None)
    for label in ("scratch", "cached"):
        for defn, names in DEFAULTS:
            t0 = time.perf_counter()
            ref = await builder.build(defn, names[0])
            dt = time.perf_counter() - t0
            ran = len(builder.ran)
            print(
                f"{names[0]:<17} {label:<8} {dt:8.2f} s   steps run {ran}"
                f"   root {tree_bytes(ref.rootfs) / 2**20:7.1f} MiB",
                flush=True,
            )
    print(f"layer cache       {tree_bytes(store.layers) / 2**20:7.1f} MiB", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/var/tmp/moat-bench-templates")
    ap.add_argument("--keep", action="store_true", help="Keep the store afterwards.")
    args = ap.parse_args()
    top = Path(args.dir)
    if top.exists():
        remove_tree(top)
    top.mkdir(parents=True)
    try:
        asyncio.run(run(Store(top / "templates", top / "layers")))
    finally:
        if not args.keep:
            remove_tree(top)


if __name__ == "__main__":
    main()
