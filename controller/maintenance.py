"""Node maintenance: which of a node's VMs a NoExecute taint stops, in what order, and when they come back.

A pure function of the node's taints, what each VM is (priority, tolerations) and where it is (off, held,
overdue), and the clock. Each VM's worker gets a Turn and keeps deciding its own steps; the order across
VMs lives only here, and is read again from the level every time (nothing of a maintenance is remembered
but each VM's status.heldByTaint), so an operator restarted in the middle carries on where it was.

Tolerations match as Kubernetes matches a Pod's (k8s.io/api/core/v1 ToleratesTaint). tolerationSeconds
counts from the taint's timeAdded (the taint manager counts from when it noticed the taint, the same moment
for a running manager; timeAdded also survives an operator restart), or from when this operator first saw a
taint that has none. Unlike a Pod, a VM tolerates the
node.kubernetes.io/* taints unless it asks otherwise: those say the kubelet stopped reporting, and a guest
does not depend on its node's kubelet.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from controller.api import SYSTEM_TAINT_PREFIX, TaintEffect, Toleration, TolerationOperator

Key = tuple[str, str]


@dataclass(frozen=True)
class Taint:
    key: str
    effect: str
    value: str = ""
    time_added: datetime | None = None

    def __str__(self) -> str:
        return f"{self.key}={self.value}:{self.effect}" if self.value else f"{self.key}:{self.effect}"

    @property
    def name(self) -> tuple[str, str, str]:
        """What makes two taints the same one (timeAdded apart)."""
        return (self.key, self.value, self.effect)


def read_taints(node: Mapping[str, Any] | None) -> tuple[Taint, ...]:
    """The NoExecute taints of a Node object (no object: none); other effects only steer a scheduler."""
    if node is None:
        return ()
    taints = []
    for raw in (node.get("spec") or {}).get("taints") or ():
        if raw.get("effect") != TaintEffect.NO_EXECUTE.value or not raw.get("key"):
            continue
        taints.append(Taint(key=raw["key"], effect=raw["effect"], value=raw.get("value") or "", time_added=_time(raw)))
    return tuple(taints)


def _time(taint: Mapping[str, Any]) -> datetime | None:
    """A taint's timeAdded; one that does not read (the API server validates it, a hand-made one may not)
    counts as none: the taint then counts from when the operator saw it, rather than not at all."""
    added = taint.get("timeAdded")
    try:
        return datetime.fromisoformat(added.replace("Z", "+00:00")) if isinstance(added, str) and added else None
    except ValueError:
        return None


def tolerates(toleration: Toleration, taint: Taint) -> bool:
    """Kubernetes' ToleratesTaint: effect (empty matches all), key (empty with Exists matches all), value."""
    if toleration.effect is not None and toleration.effect.value != taint.effect:
        return False
    if toleration.key and toleration.key != taint.key:
        return False
    if toleration.operator is TolerationOperator.EXISTS:
        return True
    return (toleration.value or "") == taint.value


def stop_at(tolerations: Iterable[Toleration], taint: Taint, since: datetime) -> datetime | None:
    """When this NoExecute taint, on the node since `since`, stops a VM with these tolerations; None: never.

    As the taint manager's getMinTolerationTime: the shortest tolerationSeconds of the matching
    tolerations (0 or less: at once); only if none has seconds is the taint tolerated for ever.
    """
    matching = [t for t in tolerations if tolerates(t, taint)]
    if not matching:
        return None if taint.key.startswith(SYSTEM_TAINT_PREFIX) else since
    seconds = [t.toleration_seconds for t in matching if t.toleration_seconds is not None]
    if not seconds:
        return None
    return since + timedelta(seconds=max(0, min(*seconds, 10**9)))


@dataclass(frozen=True)
class Member:
    """One VM of the node as the planner sees it (VMs being deleted or with unreadable specs are not members)."""

    key: Key
    priority: int
    tolerations: tuple[Toleration, ...]
    wants_running: bool  # spec.powerState is not Stopped
    off: bool  # its domain is seen stopped, or there is none
    held_by: str | None  # status.heldByTaint
    overdue: bool = False  # its stop passed the deadline and forcing is off: it holds the next group up


