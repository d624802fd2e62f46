"""Templates: a read-only root filesystem plus settings, built once and used by every tier.

Trust domain: host engine; everything a build runs executes in a build sandbox
(:mod:`moat.runtime.container.build`). Modules, from pure to I/O:

- :mod:`~moat.templates.ref`: the on-disk layout of a built template and ``find(name)``
- :mod:`~moat.templates.define`: the definition model, validation, content hashes
- :mod:`~moat.templates.toml_def`, :mod:`~moat.templates.dockerfile`,
  :mod:`~moat.templates.builder`, :mod:`~moat.templates.load`: the front ends
- :mod:`~moat.templates.defaults`: ``base`` and ``code-interpreter``
- :mod:`~moat.templates.context`: staging build-context files and images
- :mod:`~moat.templates.store`: published templates, the layer cache, ``gc``
- :mod:`~moat.templates.build`: the builder (steps in sandboxes, cache, checks, publish)
- :mod:`~moat.templates.commands`: ``moat template build | list | rm | gc``
- :mod:`~moat.templates.e2b`: E2B's build request mapped onto a definition, uploads checked
- :mod:`~moat.templates.tenant`: templates tenants built through the server, their names

See docs/templates.md.
"""
