"""moat's host-side store: SQLite and files under the state directory (keys, tenants, audit)."""