class TurnKind(StrEnum):
    NONE = "None"  # no taint concerns this VM (a VM held before starts now)
    STOP = "Stop"  # stop it (and keep it off) for `taint`
    WAIT = "Wait"  # `taint` stops it once its group's turn comes: neither stop nor start it yet
    START_LATER = "StartLater"  # held, the taint gone: starts once the higher priority groups run
    UNKNOWN = "Unknown"  # the node's taints are not known yet: begin nothing, start no held VM


@dataclass(frozen=True)
class Turn:
    kind: TurnKind
    taint: str | None = None
    why: str = ""


NO_TURN = Turn(TurnKind.NONE)
UNKNOWN_TURN = Turn(TurnKind.UNKNOWN, why="the node's taints are not known yet")


class Phase(StrEnum):
    IDLE = "Idle"
    STOPPING = "Stopping"
    COMPLETE = "Complete"  # every VM the taints stop is off
    STARTING = "Starting"


@dataclass(frozen=True)
class NodePlan:
    turns: dict[Key, Turn]
    phase: Phase
    taints: tuple[str, ...] = ()
    # The priority group whose turn it is (stopping or starting), and its VMs.
    group: int | None = None
    group_members: tuple[Key, ...] = ()
    # VMs of the stopping group past their deadline and not forced: the groups above wait for them.
    held_up_by: tuple[Key, ...] = ()
    stopping: int = 0  # VMs the taints stop, off or not
    # When a tolerationSeconds runs out: the plan changes then without anything else changing.
    next_at: datetime | None = None


def _names(keys: Iterable[Key]) -> str:
    keys = sorted(keys)
    shown = ", ".join("/".join(k) for k in keys[:5])
    return shown + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def plan(
    taints: tuple[Taint, ...] | None,
    first_seen: Mapping[tuple[str, str, str], datetime],
    node_members: Iterable[Member],
    now: datetime,
) -> NodePlan:
    """Every member's turn. taints None: not known yet. first_seen: when the operator first saw each taint,
    for a taint without timeAdded."""
    members = list(node_members)
    if taints is None:
        return NodePlan(turns={m.key: UNKNOWN_TURN for m in members}, phase=Phase.IDLE)
    turns: dict[Key, Turn] = {m.key: NO_TURN for m in members}
    # Each member's earliest stop under any taint.
    stops: dict[Key, tuple[datetime, Taint]] = {}
    next_at: datetime | None = None
    for member in members:
        for taint in taints:
            since = taint.time_added or first_seen.get(taint.name, now)
            at = stop_at(member.tolerations, taint, since)
            if at is not None and (member.key not in stops or at < stops[member.key][0]):
                stops[member.key] = (at, taint)
        if member.key in stops and stops[member.key][0] > now:
            at = stops[member.key][0]
            next_at = at if next_at is None or at < next_at else next_at
    stopped = [m for m in members if m.key in stops]
    if stopped:
        return _stopping(members, stopped=stopped, stops=stops, turns=turns, now=now, next_at=next_at)
    return _starting(members, turns)


def _stopping(
    members: list[Member],
    *,
    stopped: list[Member],
    stops: dict[Key, tuple[datetime, Taint]],
    turns: dict[Key, Turn],
    now: datetime,
    next_at: datetime | None,
) -> NodePlan:
    """Lowest priority first; a group's turn comes when every VM of the lower ones is off."""
    group: int | None = None
    for priority in sorted({m.priority for m in stopped}):
        lower_on = [m for m in stopped if m.priority < priority and not m.off]
        for member in (m for m in stopped if m.priority == priority):
            at, taint = stops[member.key]
            if lower_on:
                why = f"stops after the lower priority groups are off (waiting for {_names(m.key for m in lower_on)})"
                turns[member.key] = Turn(TurnKind.WAIT, str(taint), why)
            elif at > now:
                turns[member.key] = Turn(TurnKind.WAIT, str(taint), f"tolerates the taint until {at.isoformat()}")
            else:
                turns[member.key] = Turn(TurnKind.STOP, str(taint))
        if group is None and not all(m.off for m in stopped if m.priority == priority):
            group = priority
    # Held VMs the taints no longer stop (now tolerated) start as soon as nothing stops any more.
    for member in members:
        if member.key not in stops and member.held_by is not None:
            turns[member.key] = Turn(TurnKind.START_LATER, member.held_by, "starts when the node's maintenance ends")
    in_group = [m for m in stopped if m.priority == group]
    return NodePlan(
        turns=turns,
        phase=Phase.STOPPING if group is not None else Phase.COMPLETE,
        taints=tuple(sorted({str(stops[m.key][1]) for m in stopped})),
        group=group,
        group_members=tuple(m.key for m in in_group),
        held_up_by=tuple(m.key for m in in_group if m.overdue and not m.off),
        stopping=len(stopped),
        next_at=next_at,
    )


