"""Privileged host side: start and stop isolated process trees, hand back a byte stream.

Trust domain: host engine. Drivers (container/, gvisor/, microvm/) only start and stop an
isolated process tree whose first process is the moat agent, and give the engine a byte stream
to it. Everything else (protocol, execution, files, egress, guard) is shared across tiers.
"""
