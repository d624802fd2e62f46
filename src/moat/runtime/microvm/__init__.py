"""The microvm isolation tier: one QEMU ``microvm`` guest kernel per sandbox.

Trust domain: host engine (privileged). The guest's own boot code lives in ``moat.guest``
(sandbox domain); ``initramfs.py`` copies it into the guest. Layout: ``qemu.py`` pure argv
builder; ``driver.py`` the Runtime; ``snapshot.py`` base VM save/restore; ``probe.py``
KVM/TCG decision; ``setup.py`` one-time download and build (``kernel.py``, ``initramfs.py``,
``cpio.py``, ``usrimage.py``) into ``artifacts.py``'s state directory.
"""

from moat.runtime.microvm.driver import MicroVMProcess, MicroVMRuntime

__all__ = ["MicroVMProcess", "MicroVMRuntime"]
