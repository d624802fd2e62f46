"""A Python builder in the shape of E2B's ``Template()`` where it maps.

::

    from moat.templates.builder import Template

    t = (
        Template()
        .from_debian_image("bookworm")          # or .from_template("base")
        .apt_install(["jq"])
        .pip_install(["six"])
        .copy("app/", "/opt/app")
        .run_cmd("python3 -m compileall -q /opt/app")
        .set_envs({"GREETING": "hi"})
        .set_workdir("/opt/app")
        .set_start_cmd("python3 -m http.server 8000", "curl -sf localhost:8000")
    )
    ref = Template.build(t, alias="web", context_dir=".")

Unlike the TOML file, steps run in the order they are added. ``from_image`` of a registry
image, ``from_dockerfile`` of a remote file, ``skip_cache`` and cloud build options have no
moat counterpart: they raise :class:`TemplateDefinitionError`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path

from moat.errors import TemplateDefinitionError
from moat.templates.build import Builder, Output
from moat.templates.define import Base, Step, TemplateDef
from moat.templates.ref import TemplateRef


class Template:
    """A template definition built up by method calls (each returns the builder)."""

    def __init__(self) -> None:
        self._base = Base("debian", "bookworm")
        self._steps: list[Step] = []
        self._env: dict[str, str] = {}
        self._settings: dict[str, str] = {}

    def from_debian_image(self, variant: str = "bookworm") -> Template:
        self._base = Base.parse(f"debian:{variant}")
        return self

    def from_template(self, template: str) -> Template:
        self._base = Base.parse(f"template:{template}")
        return self

    def from_oci_archive(self, path: str) -> Template:
        """An image tarball or OCI layout in the build context (moat's own name)."""
        self._base = Base.parse(f"oci:{path}")
        return self

    def from_image(self, image: str) -> Template:
        if image.startswith("debian:"):
            return self.from_debian_image(image.partition(":")[2])
        raise TemplateDefinitionError(
            "registry images are not pulled: use from_debian_image, from_template, or"
            " from_oci_archive on an image saved to disk",
            field="from_image",
        )

    def apt_install(self, packages: str | Sequence[str]) -> Template:
        return self._add("apt", packages)

    def pip_install(self, packages: str | Sequence[str]) -> Template:
        return self._add("pip", packages)

    def npm_install(self, packages: str | Sequence[str], g: bool = True) -> Template:
        if not g:
            raise TemplateDefinitionError("only global npm installs", field="npm_install")
        return self._add("npm", packages)

    def copy(self, src: str, dest: str) -> Template:
        self._steps.append(Step("copy", (src, dest)))
        return self

    def run_cmd(self, command: str | Sequence[str], network: Sequence[str] = ()) -> Template:
        cmd = command if isinstance(command, str) else " && ".join(command)
        self._steps.append(Step("run", (cmd,), network=tuple(network)))
        return self

    def set_envs(self, envs: Mapping[str, str]) -> Template:
        self._env.update(envs)
        return self

    def set_workdir(self, workdir: str) -> Template:
        self._settings["workdir"] = workdir
        return self

    def set_user(self, user: str) -> Template:
        self._settings["user"] = user
        return self

    def set_start_cmd(self, start_cmd: str, ready_cmd: str | None = None) -> Template:
        self._settings["start_cmd"] = start_cmd
        if ready_cmd is not None:
            self._settings["ready_cmd"] = ready_cmd
        return self

    def set_ready_cmd(self, ready_cmd: str) -> Template:
        self._settings["ready_cmd"] = ready_cmd
        return self

    def skip_cache(self) -> Template:
        raise TemplateDefinitionError(
            "moat caches by content hash: change a step to rebuild it", field="skip_cache"
        )

    def _add(self, kind: str, packages: str | Sequence[str]) -> Template:
        pkgs = (packages,) if isinstance(packages, str) else tuple(packages)
        self._steps.append(Step(kind, pkgs))  # type: ignore[arg-type]
        return self

    def to_definition(self) -> TemplateDef:
        """The validated definition."""
        return TemplateDef(
            base=self._base,
            steps=tuple(self._steps),
            env=tuple(sorted(self._env.items())),
            **self._settings,
        )

    @staticmethod
    def build(
        template: Template,
        alias: str | None = None,
        context_dir: str | Path | None = None,
        on_build_logs: Output | None = None,
    ) -> TemplateRef:
        """Build ``template`` (blocking) and name it ``alias``; the built template."""
        builder = Builder(on_output=on_build_logs)
        ctx = Path(context_dir).resolve() if context_dir is not None else None
        return asyncio.run(builder.build(template.to_definition(), alias, ctx))
