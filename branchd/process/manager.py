"""The local supervisor: runs the pure state machine of each instance against
the store (declared state) and the launcher (processes).

Events come up (a pid died, a timer fired, a user asked), the machine decides,
and the commands it returns go down to the launcher. Every acknowledged user
change is in SQLite before the method returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal as _signal
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from branchd.clock import Clock
from branchd.config import Config
from branchd.errors import Conflict, Invalid, NotFound, SpawnError
from branchd.model import (
    App,
    Autorestart,
    Desired,
    InstanceSpec,
    Kind,
    Runtime,
    State,
    signal_number,
    valid_name,
)
from branchd.process import logs
from branchd.process.launcher import Launcher, LaunchSpec, TreeStats
from branchd.process.machine import (
    Adopt,
    Backoff,
    Command,
    Event,
    Exited,
    Kill,
    Proc,
    Reap,
    Restart,
    Signal,
    Spawn,
    Spawned,
    SpawnFailed,
    Start,
    Stop,
    Timeout,
    step,
)
from branchd.store import Store

log = logging.getLogger(__name__)

#: Instance fields a user may set (in a create, a patch or an app's defaults).
POLICY_FIELDS = (
    "autorestart",
    "exitcodes",
    "startsecs",
    "startretries",
    "stopsignal",
    "stopwaitsecs",
)
SPEC_FIELDS = ("command", "env", "cwd", "user", "autostart", "log_max_bytes", "log_backups")
SETTABLE = POLICY_FIELDS + SPEC_FIELDS

#: After SIGKILL the kernel needs a moment; a stop never waits forever.
_KILL_GRACE = 5.0


@dataclass(frozen=True)
class InstanceView:
    """A snapshot of one instance for the API: declaration plus live state."""

    spec: InstanceSpec
    runtime: Runtime
    uptime: float | None

    def to_json(self) -> dict[str, Any]:
        s, rt, p = self.spec, self.runtime, self.spec.policy
        return {
            "name": s.name,
            "app": s.app,
            "kind": s.kind.value,
            "state": rt.state.value,
            "desired": s.desired.value,
            "pid": rt.pid,
            "command": list(s.command),
            "env": dict(s.env),
            "cwd": s.cwd,
            "user": s.user,
            "autorestart": p.autorestart.value,
            "exitcodes": list(p.exitcodes),
            "startsecs": p.startsecs,
            "startretries": p.startretries,
            "stopsignal": p.stopsignal,
            "stopwaitsecs": p.stopwaitsecs,
            "autostart": s.autostart,
            "log_max_bytes": s.log_max_bytes,
            "log_backups": s.log_backups,
            "restarts": rt.restarts,
            "exit_code": rt.exit_code,
            "started_at": rt.started_at,
            "uptime": self.uptime,
            "stop_step": rt.stop_step.value if rt.stop_step else None,
            "reason": rt.reason,
            "branch": s.branch,
            "created_at": s.created_at,
        }


@dataclass(frozen=True)
class Stats:
    view: InstanceView
    tree: TreeStats

    def to_json(self) -> dict[str, Any]:
        v = self.view.to_json()
        return {
            "app": v["app"],
            "name": v["name"],
            "state": v["state"],
            "pid": v["pid"],
            "uptime": v["uptime"],
            "restarts": v["restarts"],
            "exit_code": v["exit_code"],
            "cpu_percent": self.tree.cpu_percent,
            "memory_rss": self.tree.memory_rss,
            "processes": self.tree.processes,
        }


def build_spec(
    app: App, name: str, fields: Mapping[str, Any], branch: str, now: float
) -> InstanceSpec:
    """Instance fields over the app's defaults; raises Invalid on a bad mix."""
    merged = {**app.defaults, **fields}
    return apply_fields(
        InstanceSpec(app=app.name, name=name, command=(), branch=branch, created_at=now), merged
    )


def apply_fields(spec: InstanceSpec, fields: Mapping[str, Any]) -> InstanceSpec:
    unknown = set(fields) - set(SETTABLE) - {"kind"}
    if unknown:
        raise Invalid(f"unknown field(s): {', '.join(sorted(unknown))}")
    kind = Kind(fields.get("kind", spec.kind))
    if kind != Kind.PROCESS:
        raise Invalid(f"kind {kind.value!r} is not supported yet")
    pol: dict[str, Any] = {k: fields[k] for k in POLICY_FIELDS if k in fields}
    if "autorestart" in pol:
        pol["autorestart"] = Autorestart(pol["autorestart"])
    if "exitcodes" in pol:
        pol["exitcodes"] = tuple(int(c) for c in pol["exitcodes"])
    for key in ("startsecs", "stopwaitsecs"):
        if key in pol:
            pol[key] = float(pol[key])
    policy = replace(spec.policy, **pol)
    plain: dict[str, Any] = {k: fields[k] for k in SPEC_FIELDS if k in fields}
    if "command" in plain:
        plain["command"] = tuple(plain["command"])
    if "env" in plain:
        plain["env"] = dict(plain["env"])
    out = replace(spec, kind=kind, policy=policy, **plain)
    if not out.command:
        raise Invalid("command must be a non-empty argv list")
    if policy.startretries < 1:
        raise Invalid("startretries must be at least 1")
    return out


