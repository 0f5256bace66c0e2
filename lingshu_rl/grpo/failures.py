"""A role's actor that dies stops the run with a message naming the role, its node and the last checkpoint.

Each actor's node is recorded when the roles start (:func:`record_nodes`): once a node is gone, Ray can no
longer say what ran there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray


class WorkerDied(RuntimeError):
    """A role's Ray actor died; the message names the role (and, from the controller, its node and the last
    checkpoint)."""

    def __init__(self, message: str, role: str | None = None, actor_id: str | None = None):
        super().__init__(message)
        self.role, self.actor_id = role, actor_id


def get_or_die(refs: Any, role: str) -> Any:
    """``ray.get(refs)``; an actor that died raises :class:`WorkerDied` naming ``role``."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayActorError as err:
        kind = type(getattr(err, "cause", None) or err).__name__  # a group's call wraps it in a RayTaskError
        raise WorkerDied(f"the worker {role!r} died ({kind})", role, err.actor_id) from None


@dataclass(frozen=True)
class Placed:
    """Where one actor runs: ``name`` is the role's name, or ``<role>/rank<r>`` for a rank of a group."""

    name: str
    role: str
    actor_id: str
    node_id: str
    ip: str


def _whereabouts(actor: Any) -> tuple[str, str, str]:
    """Run inside an actor (``__ray_call__``): its actor id, node id and node IP."""
    context = ray.get_runtime_context()
    return str(context.get_actor_id()), context.get_node_id(), ray.util.get_node_ip_address()


def record_nodes(actors: dict[str, tuple[str, Any]]) -> list[Placed]:
    """Ask each actor (actor name -> (role, handle)) where it runs. Raises RuntimeError naming an actor that
    failed to start."""
    refs = {name: handle.__ray_call__.remote(_whereabouts) for name, (_, handle) in actors.items()}
    placed = []
    for name, ref in refs.items():
        try:
            actor_id, node_id, ip = ray.get(ref)
        except ray.exceptions.RayError as err:
            raise RuntimeError(f"the worker {name!r} failed to start: {err}") from None
        placed.append(Placed(name, actors[name][0], actor_id, node_id, ip))
    return placed


def describe_death(err: WorkerDied, placed: list[Placed]) -> str:
    """The node(s) of the actor that died: the one rank Ray named, else every actor of its role."""
    suspects = [p for p in placed if p.actor_id == err.actor_id] or [p for p in placed if p.role == err.role]
    if not suspects:
        return str(err)
    alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    parts = []
    for node_id in dict.fromkeys(p.node_id for p in suspects):
        names = ", ".join(p.name for p in suspects if p.node_id == node_id)
        ip = next(p.ip for p in suspects if p.node_id == node_id)
        state = "which is still alive (see the worker's log)" if node_id in alive else "which has left the Ray cluster"
        parts.append(("" if names == err.role else f"{names} ") + f"on node {ip} (node id {node_id}), {state}")
    separator = " " if len(parts) == 1 and parts[0].startswith("on node") else ": "  # the role alone: no list
    return f"{err}{separator}{'; '.join(parts)}"
