"""The container tier: Linux namespaces via bubblewrap, seccomp, cgroups (shared kernel)."""

from moat.runtime.container.driver import ContainerRuntime

__all__ = ["ContainerRuntime"]
