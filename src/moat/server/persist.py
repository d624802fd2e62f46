"""What the server keeps with a paused sandbox, and its record again on resume (issue 11).

Only non-secret, wire-facing names travel with the paused state (``FrontDoor.pause(face=)``):
the template id, the network fields as E2B shows them, public traffic. Access tokens are
never written down: while this server runs, a paused sandbox's record (its tokens) waits in
memory and comes back with it (as E2B keeps them); after a restart a resumed sandbox gets
fresh ones (E2B's connect reply carries them) and those of before stay dead.
"""

from __future__ import annotations

from typing import Any

from moat.server.app import Record, ServerState
from moat.server.secrets import stored_again


def face_of(rec: Record) -> dict[str, Any]:
    return {
        "template_id": rec.template_id,
        "network": dict(rec.network),
        "public_traffic": rec.public_traffic,
        "stored_secrets": dict(rec.stored),  # names and bindings only, never a value
    }


def record_of(tenant: str, face: dict[str, Any], token: str, traffic: str) -> Record:
    network = face.get("network")
    rec = Record(
        tenant,
        token,
        traffic,
        str(face.get("template_id") or "base"),
        dict(network) if isinstance(network, dict) else {},
    )
    rec.public_traffic = face.get("public_traffic") is True
    kept = face.get("stored_secrets")
    rec.stored = dict(kept) if isinstance(kept, dict) else {}
    return rec


def stored_values(state: ServerState, tenant: str, face: dict[str, Any]) -> dict[str, str] | None:
    """The stored secrets' values a paused sandbox needs to resume after a restart (None:
    it has none); PolicyError when one was deleted or rebound since."""
    kept = face.get("stored_secrets")
    if not isinstance(kept, dict) or not kept:
        return None
    return stored_again(state.secret_store, tenant, kept) or None


def resumed_record(state: ServerState, tenant: str, sid: str, face: dict[str, Any]) -> Record:
    """The record of a sandbox just resumed: the one it paused with, else fresh tokens."""
    rec = state.paused.pop(sid, None)
    if rec is not None and rec.tenant == tenant:
        return rec
    return record_of(tenant, face, state.new_token(), state.new_token())


async def pause(state: ServerState, tenant: str, sid: str) -> None:
    """Pause a sandbox for a face other than E2B's wire (the dashboard): the most the tier
    keeps (memory where it can), the sandbox's E2B record kept for its resume."""
    rec = state.record(tenant, sid)
    memory = state.front.keeps_memory(tenant, sid)
    await state.front.pause(tenant, sid, memory, face=face_of(rec) if rec is not None else None)
    state.records.pop(sid, None)


async def resume(state: ServerState, tenant: str, sid: str) -> None:
    """Resume a paused sandbox (the dashboard), its E2B record rebuilt as connect does."""
    face = await state.front.face_data(tenant, sid)
    values = None if face is None else stored_values(state, tenant, face)
    await state.front.connect(tenant, sid, secrets=values)
    if face is not None and state.record(tenant, sid) is None:
        state.records[sid] = resumed_record(state, tenant, sid, face)
        if not await state.front.is_running(tenant, sid):
            state.forget(sid)  # it ended before its record was in: no leak
