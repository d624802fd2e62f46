"""moat on a Ray cluster: many hosts behind one server (``pip install 'moat[cluster]'``).

Trust domain: host engine, a face and placement layer ABOVE the engine. A *node* is one
long-lived Ray actor per machine hosting moat's unchanged front door (runtimes, egress
gateway, guard, audit, pool, sweep); the clustered server reserves one placement-group
bundle per sandbox, records sandbox -> node and routes every call for it to that node.
Frames, the gateway and the guard stay on the node: only guarded results cross the
cluster (invariant 4). Nothing below this package imports it, and ``ray`` is imported
only by the modules that need it (``resources`` is pure and importable without Ray).

Modules: ``resources`` (pure: advertised resources, bundles), ``raycfg`` (Ray settings:
usage stats off, health checks, small footprint), ``node`` (the node actor and its
streams), ``door`` (the server's cluster front door), ``launch`` (``moat node`` and the
head of ``moat serve --cluster``), ``auditmerge`` (``moat audit --cluster``).
"""
