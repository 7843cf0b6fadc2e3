"""Node maintenance in the operator's shell: the real Operator and workers on fake time, with fake neighbours.

The order across VMs is the planner's (tests/unit/test_maintenance.py); these check that the shell feeds it
the Node and every VM, wakes the right workers, keeps each force at its own deadline, and carries on after
a restart made while the API server is down.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from controller.metrics import Metrics
from controller.operator import Operator
from tests.unit.shellfakes import until
from tests.unit.test_operator_shell import MS, Env, scenario

TAINT = {"key": "vmop.dev/maintenance", "effect": "NoExecute"}
GRACE = 5


def add(env: Env, name: str, priority: int) -> None:
    spec = {
        "nodeName": "node-a",
        "powerState": "Running",
        "priority": priority,
        "shutdownPolicy": {"gracePeriodSeconds": GRACE, "retryIntervalSeconds": 1},
        "domain": {"memoryMiB": 64},
    }
    env.op.object_event("ADDED", env.kube.create(name, spec))


def taint(env: Env, *taints: dict[str, Any]) -> None:
    node = {"metadata": {"name": "node-a", "uid": "uid-node-a"}, "spec": {"taints": list(taints)}}
    env.kube.nodes["node-a"] = node
    env.op.node_event(node)


def node_events(env: Env) -> list[str]:
    return [reason for name, _type, reason, _message in env.events.posted if name == "node-a"]


def started_at(env: Env, name: str) -> datetime:
    return datetime.fromisoformat(env.kube.status(name)["startedAt"])


def test_groups_stop_lowest_first_each_forced_at_its_own_deadline_and_start_highest_first() -> None:
    async def run() -> None:
        env = Env()
        await env.op.start()
        for name, priority in (("app", 0), ("cache", 0), ("db", 10)):
            add(env, name, priority)
        await until(lambda: all(env.kube.status(n).get("powerState") == "Running" for n in ("app", "cache", "db")))
        taint(env, TAINT)
        await until(lambda: "uid-db" in env.hyp.forced, within=60, what="db forced")
        for name in ("app", "cache"):
            first = env.requests(name)[0]
            assert timedelta(0) <= env.hyp.forced[f"uid-{name}"] - (first + timedelta(seconds=GRACE)) < MS
        db_first = env.requests("db")[0]
        assert db_first >= max(env.hyp.forced["uid-app"], env.hyp.forced["uid-cache"]), "the next group after"
        assert timedelta(0) <= env.hyp.forced["uid-db"] - (db_first + timedelta(seconds=GRACE)) < MS
        await until(lambda: env.kube.status("db").get("heldByTaint"), what="db held")
        assert env.shutdown("db")["purpose"] == "Taint"
        assert env.shutdown("db")["taint"] == "vmop.dev/maintenance:NoExecute"
        await until(lambda: "MaintenanceComplete" in node_events(env), what="the Node Event")
        assert node_events(env)[:4] == ["MaintenanceStarted", "StoppingGroup", "StoppingGroup", "MaintenanceComplete"]
        assert env.op.metrics.registry.get_sample_value("vmop_virtual_machines_held_by_taint") == 3

        taint(env)
        await until(lambda: not any(env.kube.status(n).get("heldByTaint") for n in ("app", "cache", "db")))
        assert started_at(env, "db") < min(started_at(env, "app"), started_at(env, "cache")), "highest first"
        await until(lambda: "MaintenanceEnded" in node_events(env), what="the end")
        assert env.op.metrics.registry.get_sample_value("vmop_virtual_machines_held_by_taint") == 0
        await env.op.stop()

    scenario(run)


def test_restarted_while_the_api_server_is_down_it_starts_nothing_and_keeps_the_deadline_under_way() -> None:
    async def run() -> None:
        env = Env()
        await env.op.start()
        for name, priority in (("app", 0), ("db", 10), ("auth", 20)):
            add(env, name, priority)
        await until(lambda: all(env.kube.status(n).get("powerState") == "Running" for n in ("app", "db", "auth")))
        taint(env, TAINT)
        await until(lambda: env.requests("db"), within=60, what="db asked")
        deadline = env.requests("db")[0] + timedelta(seconds=GRACE)
        await env.op.stop()

        # The next operator finds the API server down: only libvirt's marks and nothing of the Node.
        env.kube.mode = "down"
        env.op = Operator(
            env.op.settings,
            kube=env.kube,  # type: ignore[arg-type]
            hypervisor=env.hyp,  # type: ignore[arg-type]
            events=env.events,  # type: ignore[arg-type]
            metrics=Metrics(),
            clock=env.clock,
            storage=env.storage,  # type: ignore[arg-type]
        )
        await env.op.start()
        await until(lambda: "uid-db" in env.hyp.forced, within=60, what="db forced by the backstop")
        assert timedelta(0) <= env.hyp.forced["uid-db"] - deadline < MS
        env.kube.mode = "ok"  # the relist and the Node read, retried every 2 s, find everything
        await until(lambda: "uid-auth" in env.hyp.forced, within=60, what="auth forced")
        assert env.requests("auth")[0] >= env.hyp.forced["uid-db"], "no group skipped"
        assert env.domain("app").starts == 1, "the held group never started again while tainted"
        await env.op.stop()

    scenario(run)
