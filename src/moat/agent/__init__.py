"""The moat agent: runs INSIDE every sandbox, stdlib only.

Trust domain: sandbox (hostile). Assume it is compromised from the first instruction of user
code; the host validates everything it says (DESIGN invariant 6). It must still be correct
and robust, because an honest agent is how users get their work done.
"""
