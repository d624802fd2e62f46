"""The microvm isolation tier: one QEMU ``microvm`` guest kernel per sandbox.

Trust domain: host engine (privileged), except ``guest_boot.py`` and ``guest_init.py``, which
are copied into the guest's initramfs and run *inside* the VM (sandbox domain, as guest root,
before any untrusted code). Layout: ``qemu.py`` pure argv builder; ``driver.py`` the Runtime;
``snapshot.py`` template save/restore; ``probe.py`` KVM/TCG decision; ``setup.py`` one-time
download and build (``kernel.py``, ``initramfs.py``, ``cpio.py``, ``usrimage.py``) into
``artifacts.py``'s state directory.
"""

from moat.runtime.microvm.driver import MicroVMProcess, MicroVMRuntime

__all__ = ["MicroVMProcess", "MicroVMRuntime"]
