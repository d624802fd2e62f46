"""Set up the gvisor tier ahead of the first sandbox: ``python -m moat.runtime.gvisor.setup``.

Builds the statx compatibility library (:mod:`moat.runtime.gvisor.compat`) into the state
directory, so that no sandbox start compiles it. Exits 1 when it can't be built.
"""

from __future__ import annotations

from moat.runtime.gvisor import compat


def main() -> int:
    built = compat.build()
    print(built if built is not None else "gvisor compat library not built: no working C compiler")
    return 0 if built is not None else 1


if __name__ == "__main__":
    raise SystemExit(main())