class Manager:
    """Supervises the instances of this branch; the API's backend."""

    def __init__(
        self,
        store: Store,
        launcher: Launcher,
        clock: Clock,
        config: Config,
        branch_id: str,
    ) -> None:
        self._store = store
        self._launcher = launcher
        self._clock = clock
        self._config = config
        self.branch_id = branch_id
        self._backoff = Backoff(config.backoff_base, config.backoff_max)
        self._specs: dict[str, InstanceSpec] = {}
        self._procs: dict[str, Proc] = {}
        self._runtime: dict[str, Runtime] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._deleting: set[str] = set()
        self._rotator: asyncio.Task[None] | None = None
        self._env = dict(os.environ)

    # lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Adopt the instances whose processes survived us; start the rest."""
        runtimes = self._store.runtimes()
        for spec in self._store.list_instances():
            name = spec.name
            rt = runtimes.get(name, Runtime())
            self._specs[name] = spec
            self._procs[name] = Proc(
                restarts=rt.restarts,
                exit_code=rt.exit_code,
                stop_step=rt.stop_step,
                reason=rt.reason,
            )
            self._runtime[name] = replace(rt, state=State.STOPPED, pid=None)
            self._changed[name] = asyncio.Event()
            if rt.pid and rt.create_time and self._launcher.alive(rt.pid, rt.create_time):
                log.info("adopting %s (pid %d)", name, rt.pid)
                self._runtime[name] = replace(
                    self._runtime[name], create_time=rt.create_time, started_at=rt.started_at
                )
                self._feed(name, Adopt(rt.pid))
                self._watch(name, rt.pid)
                if spec.desired == Desired.STOPPED:
                    self._feed(name, Stop())
            elif spec.desired == Desired.RUNNING:
                self._feed(name, Start())
            else:
                self._persist(name)
        self._rotator = asyncio.create_task(self._rotate_logs())

    async def shutdown(self, *, keep: bool) -> None:
        """Stop every instance (or, with keep, leave them running) and let go."""
        if self._rotator:
            self._rotator.cancel()
        if not keep:
            names = [n for n, p in self._procs.items() if p.state != State.STOPPED]
            for name in names:
                self._feed(name, Stop())
            await asyncio.gather(*(self._wait_stopped(n) for n in names))
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        self._launcher.close()

    # apps -------------------------------------------------------------------

    async def list_apps(self) -> list[App]:
        return self._store.list_apps()

    async def get_app(self, name: str) -> App:
        app = self._store.get_app(name)
        if app is None:
            raise NotFound(f"no app {name!r}")
        return app

    async def put_app(
        self, name: str, env: Mapping[str, str], defaults: Mapping[str, Any]
    ) -> tuple[App, bool]:
        _check_name(name, "app")
        probe = App(name=name, env=dict(env), defaults=dict(defaults))
        if defaults:
            # The defaults must make a valid instance once a command is given.
            apply_fields(
                InstanceSpec(app=name, name="probe", command=("x",), branch=""),
                {"command": ["x"], **defaults},
            )
        existing = self._store.get_app(name)
        app = replace(probe, created_at=existing.created_at if existing else self._clock.wall())
        created = self._store.put_app(app)
        return app, created

    async def delete_app(self, name: str) -> None:
        await self.get_app(name)
        for spec in [s for s in self._specs.values() if s.app == name]:
            await self.delete_instance(name, spec.name)
        self._store.delete_app(name)

    # instances ------------------------------------------------------------

    async def list_instances(self, app: str | None = None) -> list[InstanceView]:
        if app is not None:
            await self.get_app(app)
        names = sorted(self._specs, key=lambda n: (self._specs[n].app, n))
        return [self._view(n) for n in names if app is None or self._specs[n].app == app]

    async def get_instance(self, app: str, name: str) -> InstanceView:
        return self._view(self._lookup(app, name).name)

    async def create_instance(self, app_name: str, fields: Mapping[str, Any]) -> InstanceView:
        app = await self.get_app(app_name)
        fields = dict(fields)
        name = fields.pop("name", None) or self._new_name(app_name)
        _check_name(name, "instance")
        if name in self._specs:
            raise Conflict(f"instance name {name!r} is taken")
        spec = build_spec(app, name, fields, self.branch_id, self._clock.wall())
        if not spec.autostart:
            spec = replace(spec, desired=Desired.STOPPED)
        self._store.add_instance(spec)
        self._specs[name] = spec
        self._procs[name] = Proc()
        self._runtime[name] = Runtime()
        self._changed[name] = asyncio.Event()
        self._persist(name)
        if spec.desired == Desired.RUNNING:
            self._feed(name, Start())
        return self._view(name)

    async def update_instance(self, app: str, name: str, fields: Mapping[str, Any]) -> InstanceView:
        spec = self._lookup(app, name)
        for key in ("name", "kind"):
            if key in fields:
                raise Invalid(f"{key} cannot be changed")
        new = apply_fields(spec, fields)
        self._store.update_instance(new)
        self._specs[name] = new
        return self._view(name)

    async def delete_instance(self, app: str, name: str) -> None:
        spec = self._lookup(app, name)
        # While it stops, nobody may start it again: the process would outlive
        # its declaration (an orphan).
        self._deleting.add(name)
        try:
            self._set_desired(spec, Desired.STOPPED)
            self._feed(name, Stop())
            await self._wait_stopped(name)
            pid = self._procs[name].pid
            if pid:  # did not stop in time: no orphans, ever
                self._launcher.signal(pid, _signal.SIGKILL, True)
            self._store.delete_instance(name)
            handle = self._timers.pop(name, None)
            if handle:
                handle.cancel()
            del self._specs[name], self._procs[name], self._runtime[name], self._changed[name]
        finally:
            self._deleting.discard(name)

    async def start_instance(self, app: str, name: str) -> InstanceView:
        self._set_desired(self._lookup(app, name, starting=True), Desired.RUNNING)
        self._feed(name, Start())
        return self._view(name)

    async def stop_instance(self, app: str, name: str) -> InstanceView:
        self._set_desired(self._lookup(app, name), Desired.STOPPED)
        self._feed(name, Stop())
        await self._wait_stopped(name)
        return self._view(name)

    async def restart_instance(self, app: str, name: str) -> InstanceView:
        self._set_desired(self._lookup(app, name, starting=True), Desired.RUNNING)
        self._feed(name, Restart())
        return self._view(name)

    async def instance_stats(self, app: str, name: str) -> Stats:
        view = self._view(self._lookup(app, name).name)
        pid = view.runtime.pid
        tree = self._launcher.tree_stats(pid) if pid else TreeStats(0.0, 0, 0)
        return Stats(view, tree)

    def log_path(self, app: str, name: str, stream: str) -> Path:
        spec = self._lookup(app, name)
        out, err = logs.log_paths(self._config.log_dir, spec.app, spec.name)
        return err if stream == "stderr" else out

    async def read_logs(self, app: str, name: str, stream: str, tail: int) -> list[str]:
        path = self.log_path(app, name, stream)
        return await asyncio.to_thread(logs.tail, path, tail)

    def follow_logs(self, app: str, name: str, stream: str) -> AsyncIterator[str]:
        return logs.follow(self.log_path(app, name, stream))

    def counts(self) -> int:
        return len(self._specs)

    # internals --------------------------------------------------------------

    def _lookup(self, app: str, name: str, *, starting: bool = False) -> InstanceSpec:
        spec = self._specs.get(name)
        if spec is None or spec.app != app:
            if self._store.get_app(app) is None:
                raise NotFound(f"no app {app!r}")
            raise NotFound(f"no instance {name!r} in app {app!r}")
        if starting and name in self._deleting:
            raise Conflict(f"instance {name!r} is being deleted")
        return spec

    def _new_name(self, app: str) -> str:
        while True:
            name = f"{app[:54]}-{secrets.token_hex(4)}"
            if name not in self._specs:
                return name

    def _set_desired(self, spec: InstanceSpec, desired: Desired) -> None:
        if spec.desired != desired:
            self._store.set_desired(spec.name, desired)
            self._specs[spec.name] = replace(spec, desired=desired)

    def _view(self, name: str) -> InstanceView:
        rt = self._runtime[name]
        uptime = None
        if rt.pid and rt.started_at and rt.state in (State.RUNNING, State.STARTING, State.STOPPING):
            uptime = max(0.0, round(self._clock.wall() - rt.started_at, 3))
        return InstanceView(self._specs[name], rt, uptime)

    def _feed(self, name: str, event: Event) -> None:
        """Run one event through the machine and carry out its commands."""
        spec = self._specs.get(name)
        if spec is None:
            return
        old = self._procs[name]
        proc, commands = step(old, event, spec.policy, self._clock.monotonic(), self._backoff)
        self._procs[name] = proc
        for command in commands:
            self._run(name, spec, old, command)
        proc = self._procs[name]  # a Spawn has fed Spawned/SpawnFailed back in
        self._schedule(name, proc.deadline)
        self._persist(name)
        self._changed[name].set()
        self._changed[name] = asyncio.Event()

    def _run(self, name: str, spec: InstanceSpec, old: Proc, command: Command) -> None:
        pid = self._procs[name].pid
        match command:
            case Spawn():
                self._spawn(name, spec)
            case Signal(name=sig, group=group) if pid:
                self._launcher.signal(pid, signal_number(sig), group)
            case Kill() if pid:
                self._launcher.signal(pid, _signal.SIGKILL, True)
            case Reap() if old.pid:
                # No orphans: whatever the main process left in its group goes too.
                self._launcher.signal(old.pid, _signal.SIGKILL, True)

    def _spawn(self, name: str, spec: InstanceSpec) -> None:
        app = self._store.get_app(spec.app)
        env = {**self._env, **(app.env if app else {}), **spec.env}
        out, err = logs.log_paths(self._config.log_dir, spec.app, spec.name)
        launch = LaunchSpec(
            argv=spec.command,
            env=env,
            cwd=spec.cwd,
            user=spec.user,
            stdout_path=out,
            stderr_path=err,
        )
        try:
            launched = self._launcher.spawn(launch)
        except SpawnError as exc:
            log.warning("cannot start %s: %s", name, exc.message)
            self._feed(name, SpawnFailed(exc.message))
            return
        self._runtime[name] = replace(
            self._runtime[name], create_time=launched.create_time, started_at=self._clock.wall()
        )
        self._feed(name, Spawned(launched.pid))
        self._watch(name, launched.pid)

    def _watch(self, name: str, pid: int) -> None:
        def on_exit(code: int | None) -> None:
            proc = self._procs.get(name)
            if proc is not None and proc.pid == pid:
                log.info("%s (pid %d) exited with %s", name, pid, code)
                self._feed(name, Exited(code))

        self._launcher.watch(pid, on_exit)

    def _schedule(self, name: str, deadline: float | None) -> None:
        handle = self._timers.pop(name, None)
        if handle:
            handle.cancel()
        if deadline is not None:
            delay = max(0.0, deadline - self._clock.monotonic())
            loop = asyncio.get_running_loop()
            self._timers[name] = loop.call_later(delay, self._feed, name, Timeout())

    def _persist(self, name: str) -> None:
        proc = self._procs[name]
        rt = self._runtime[name]
        rt = replace(
            rt,
            state=proc.state,
            pid=proc.pid,
            create_time=rt.create_time if proc.pid else None,
            started_at=rt.started_at if proc.pid else None,
            restarts=proc.restarts,
            exit_code=proc.exit_code,
            stop_step=proc.stop_step,
            reason=proc.reason,
        )
        if rt != self._runtime[name]:
            self._runtime[name] = rt
            self._store.save_runtime(name, rt)

    async def _wait_stopped(self, name: str) -> None:
        """Wait until a stop that was fed has ended (or a concurrent start took over)."""
        spec = self._specs.get(name)
        if spec is None:
            return
        limit = spec.policy.stopwaitsecs + _KILL_GRACE
        loop = asyncio.get_running_loop()
        end = loop.time() + limit
        while name in self._procs and self._procs[name].state == State.STOPPING:
            remaining = end - loop.time()
            if remaining <= 0:
                log.warning("%s did not stop within %.1fs", name, limit)
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed[name].wait(), remaining)

    async def _rotate_logs(self) -> None:
        interval = self._config.log_check_interval
        while True:
            await asyncio.sleep(interval)
            # Rotation copies up to max_bytes: keep that off the event loop.
            await asyncio.to_thread(self._rotate_all, list(self._specs.values()))

    def _rotate_all(self, specs: list[InstanceSpec]) -> None:
        for spec in specs:
            for path in logs.log_paths(self._config.log_dir, spec.app, spec.name):
                try:
                    logs.rotate_if_needed(path, spec.log_max_bytes, spec.log_backups)
                except OSError:
                    log.warning("cannot rotate %s", path, exc_info=True)


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not valid_name(name):
        raise Invalid(
            f"bad {what} name {name!r}: use letters, digits, '_', '.', '-' (1-63, "
            "starting with a letter or digit)"
        )
