"""In-memory twin of the remote control, for tests of code that uses one.

It answers like a celery 5.7 worker (same reply strings and shapes) for the
commands branchd sends, remembers every request, and lets a test script any
other answer. Calls return at once: a missing reply is ``None`` without
waiting out the timeout, so tests stay fast and need no clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from branchd.celery.broker import BrokerSpec
from branchd.errors import BrokerUnavailable

Reply = dict[str, Any]
Script = Reply | None | Callable[[Mapping[str, Any]], Reply | None]


@dataclass
class Sent:
    """One request the stub received."""

    broker: BrokerSpec | None
    node: str
    command: str
    arguments: dict[str, Any]
    one_way: bool


@dataclass
class StubNode:
    """A scripted worker. ``alive=False`` models a dead or hung one: no reply."""

    name: str
    queues: list[str] = field(default_factory=list)
    autoscale: tuple[int, int] | None = None  # (max, min)
    concurrency: int = 1
    alive: bool = True
    scripts: dict[str, Script] = field(default_factory=dict)
    #: Registered task names and the attributes remote control set on them
    #: ("rate_limit", "time_limit", "soft_time_limit"), as a worker keeps them.
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def handle(self, command: str, arguments: Mapping[str, Any]) -> Reply | None:
        if not self.alive:
            return None
        if command in self.scripts:
            script = self.scripts[command]
            return script(arguments) if callable(script) else script
        handler = getattr(self, f"_do_{command}", None)
        if handler is None:
            # what a worker answers: dispatch turns the handler KeyError into a reply
            return {"error": repr(KeyError(command))}
        result: Reply | None = handler(**arguments)
        return result

    def _do_ping(self) -> Reply:
        return {"ok": "pong"}

    def _do_active_queues(self) -> Reply:
        # the real reply is a bare list; the remote control wraps it as {"ok": [...]}
        return {
            "ok": [
                {
                    "name": q,
                    "exchange": {"name": q, "type": "direct"},
                    "routing_key": q,
                    "durable": True,
                }
                for q in self.queues
            ]
        }

    def _do_add_consumer(self, queue: str, **_: Any) -> Reply:
        if queue not in self.queues:
            self.queues.append(queue)
        return {"ok": f"add consumer {queue}"}

    def _do_cancel_consumer(self, queue: str, **_: Any) -> Reply:
        if queue in self.queues:
            self.queues.remove(queue)
        return {"ok": f"no longer consuming from {queue}"}

    def _do_autoscale(self, max: int | None = None, min: int | None = None) -> Reply:
        if self.autoscale is None:
            return {"error": "ValueError('Autoscale not enabled')"}
        high = self.autoscale[0] if max is None else int(max)
        low = self.autoscale[1] if min is None else int(min)
        self.autoscale = (high, low)
        return {"ok": f"autoscale now max={high} min={low}"}

    def _do_stats(self) -> Reply:
        stats: Reply = {
            "pool": {"max-concurrency": self.autoscale[0] if self.autoscale else self.concurrency},
            "total": {},
        }
        if self.autoscale is not None:
            stats["autoscaler"] = {"max": self.autoscale[0], "min": self.autoscale[1]}
        return stats

    def _do_registered(self, taskinfoitems: list[str] | None = None, **_: Any) -> Reply:
        items = taskinfoitems or ["rate_limit"]
        out = []
        for name, attrs in sorted(self.tasks.items()):
            info = [f"{k}={attrs[k]}" for k in items if attrs.get(k) is not None]
            out.append(f"{name} [{' '.join(info)}]" if info else name)
        return {"ok": out}

    def _do_rate_limit(self, task_name: str, rate_limit: str, **_: Any) -> Reply:
        if task_name not in self.tasks:
            return {"error": "unknown task"}
        self.tasks[task_name]["rate_limit"] = rate_limit
        return {"ok": "new rate limit set successfully"}

    def _do_time_limit(
        self, task_name: str, hard: float | None = None, soft: float | None = None, **_: Any
    ) -> Reply:
        if task_name not in self.tasks:
            return {"error": "unknown task"}
        self.tasks[task_name].update(time_limit=hard, soft_time_limit=soft)
        return {"ok": "time limits set successfully"}

    def _do_shutdown(self, **_: Any) -> None:
        self.alive = False  # a worker never replies to shutdown


class StubRemoteControl:
    """RemoteControl twin: nodes by name (any broker), a log of what was sent."""

    def __init__(self) -> None:
        self.nodes: dict[str, StubNode] = {}
        self.sent: list[Sent] = []
        self.broker_down = False
        self.closed = False
        #: What ``connects`` answers: a test bumps it to play a reconnect.
        self.connections = 1

    def add_node(self, name: str, **kw: Any) -> StubNode:
        node = StubNode(name, **kw)
        self.nodes[name] = node
        return node

    def script(self, node: str, command: str, reply: Script) -> None:
        self.nodes[node].scripts[command] = reply

    def commands(self, node: str | None = None) -> list[str]:
        return [s.command for s in self.sent if node is None or s.node == node]

    def _check(self) -> None:
        if self.closed:
            raise BrokerUnavailable("remote control is closed")
        if self.broker_down:
            raise BrokerUnavailable("stub broker is down")

    async def call(
        self,
        broker: BrokerSpec,
        node: str,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        timeout: float = 1.0,
    ) -> Reply | None:
        await asyncio.sleep(0)
        self._check()
        args = dict(arguments or {})
        self.sent.append(Sent(broker, node, command, args, one_way=False))
        target = self.nodes.get(node)
        return None if target is None else target.handle(command, args)

    async def cast(
        self,
        broker: BrokerSpec,
        node: str,
        command: str,
        arguments: Mapping[str, Any] | None = None,
    ) -> None:
        await asyncio.sleep(0)
        self._check()
        args = dict(arguments or {})
        self.sent.append(Sent(broker, node, command, args, one_way=True))
        target = self.nodes.get(node)
        if target is not None:
            target.handle(command, args)

    def connects(self, broker: BrokerSpec) -> int:
        return self.connections

    async def close(self) -> None:
        self.closed = True
