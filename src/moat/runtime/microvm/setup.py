"""One-time setup of the microVM tier: ``python -m moat.runtime.microvm.setup``.

Trust domain: host engine (run by the operator, as root: apt and mke2fs need it). Downloads
the cloud kernel apt offers, extracts vmlinux and the guest modules, builds the base
initramfs and the read-only /usr image, and installs them atomically into the state
directory. Nothing is downloaded when a sandbox starts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

from moat.errors import SandboxError
from moat.runtime.microvm import artifacts, initramfs, kernel, usrimage


def run_setup(*, force: bool = False, log: bool = True) -> artifacts.Artifacts:
    """Build and install the artifacts unless a complete set exists (or ``force``)."""
    current = artifacts.load()
    if current is not None and not force:
        return current
    base = artifacts.root()
    build = Path(tempfile.mkdtemp(prefix=".build-", dir=base))
    t0 = time.monotonic()

    def say(msg: str) -> None:
        if log:
            print(f"[{time.monotonic() - t0:6.1f}s] {msg}", flush=True)

    try:
        package = kernel.image_package()
        say(f"downloading {package}")
        tree = kernel.download_and_unpack(package, build / "deb")
        release = kernel.release_of(tree)
        vmlinuz = (tree / "boot" / f"vmlinuz-{release}").read_bytes()
        vmlinux = kernel.extract_vmlinux(vmlinuz)
        (build / "vmlinux").write_bytes(vmlinux)
        modules = kernel.collect_modules(tree, release)
        say(f"kernel {release}: vmlinux {len(vmlinux) >> 20} MiB, {len(modules)} modules")
        initrd = initramfs.build_base(modules)
        (build / "initrd-base.cpio").write_bytes(initrd)
        shutil.rmtree(build / "deb")
        say(f"initramfs {len(initrd) >> 10} KiB; building the /usr image (takes a while)")
        usrimage.build(Path("/usr"), build / "usr.img", build / "scratch")
        say(f"/usr image {(build / 'usr.img').stat().st_size >> 20} MiB")
        manifest = {
            "version": artifacts.MANIFEST_VERSION,
            "package": package,
            "kernel_release": release,
            "vmlinux_sha256": hashlib.sha256(vmlinux).hexdigest(),
            "initrd_sha256": hashlib.sha256(initrd).hexdigest(),
            # The image is too big to hash on every start; a build id keys snapshots to it.
            "usr_image_id": uuid.uuid4().hex,
            "built": int(time.time()),
        }
        (build / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        for p in build.iterdir():
            p.chmod(0o644)
        build.chmod(0o755)
        old = base / "artifacts"
        if old.exists():
            os.rename(old, base / f".old-{uuid.uuid4().hex[:8]}")
        os.rename(build, old)
        # Caches keyed to the old artifacts are dead weight now (running VMs keep their fds).
        stale = [*base.glob(".old-*"), base / "snapshots", base / "initrd", base / "kvm-probe.json"]
        for path in stale:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        say("done")
    finally:
        shutil.rmtree(build, ignore_errors=True)
    result = artifacts.load()
    if result is None:
        raise SandboxError("microvm setup did not complete")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moat.runtime.microvm.setup")
    parser.add_argument("--force", action="store_true", help="rebuild even if set up")
    args = parser.parse_args(argv)
    try:
        arts = run_setup(force=args.force)
    except SandboxError as exc:
        print(f"microvm setup failed: {exc}", file=sys.stderr)
        return 1
    print(f"microvm tier ready: kernel {arts.kernel_release}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
