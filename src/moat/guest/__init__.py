"""The microVM guest's boot code: runs INSIDE the VM, stdlib only.

Trust domain: sandbox. ``init.py`` (the guest's /init script, kept as a constant) and
``boot.py`` (stage 2, which becomes the agent) run as guest root before any untrusted code;
they have no authority over the host beyond the devices QEMU gives the VM. The host's
initramfs builder (``moat.runtime.microvm.initramfs``) copies them into the guest; they are
not part of the privileged ``moat.runtime`` package, and not copied into container or gVisor
sandboxes (``moat.runtime.agentdir`` copies only ``protocol`` and ``agent``).
"""
