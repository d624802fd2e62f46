"""The gvisor tier: each sandbox is a ``runsc run`` of an OCI bundle built from its spec.

Trust domain: host engine. gVisor's sentry is the sandbox's kernel: sandboxed code's syscalls
never reach the host kernel directly; the sentry and its file proxy (the gofer) run as host
processes confined by runsc (namespaces, seccomp, an unprivileged uid) inside a host cgroup that
carries the sandbox's limits.

Modules: :mod:`~moat.runtime.gvisor.oci` (pure spec -> OCI config), ``rootfs`` (the root
skeleton), ``rootcache`` (a template's skeleton, shared), ``hostcg`` (the host cgroup, from
outside), ``hostproc`` (runsc processes of one state root), ``probe`` (bounded availability
check), ``channel`` (the agent's pipes), ``checkpoint`` (runsc checkpoint images and their
manifest), ``fscopy`` (files-only saves), ``driver`` (the Runtime and Checkpointable).
"""

from moat.runtime.gvisor.driver import GvisorRuntime, GvisorSandbox
from moat.runtime.gvisor.oci import Bundle, build_config

__all__ = ["Bundle", "GvisorRuntime", "GvisorSandbox", "build_config"]
