"""The exec probes' context: one copy of an environment shared by the
instances that have the same (issue 10, part 9), each still its own."""

from __future__ import annotations

from branchd.clock import FakeClock, FakeScheduler
from branchd.model import InstanceSpec
from branchd.process.readiness import Probing


def _spec(name: str) -> InstanceSpec:
    return InstanceSpec(app="web", name=name, command=("./api",), branch="b", cwd=f"/srv/{name}")


class _NoSockets:
    def close(self, name: str) -> None:
        pass


def test_the_same_environment_is_kept_once_and_a_changed_one_apart() -> None:
    sockets = _NoSockets()
    probing = Probing(runner=None, notify=sockets, scheduler=FakeScheduler(FakeClock()))  # type: ignore[arg-type]
    env = {"PATH": "/usr/bin", "HOME": "/root"}
    for name in ("a1", "a2"):
        probing.before_spawn(_spec(name), dict(env))
    other = {**env, "MODE": "x"}
    probing.before_spawn(_spec("b1"), other)
    other["MODE"] = "changed after"  # (the caller's dict: never the kept copy)
    ctx = probing._context
    assert ctx["a1"][0] is ctx["a2"][0] and ctx["a1"][0] == env
    assert ctx["b1"][0] == {**env, "MODE": "x"}
    assert (ctx["a1"][1], ctx["a2"][1]) == ("/srv/a1", "/srv/a2")  # each its own directory
