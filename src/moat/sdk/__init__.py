"""The caller-facing SDK: ``Sandbox`` (sync) and ``AsyncSandbox`` with E2B-shaped models.

Trust domain: caller. Validates every argument before it reaches the engine.
"""