def _starting(members: list[Member], turns: dict[Key, Turn]) -> NodePlan:
    """Highest priority first; a group starts when no held VM of a higher one is left (each clears its
    heldByTaint once it is seen running, so a start that fails keeps the lower groups waiting)."""
    held = [m for m in members if m.held_by is not None and m.wants_running]
    if not held:
        return NodePlan(turns=turns, phase=Phase.IDLE)
    group = max(m.priority for m in held)
    for member in held:
        if member.priority < group:
            higher = [m.key for m in held if m.priority > member.priority]
            why = f"starts after the higher priority groups run (waiting for {_names(higher)})"
            turns[member.key] = Turn(TurnKind.START_LATER, member.held_by, why)
    return NodePlan(
        turns=turns,
        phase=Phase.STARTING,
        group=group,
        group_members=tuple(m.key for m in held if m.priority == group),
    )


@dataclass(frozen=True)
class NodeEvent:
    type: str
    reason: str
    message: str


def node_events(before: NodePlan | None, after: NodePlan) -> list[NodeEvent]:
    """The Events on the Node for a change of plan: a maintenance begun, each group's turn, a VM holding the
    node up, the end. The first plan of an operator (before None) reports only where it finds itself."""
    events: list[NodeEvent] = []
    was = before.phase if before is not None else None
    if after.phase in (Phase.STOPPING, Phase.COMPLETE) and was in (Phase.IDLE, Phase.STARTING):
        events.append(
            NodeEvent(
                "Normal",
                "MaintenanceStarted",
                f"taint {', '.join(after.taints)}: {after.stopping} VM(s) stop by priority, lowest first",
            )
        )
    same_group = before is not None and before.phase == after.phase and before.group == after.group
    if after.phase is Phase.STOPPING and not same_group:
        events.append(
            NodeEvent(
                "Normal",
                "StoppingGroup",
                f"priority {after.group}: stopping {len(after.group_members)} VM(s): {_names(after.group_members)}",
            )
        )
    if after.held_up_by and (before is None or before.held_up_by != after.held_up_by):
        events.append(
            NodeEvent(
                "Warning",
                "MaintenanceHeldUp",
                f"{_names(after.held_up_by)}: past the shutdown deadline and not forced (forceAfterDeadline "
                f"false); the groups above priority {after.group} wait until it is off",
            )
        )
    if after.phase is Phase.COMPLETE and was is not None and was is not Phase.COMPLETE:
        events.append(
            NodeEvent(
                "Normal", "MaintenanceComplete", f"taint {', '.join(after.taints)}: all {after.stopping} VM(s) are off"
            )
        )
    if after.phase is Phase.STARTING and not same_group:
        events.append(
            NodeEvent(
                "Normal",
                "StartingGroup",
                f"the taint is gone: priority {after.group}: starting {len(after.group_members)} VM(s): "
                f"{_names(after.group_members)}",
            )
        )
    if after.phase is Phase.IDLE and was in (Phase.STOPPING, Phase.COMPLETE, Phase.STARTING):
        events.append(NodeEvent("Normal", "MaintenanceEnded", "no taint stops a VM, and every VM it held has started"))
    return events
