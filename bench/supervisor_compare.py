#!/usr/bin/env python3
"""branchd against supervisord, side by side, on this machine (issue 2).

For each N in --counts, each daemon in turn (fresh, its own temp state dir)
supervises N copies of the same ``sleep 100000`` and we measure:

1. start: time until all N are RUNNING (startsecs=0 for both);
2. restart: kill -9 of one child until the supervisor reports a new pid
   running, polled tightly through its API (median of --kills kills);
3. status: sequential "status of all" calls from one client for
   --status-secs: p50 latency and calls/s (branchd: ``GET
   /v1/apps/{app}/instances`` over a keep-alive connection; supervisord:
   ``supervisor.getAllProcessInfo`` through ``xmlrpc.client.ServerProxy``);
4. rss of the daemon process only (psutil), and its idle CPU over
   --idle-secs (cpu_times delta, % of one core), no client talking to it.

Every measure is repeated --runs times; the report gives the median.
supervisord runs from its own virtualenv, bench/.venv-supervisor, created on
first use (``pip install supervisor``). Run it with the project venv:

    .venv/bin/python bench/supervisor_compare.py [--counts 50,200] [--runs 3]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import xmlrpc.client
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import auth_headers, log, machine, med, ok, wait_for, write_section

ROOT = Path(__file__).resolve().parent.parent
SUP_VENV = ROOT / "bench" / ".venv-supervisor"
HEADING = "## Local supervision vs supervisord (issue 2)"
APP = "bench"
MiB = 1024 * 1024

#: Targets of issue 2 (branchd's side).
TARGET_RESTART_MS = 50.0
TARGET_STATUS_RATIO = 3.0
TARGET_RSS_MIB = 80.0
TARGET_RSS_AT = 200
TARGET_IDLE_PCT = 0.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# The two daemons --------------------------------------------------------------


class Supervised(ABC):
    """One running supervisor daemon with N sleepers, driven through its API."""

    label: str

    def __init__(self, sleep_cmd: list[str]) -> None:
        self.sleep_cmd = sleep_cmd
        self.dir = Path(tempfile.mkdtemp(prefix=f"bench-{self.label}-"))
        self.log_path = self.dir / "daemon.out"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _spawn(self, argv: list[str]) -> None:
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.dir
            )

    def _alive(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.label} exited early:\n{tail}")
        return True

    @abstractmethod
    def launch(self, n: int) -> None:
        """Start the daemon, ready to serve, with nothing running yet."""

    @abstractmethod
    def start_all(self, n: int) -> None:
        """Ask for the N sleepers to run (returns once the requests are done)."""

    @abstractmethod
    def stop_all(self) -> None:
        """Stop every sleeper, returning once all have stopped."""

    @abstractmethod
    def start_all_again(self) -> None:
        """Start every (stopped) sleeper in one call, returning once all run."""

    @abstractmethod
    def rolling_restart(self, names: list[str]) -> None:
        """Restart every sleeper one at a time, each running again before the next."""

    @abstractmethod
    def states(self) -> dict[str, tuple[bool, int | None]]:
        """name -> (running, pid) of every sleeper."""

    @abstractmethod
    def one(self, name: str) -> tuple[bool, int | None]:
        """(running, pid) of one sleeper."""

    @abstractmethod
    def status_call(self) -> int:
        """The benchmarked "status of all" call; returns how many it listed."""

    def stop(self) -> list[str]:
        """SIGTERM the daemon, wait, check every child it had is gone."""
        problems: list[str] = []
        if self.proc is None:
            return problems
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            kids = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                problems.append(f"{self.label} ignored SIGTERM for 90 s; SIGKILL")
                self.proc.kill()
                self.proc.wait()
        deadline = time.monotonic() + 10
        for kid in kids:
            while True:
                try:
                    gone = not kid.is_running() or kid.status() == psutil.STATUS_ZOMBIE
                except psutil.Error:
                    gone = True
                if gone:
                    break
                if time.monotonic() > deadline:
                    problems.append(f"{self.label} left pid {kid.pid} running; SIGKILL")
                    with contextlib.suppress(psutil.Error):
                        kid.kill()
                    break
                time.sleep(0.05)
        return problems

    def cleanup(self, keep: bool) -> None:
        if not keep:
            shutil.rmtree(self.dir, ignore_errors=True)


class Branchd(Supervised):
    label = "branchd"

    def __init__(self, sleep_cmd: list[str], python: str) -> None:
        super().__init__(sleep_cmd)
        self.python = python
        self.conn: http.client.HTTPConnection | None = None
        self.auth: dict[str, str] = {}  # the daemon's token, once it listens

    def launch(self, n: int) -> None:
        state = self.dir / "state"
        self._spawn(
            [self.python, "-m", "branchd", "--state-dir", str(state), "--bind", "127.0.0.1:0"]
        )
        url_file = state / "branchd.url"
        url = wait_for(
            lambda: self._alive() and url_file.exists() and url_file.read_text().strip(),
            30,
            "branchd.url",
        )
        parts = urllib.parse.urlsplit(url)
        assert parts.hostname and parts.port
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        self.auth = auth_headers(state)
        self.call("PUT", f"/v1/apps/{APP}", {}, expect=(200, 201))

    def call(
        self, method: str, path: str, body: Any = None, expect: tuple[int, ...] = (200,)
    ) -> Any:
        """One request over the keep-alive connection; the JSON answer."""
        assert self.conn is not None
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        self.conn.request(method, path, body=data, headers={**self.auth, **headers})
        resp = self.conn.getresponse()
        raw = resp.read()
        if resp.status not in expect:
            raise RuntimeError(f"{method} {path}: {resp.status} {raw[:300]!r}")
        return json.loads(raw) if raw else None

    def start_all(self, n: int) -> None:
        for i in range(n):
            self.call(
                "POST",
                f"/v1/apps/{APP}/instances",
                {
                    "name": f"s{i:04d}",
                    "command": self.sleep_cmd,
                    "startsecs": 0,
                    "autorestart": "always",
                    "stopwaitsecs": 10,
                },
                expect=(201,),
            )

    def stop_all(self) -> None:
        self._all_came_out(self.call("POST", f"/v1/apps/{APP}/stop"), "stopped")

    def start_all_again(self) -> None:
        # the app action (issue 15): one call, answered once every instance runs
        self._all_came_out(self.call("POST", f"/v1/apps/{APP}/start"), "running")

    def rolling_restart(self, names: list[str]) -> None:
        answer = self.call("POST", f"/v1/apps/{APP}/restart?rolling=1&batch=1")
        self._all_came_out(answer, "running")

    def count_create(self, n: int) -> float:
        """Seconds of one count create of N more sleepers (app bench2) until all
        run; then that app goes (so the other measures are unchanged)."""
        body = {
            "count": n,
            "name": "c{n:04d}",
            "command": self.sleep_cmd,
            "startsecs": 0,
            "autorestart": "always",
            "stopwaitsecs": 10,
        }
        self.call("PUT", f"/v1/apps/{APP}2", {}, expect=(200, 201))
        t0 = time.perf_counter()
        made = self.call("POST", f"/v1/apps/{APP}2/instances", body, expect=(201,))["items"]

        def all_running() -> bool:
            items = self.call("GET", f"/v1/apps/{APP}2/instances")["items"]
            return len(items) == n and all(i["state"] == "running" for i in items)

        if len(made) != n or not all(i["state"] == "running" for i in made):
            wait_for(all_running, 120, f"{n} count-created sleepers running", interval=0.01)
        spent = time.perf_counter() - t0
        self.call("DELETE", f"/v1/apps/{APP}2", expect=(204,))
        return spent

    @staticmethod
    def _all_came_out(answer: Any, outcome: str) -> None:
        bad = [i for i in answer["items"] if i["outcome"] != outcome]
        if bad:
            raise RuntimeError(f"not {outcome}: {bad[:3]}")

    def states(self) -> dict[str, tuple[bool, int | None]]:
        items = self.call("GET", f"/v1/apps/{APP}/instances")["items"]
        return {i["name"]: (i["state"] == "running", i["pid"]) for i in items}

    def one(self, name: str) -> tuple[bool, int | None]:
        i = self.call("GET", f"/v1/apps/{APP}/instances/{name}")
        return i["state"] == "running", i["pid"]

    def status_call(self) -> int:
        return len(self.call("GET", f"/v1/apps/{APP}/instances")["items"])

    def stop(self) -> list[str]:
        if self.conn is not None:
            self.conn.close()
        return super().stop()


class QuickAckRpc:
    """A minimal keep-alive XML-RPC client that acks every segment at once.

    supervisord's medusa server writes an answer in 4 KiB sends without
    TCP_NODELAY, so past the first 4 KiB, Nagle on its side waits for the
    client's delayed ACK (about 40 ms on Linux). xmlrpc.client cannot avoid
    that; this client sets TCP_QUICKACK before every recv(). It shows what
    supervisord itself costs without the stall (informative row).
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None

    def call(self, method: str, *params: Any) -> Any:
        body = xmlrpc.client.dumps(params, method).encode()
        head = (
            f"POST /RPC2 HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            f"Content-Type: text/xml\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=60)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(head.encode() + body)
        buf = bytearray()
        while (end := buf.find(b"\r\n\r\n")) < 0:
            buf += self._recv()
        length = None
        for line in bytes(buf[:end]).split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == b"content-length":
                length = int(value)
        if length is None:
            raise RuntimeError("supervisord answered without Content-Length")
        start = end + 4
        while len(buf) < start + length:
            buf += self._recv()
        result, _ = xmlrpc.client.loads(bytes(buf[start : start + length]))
        return result[0]

    def _recv(self) -> bytes:
        assert self.sock is not None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        chunk = self.sock.recv(1 << 18)
        if not chunk:
            raise ConnectionError("supervisord closed the connection")
        return chunk

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


SUPERVISORD_CONF = """\
[supervisord]
nodaemon=true
logfile={dir}/supervisord.log
pidfile={dir}/supervisord.pid
childlogdir={dir}/logs
loglevel=info

[inet_http_server]
port=127.0.0.1:{port}

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[program:s]
command={command}
process_name=s%(process_num)04d
numprocs={n}
autostart=false
autorestart=true
startsecs=0
stopwaitsecs=10
{program_extra}"""


class Supervisord(Supervised):
    label = "supervisord"

    def __init__(self, sleep_cmd: list[str], venv: Path) -> None:
        super().__init__(sleep_cmd)
        self.venv = venv
        self.rpc: Any = None
        self.rpc_quick: QuickAckRpc | None = None
        self.program_extra = ""  # more lines for [program:s]

    def launch(self, n: int) -> None:
        (self.dir / "logs").mkdir()
        port = free_port()
        conf = self.dir / "supervisord.conf"
        conf.write_text(
            SUPERVISORD_CONF.format(
                dir=self.dir,
                port=port,
                command=shlex.join(self.sleep_cmd),
                n=n,
                program_extra=self.program_extra,
            )
        )
        self._spawn([str(self.venv / "bin" / "supervisord"), "-n", "-c", str(conf)])
        self.rpc = xmlrpc.client.ServerProxy(f"http://127.0.0.1:{port}/RPC2")

        def ready() -> bool:
            self._alive()
            try:
                return bool(self.rpc.supervisor.getState()["statename"] == "RUNNING")
            except (OSError, xmlrpc.client.Error, http.client.HTTPException):
                self.rpc = xmlrpc.client.ServerProxy(f"http://127.0.0.1:{port}/RPC2")
                return False

        wait_for(ready, 30, "supervisord's XML-RPC")
        self.rpc_quick = QuickAckRpc(port)

    def start_all(self, n: int) -> None:
        self.rpc.supervisor.startAllProcesses(False)

    def stop_all(self) -> None:
        self.rpc.supervisor.stopAllProcesses(True)

    def start_all_again(self) -> None:
        # what `supervisorctl start all` sends: answered once all are started
        self.rpc.supervisor.startAllProcesses(True)

    def rolling_restart(self, names: list[str]) -> None:
        # supervisord has no rolling restart: a script (or supervisorctl
        # restart, one name at a time) stops and starts each in turn
        for name in names:
            self.rpc.supervisor.stopProcess(f"s:{name}", True)
            self.rpc.supervisor.startProcess(f"s:{name}", True)

    def states(self) -> dict[str, tuple[bool, int | None]]:
        infos = self.rpc.supervisor.getAllProcessInfo()
        return {i["name"]: (i["statename"] == "RUNNING", i["pid"] or None) for i in infos}

    def one(self, name: str) -> tuple[bool, int | None]:
        i = self.rpc.supervisor.getProcessInfo(f"s:{name}")
        return i["statename"] == "RUNNING", i["pid"] or None

    def status_call(self) -> int:
        return len(self.rpc.supervisor.getAllProcessInfo())

    def status_call_quickack(self) -> int:
        assert self.rpc_quick is not None
        return len(self.rpc_quick.call("supervisor.getAllProcessInfo"))

    def stop(self) -> list[str]:
        if self.rpc is not None:
            with contextlib.suppress(Exception):
                self.rpc("close")()
        if self.rpc_quick is not None:
            self.rpc_quick.close()
        return super().stop()


# Measures ---------------------------------------------------------------------


@dataclass
class Sample:
    daemon: str
    n: int
    run: int
    start_s: float = 0.0
    restart_ms: float = 0.0
    restart_all_ms: list[float] = field(default_factory=list)
    status_p50_ms: float = 0.0
    status_cps: float = 0.0
    status_calls: int = 0
    status_qa_p50_ms: float | None = None  # supervisord, TCP_QUICKACK client
    status_qa_cps: float | None = None
    rss_mib: float = 0.0
    idle_cpu_pct: float | None = None
    start_app_s: float | None = None  # all N stopped, then one start-all call
    count_create_s: float | None = None  # branchd: N more made and started in one call
    rolling_s: float | None = None  # a rolling restart of all N, one at a time
    problems: list[str] = field(default_factory=list)
    error: str | None = None  # the sample failed; it is left out of the medians


#: The per-sample figures the table aggregates.
NUMERIC = (
    "start_s",
    "restart_ms",
    "status_p50_ms",
    "status_cps",
    "status_qa_p50_ms",
    "status_qa_cps",
    "rss_mib",
    "idle_cpu_pct",
    "start_app_s",
    "count_create_s",
    "rolling_s",
)


def measure_start(d: Supervised, n: int) -> float:
    t0 = time.perf_counter()
    d.start_all(n)

    def all_running() -> bool:
        st = d.states()
        return len(st) == n and all(running for running, _ in st.values())

    wait_for(all_running, 120, f"{n} sleepers running under {d.label}", interval=0.01)
    return time.perf_counter() - t0


def measure_start_again(d: Supervised, n: int) -> float:
    """Seconds of one start-all call of the N sleepers, all stopped before
    (the call answers once all run; a status call then checks it)."""
    d.stop_all()
    if any(running for running, _ in d.states().values()):
        raise RuntimeError(f"{d.label}: not all stopped")
    t0 = time.perf_counter()
    d.start_all_again()
    spent = time.perf_counter() - t0
    st = d.states()
    if len(st) != n or not all(running for running, _ in st.values()):
        raise RuntimeError(f"{d.label}: start-all answered before all ran")
    return spent


def measure_rolling(d: Supervised, n: int, limit: int) -> float | None:
    """Seconds of a rolling restart (one at a time) of the N sleepers, when N <= limit."""
    if n > limit:
        return None
    before = d.states()
    t0 = time.perf_counter()
    d.rolling_restart(sorted(before))
    spent = time.perf_counter() - t0
    after = d.states()
    same = [k for k, (running, pid) in after.items() if not running or pid == before[k][1]]
    if same:
        raise RuntimeError(f"{d.label}: not restarted, or not running: {same[:3]}")
    return spent


def measure_restart(d: Supervised, names: list[str], kills: int, poll: float) -> list[float]:
    """Seconds from each kill -9 to the new pid reported running."""
    out: list[float] = []
    step = 7 if len(names) % 7 else 1  # spread the victims over the list
    for k in range(kills):
        name = names[(k * step) % len(names)]

        def up(name: str = name) -> int | None:
            running, pid = d.one(name)
            return pid if running else None

        pid: int = wait_for(up, 30, f"{name} running")
        victim = psutil.Process(pid)
        if victim.ppid() != d.pid:  # never kill something that is not its child
            raise RuntimeError(f"pid {pid} of {name} is not a child of {d.label}")
        t0 = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        while True:
            running, new = d.one(name)
            if running and new is not None and new != pid:
                break
            if time.perf_counter() - t0 > 30:
                raise RuntimeError(f"{d.label} did not restart {name} within 30 s")
            if poll:
                time.sleep(poll)
        out.append(time.perf_counter() - t0)
        time.sleep(0.1)
    return out


def measure_status(
    d: Supervised, n: int, secs: float, call: Callable[[], int] | None = None
) -> tuple[float, float, int]:
    """(p50 seconds, calls per second, calls) of sequential status calls."""
    call = call or d.status_call
    lat: list[float] = []
    start = time.perf_counter()
    end = start + secs
    while True:
        t = time.perf_counter()
        if t >= end:
            break
        got = call()
        lat.append(time.perf_counter() - t)
        if got != n:
            raise RuntimeError(f"{d.label} listed {got} instances, expected {n}")
    wall = time.perf_counter() - start
    return statistics.median(lat), len(lat) / wall, len(lat)


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def measure_idle(pid: int, secs: float) -> float:
    """CPU of the daemon process alone over secs, in % of one core."""
    c0, w0 = cpu_seconds(pid), time.perf_counter()
    time.sleep(secs)
    c1, w1 = cpu_seconds(pid), time.perf_counter()
    return 100.0 * (c1 - c0) / (w1 - w0)


@dataclass
class Options:
    counts: list[int]
    runs: int
    kills: int
    status_secs: float
    idle_secs: float
    idle_once: bool
    settle_secs: float
    poll: float
    keep: bool
    out: Path
    json_out: Path | None
    branchd_python: str
    sleep_cmd: list[str]
    rolling_max: int = 50
    log_mb: int = 200
    logs_only: bool = False


def bench_one(d: Supervised, n: int, run: int, opts: Options, with_idle: bool) -> Sample:
    s = Sample(daemon=d.label, n=n, run=run)
    try:
        d.launch(n)
        s.start_s = measure_start(d, n)
        log(f"  {d.label} N={n}: all running in {s.start_s:.3f} s")
        names = sorted(d.states())
        lat = measure_restart(d, names, opts.kills, opts.poll)
        s.restart_all_ms = [round(x * 1000, 3) for x in lat]
        s.restart_ms = statistics.median(lat) * 1000
        log(f"  {d.label} N={n}: restart median {s.restart_ms:.1f} ms (max {max(lat) * 1000:.1f})")
        p50, cps, calls = measure_status(d, n, opts.status_secs)
        s.status_p50_ms, s.status_cps, s.status_calls = p50 * 1000, cps, calls
        log(f"  {d.label} N={n}: status p50 {s.status_p50_ms:.2f} ms, {cps:.0f} calls/s")
        if isinstance(d, Supervisord):
            p50, cps, _ = measure_status(d, n, opts.status_secs, d.status_call_quickack)
            s.status_qa_p50_ms, s.status_qa_cps = p50 * 1000, cps
            log(f"  {d.label} N={n}: status (TCP_QUICKACK client) p50 {p50 * 1000:.2f} ms")
        # Let the dust of the last calls settle before the idle window.
        time.sleep(opts.settle_secs)
        if with_idle:
            s.idle_cpu_pct = measure_idle(d.pid, opts.idle_secs)
            log(f"  {d.label} N={n}: idle CPU {s.idle_cpu_pct:.3f} % over {opts.idle_secs:.0f} s")
        s.rss_mib = psutil.Process(d.pid).memory_info().rss / MiB
        log(f"  {d.label} N={n}: RSS {s.rss_mib:.1f} MiB")
        s.start_app_s = measure_start_again(d, n)
        log(f"  {d.label} N={n}: start all (stopped, one call) {s.start_app_s:.3f} s")
        if isinstance(d, Branchd):
            s.count_create_s = d.count_create(n)
            log(f"  {d.label} N={n}: count create of {n} more {s.count_create_s:.3f} s")
        s.rolling_s = measure_rolling(d, n, opts.rolling_max)
        if s.rolling_s is not None:
            log(f"  {d.label} N={n}: rolling restart, one at a time {s.rolling_s:.3f} s")
        if len(d.states()) != n:
            raise RuntimeError(f"{d.label} lost instances")
    except Exception as exc:  # one failed sample must not lose the others
        s.error = f"{type(exc).__name__}: {exc}"
        log(f"  FAILED: {s.error}; state dir kept: {d.dir}")
        with contextlib.suppress(OSError):
            log("  daemon output (tail):\n" + d.log_path.read_text(errors="replace")[-3000:])
    finally:
        s.problems = d.stop()
        for p in s.problems:
            log(f"  WARNING: {p}")
        d.cleanup(opts.keep or s.error is not None)
    return s


def ensure_supervisor(venv: Path) -> str:
    exe = venv / "bin" / "supervisord"
    if not exe.exists():
        log(f"creating {venv} and installing supervisor")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "supervisor"], check=True)
    out = subprocess.run([str(exe), "--version"], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def source_state() -> str:
    """The commit measured, and whether branchd/ had uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "branchd"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "source: unknown (not a git checkout)"
    return f"commit {head}" + (" + uncommitted changes under branchd/" if dirty else "")


def branchd_version(python: str) -> str:
    out = subprocess.run(
        [python, "-c", "import branchd, sys; print(branchd.__version__, sys.version.split()[0])"],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    return out.stdout.strip()


# Report -----------------------------------------------------------------------


def cell(values: list[float], fmt: str) -> str:
    """median, with the min-max of the runs when there is more than one."""
    if not values:
        return "n/a"
    text = format(med(values), fmt)
    if len(values) > 1:
        text += f" [{format(min(values), fmt)}, {format(max(values), fmt)}]"
    return text


def table(samples: list[Sample], counts: list[int]) -> str:
    def vals(daemon: str, n: int, key: str) -> list[float]:
        out = []
        for s in samples:
            v = getattr(s, key)
            if s.daemon == daemon and s.n == n and v is not None and s.error is None:
                out.append(float(v))
        return out

    rows = [
        "| measure | N | branchd | supervisord | branchd ÷ supervisord | target (branchd) | met |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for n in counts:
        b = {k: vals("branchd", n, k) for k in NUMERIC}
        s = {k: vals("supervisord", n, k) for k in NUMERIC}

        def ratio(key: str, b: dict[str, list[float]] = b, s: dict[str, list[float]] = s) -> str:
            if not b[key] or not s[key] or med(s[key]) == 0:
                return "n/a"
            return f"{med(b[key]) / med(s[key]):.2f}x"

        rows.append(
            f"| start all, until all RUNNING (s) | {n} | {cell(b['start_s'], '.3f')} | "
            f"{cell(s['start_s'], '.3f')} | {ratio('start_s')} | — | — |"
        )
        rm = med(b["restart_ms"])
        rows.append(
            f"| restart after kill -9, median (ms) | {n} | {cell(b['restart_ms'], '.1f')} | "
            f"{cell(s['restart_ms'], '.1f')} | {ratio('restart_ms')} | ≤ {TARGET_RESTART_MS:.0f} "
            f"| {ok(rm <= TARGET_RESTART_MS)} |"
        )
        rows.append(
            f"| status of all, p50 latency (ms) | {n} | {cell(b['status_p50_ms'], '.2f')} | "
            f"{cell(s['status_p50_ms'], '.2f')} | {ratio('status_p50_ms')} | — | — |"
        )
        cps_ratio = med(b["status_cps"]) / med(s["status_cps"])
        rows.append(
            f"| status of all, calls/s | {n} | {cell(b['status_cps'], '.0f')} | "
            f"{cell(s['status_cps'], '.0f')} | {cps_ratio:.2f}x | ≥ {TARGET_STATUS_RATIO:.0f}x "
            f"supervisord | {ok(cps_ratio >= TARGET_STATUS_RATIO)} |"
        )
        if s["status_qa_cps"]:
            qa_ratio = med(b["status_cps"]) / med(s["status_qa_cps"])
            rows.append(
                f"| status of all, calls/s, supervisord client with TCP_QUICKACK¹ | {n} | "
                f"{cell(b['status_cps'], '.0f')} | {cell(s['status_qa_cps'], '.0f')} | "
                f"{qa_ratio:.2f}x | (≥ 3x, informative) | "
                f"{'yes' if qa_ratio >= TARGET_STATUS_RATIO else 'no'} |"
            )
            rows.append(
                f"| status of all, p50 latency, supervisord client with TCP_QUICKACK¹ (ms) | {n} | "
                f"{cell(b['status_p50_ms'], '.2f')} | {cell(s['status_qa_p50_ms'], '.2f')} | "
                f"{med(b['status_p50_ms']) / med(s['status_qa_p50_ms']):.2f}x | — | — |"
            )
        rss = med(b["rss_mib"])
        rss_target, rss_met = ("—", "—")
        if n == TARGET_RSS_AT:
            rss_target, rss_met = f"≤ {TARGET_RSS_MIB:.0f} MiB", ok(rss <= TARGET_RSS_MIB)
        rows.append(
            f"| daemon RSS (MiB) | {n} | {cell(b['rss_mib'], '.1f')} | "
            f"{cell(s['rss_mib'], '.1f')} | {ratio('rss_mib')} | {rss_target} | {rss_met} |"
        )
        if b["start_app_s"]:
            sa = med(b["start_app_s"])
            rows.append(
                f"| start all N stopped, one call²: app action vs startAllProcesses (s) | {n} | "
                f"{cell(b['start_app_s'], '.3f')} | {cell(s['start_app_s'], '.3f')} | "
                f"{ratio('start_app_s')} | ≤ supervisord | "
                f"{ok(bool(s['start_app_s']) and sa <= med(s['start_app_s']))} |"
            )
        if b["count_create_s"]:
            cc = med(b["count_create_s"])
            rows.append(
                f"| create and start N in one call⁴: count create vs startAllProcesses (s) | {n} | "
                f"{cell(b['count_create_s'], '.3f')} | {cell(s['start_app_s'], '.3f')} | "
                f"{cc / med(s['start_app_s']):.2f}x | ≤ supervisord | "
                f"{ok(bool(s['start_app_s']) and cc <= med(s['start_app_s']))} |"
            )
        if b["rolling_s"]:
            rows.append(
                f"| rolling restart, one at a time³ (s) | {n} | {cell(b['rolling_s'], '.3f')} | "
                f"{cell(s['rolling_s'], '.3f')} | {ratio('rolling_s')} | — | — |"
            )
        if b["idle_cpu_pct"]:
            idle = med(b["idle_cpu_pct"])
            rows.append(
                f"| idle CPU (% of one core) | {n} | {cell(b['idle_cpu_pct'], '.3f')} | "
                f"{cell(s['idle_cpu_pct'], '.3f')} | {ratio('idle_cpu_pct')} | "
                f"≤ {TARGET_IDLE_PCT} % | {ok(idle <= TARGET_IDLE_PCT)} |"
            )
    return "\n".join(rows)


def section(
    samples: list[Sample],
    opts: Options,
    info: dict[str, str],
    versions: dict[str, str],
    elapsed: float,
    argv: list[str],
) -> str:
    idle_runs = 1 if opts.idle_once else opts.runs
    problems = [p for s in samples for p in s.problems]
    problems += [
        f"run {s.run + 1}, N={s.n}, {s.daemon} failed: {s.error}" for s in samples if s.error
    ]
    lines = [
        HEADING,
        "",
        f"Measured {info['date']} with `python bench/supervisor_compare.py "
        f"{shlex.join(argv)}`".rstrip()
        + f" (took {elapsed / 60:.1f} min).",
        "",
        f"Machine: {info['nproc']} CPUs ({info['cpu']}), Linux {info['kernel']}, "
        f"Python {info['python']}; {versions['branchd']}; {versions['supervisord']}. "
        "Client and daemon share the machine.",
        "",
        f"Each cell is the median of {opts.runs} run(s), with the [min, max] of the runs "
        f"after it; idle CPU is measured in {idle_runs} run(s) per count"
        f"{' (--idle-once)' if opts.idle_once else ''}, over {opts.idle_secs:.0f} s.",
        "",
        table(samples, opts.counts),
        "",
        "How each figure is taken (see bench/README.md):",
        "",
        f"- Every daemon is fresh for each (run, N), with its own temp state dir, and "
        f"supervises N x `{shlex.join(opts.sleep_cmd)}` (no shell, the same argv for both). "
        "Both with **startsecs=0** and autorestart (branchd `always`, supervisord `true`); "
        "supervisord keeps its default `AUTO` child log files, branchd its own log files.",
        "- start: branchd gets one `POST /v1/apps/bench/instances` per instance, sequentially "
        "over one keep-alive connection; supervisord has the N programs in its config with "
        "`autostart=false` and gets one `supervisor.startAllProcesses(False)`. Timed from the "
        "first request until one status call shows all N RUNNING (polled every 10 ms).",
        f"- restart: {opts.kills} kills per run (SIGKILL to the child pid the API reports), "
        "timed until the API reports the instance running with another pid; the single "
        "instance is polled back to back (`GET /v1/apps/bench/instances/{name}` / "
        f"`supervisor.getProcessInfo`, {opts.poll * 1000:g} ms pause between polls). The "
        "figure includes one API round trip.",
        f"- status: sequential calls for {opts.status_secs:g} s from one client: branchd "
        "`GET /v1/apps/bench/instances` (all N; http.client, keep-alive, JSON decoded), "
        "supervisord `supervisor.getAllProcessInfo` (xmlrpc.client.ServerProxy, decoded).",
        "- ¹ supervisord's medusa server writes its answer in 4 KiB sends without "
        "TCP_NODELAY: past the first 4 KiB, Nagle on its side waits for the client's "
        "delayed ACK (~40 ms on Linux), which xmlrpc.client (and supervisorctl) always "
        "suffer. The ¹ rows take the same call, same window, through a minimal XML-RPC "
        "client that sets TCP_QUICKACK before every recv(), i.e. supervisord's own cost "
        "without that stall. The target is judged on the stock-client row, as specified.",
        "- ² start all N stopped, one call (issue 15): after the other measures, every "
        "sleeper is stopped (branchd `POST /v1/apps/bench/stop`, supervisord "
        "`stopAllProcesses(True)`), then one call starts them all and answers once all run: "
        "branchd `POST /v1/apps/bench/start` (the app action), supervisord "
        "`startAllProcesses(True)` (what `supervisorctl start all` sends). Timed from the "
        "call to its answer; a status call then checks that all N run.",
        "- ⁴ count create (branchd only; supervisord's figure is its startAllProcesses "
        "above, since its N are declared in its config): one `POST "
        "/v1/apps/bench2/instances` with `count` N and a name template makes and starts N "
        "more sleepers, timed until all run (the answer says so, else the listing is polled); "
        "then that app is removed.",
        f"- ³ rolling restart (N ≤ {opts.rolling_max}): branchd one `POST "
        "/v1/apps/bench/restart?rolling=1&batch=1` (each one running again before the "
        "next); supervisord has none, so a script does `stopProcess(name, True)` then "
        "`startProcess(name, True)` for each. Timed from the first call to the last answer; "
        "then every sleeper runs with a new pid.",
        "- RSS: resident set of the daemon process alone (psutil), after the idle window. "
        "Idle CPU: user+system CPU time of the daemon process alone over the window, "
        f"no client talking to it, after a {opts.settle_secs:g} s settle.",
    ]
    if problems:
        lines += ["", "Problems during the run:", "", *[f"- {p}" for p in problems]]
    return "\n".join(lines) + "\n"


# Log throughput (issue 15) --------------------------------------------------

LOG_HEADING = "## Log throughput vs supervisord (issue 15)"
LOG_MAX, LOG_BACKUPS = 10 * 1024 * 1024, 5
#: Writes argv[1] bytes of numbered 100-byte lines as fast as it can (64 KiB
#: writes), then its own seconds into argv[2], then idles.
LOG_CHILD = """
import os, sys, time
total, result = int(sys.argv[1]), sys.argv[2]
block = "".join("%09d %s\\n" % (j, "x" * 90) for j in range(655)).encode()  # 65,500 bytes
start = time.perf_counter()
for _ in range(total // len(block)):
    os.write(1, block)
os.write(1, b"%09d END\\n" % 0)
took = time.perf_counter() - start
with open(result + ".tmp", "w") as f:
    f.write(repr(took))
os.rename(result + ".tmp", result)
time.sleep(1e9)
"""


@dataclass
class LogSample:
    daemon: str
    run: int
    write_mb_s: float | None = None  # what the child could write
    landed_mb_s: float | None = None  # until its last line was in the file
    cpu_s_per_gb: float | None = None  # of the process that reads the pipe
    reader_rss_mib: float | None = None  # its resident set and its own (USS)
    reader_uss_mib: float | None = None
    error: str | None = None


def _log_child(d: Supervised, python: str, total: int) -> tuple[list[str], Path]:
    result, script = d.dir / "took", d.dir / "log_child.py"
    script.write_text(LOG_CHILD)  # (a file: supervisord's command is one line)
    return [python, str(script), str(total), str(result)], result


def _last_line_in(path: Path) -> bool:
    want = b" END\n"
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 200))
            return want in f.read()
    except FileNotFoundError:
        return False


def _pipe_reader(d: Supervised) -> psutil.Process:
    """supervisord itself; for branchd its log writer (started by the create)."""
    if not isinstance(d, Branchd):
        return psutil.Process(d.pid)
    logs = str(d.dir / "state" / "logs")

    def find() -> psutil.Process | None:
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info["cmdline"] or []
            if any(c.endswith("logwriter.py") for c in cmd) and logs in cmd:
                return p
        return None

    found: psutil.Process = wait_for(find, 10, "the log writer")
    return found


def measure_log_throughput(d: Supervised, python: str, total: int, run: int) -> LogSample:
    s = LogSample(daemon=d.label, run=run)
    argv, result = _log_child(d, python, total)
    try:
        began = time.perf_counter()
        if isinstance(d, Branchd):
            d.launch(0)
            # one quiet instance first, so that the log writer runs before the clock starts
            d.call(
                "POST",
                f"/v1/apps/{APP}/instances",
                {"name": "warm", "command": ["sleep", "100000"],
                 "startsecs": 0},
                expect=(201,),
            )
            reader = _pipe_reader(d)
            cpu0 = cpu_seconds(reader.pid)
            began = time.perf_counter()
            d.call(
                "POST",
                f"/v1/apps/{APP}/instances",
                {"name": "w", "command": argv, "startsecs": 0, "log_max_bytes": LOG_MAX,
                 "log_backups": LOG_BACKUPS},
                expect=(201,),
            )
            out = d.dir / "state" / "logs" / APP / "w.stdout.log"
        else:
            assert isinstance(d, Supervisord)
            d.sleep_cmd = argv
            out = d.dir / "logs" / "s.stdout.log"
            d.program_extra = (
                f"stdout_logfile={out}\nstdout_logfile_maxbytes={LOG_MAX}\n"
                f"stdout_logfile_backups={LOG_BACKUPS}\n"
            )
            d.launch(1)
            reader = _pipe_reader(d)
            cpu0 = cpu_seconds(reader.pid)
            began = time.perf_counter()
            d.rpc.supervisor.startProcess("s:s0000", False)
        wait_for(lambda: _last_line_in(out), 300, "the last line in the log")
        landed = time.perf_counter() - began
        wait_for(result.exists, 60, "the child's own figure")
        s.write_mb_s = total / 1e6 / float(result.read_text())
        s.landed_mb_s = total / 1e6 / landed
        s.cpu_s_per_gb = (cpu_seconds(reader.pid) - cpu0) / (total / 1e9)
        mem = reader.memory_full_info()
        s.reader_rss_mib, s.reader_uss_mib = mem.rss / 2**20, mem.uss / 2**20
        files = [out, *(out.with_name(f"{out.name}.{n}") for n in range(1, LOG_BACKUPS + 2))]
        if sum(f.stat().st_size for f in files if f.exists()) > LOG_MAX * (LOG_BACKUPS + 1):
            s.error = "the size bound was not held"
    except Exception as e:  # a failed run is reported, never the end of the bench
        s.error = f"{type(e).__name__}: {e}"
    finally:
        d.stop()
        d.cleanup(keep=False)
    return s


def log_section(samples: list[LogSample], runs: int, total: int, info: dict[str, str],
                versions: dict[str, str]) -> str:
    rows = [
        "| daemon | child writes, MB/s | landed in the file, MB/s | CPU s per GB "
        "(pipe reader) | pipe reader RSS / USS, MiB |",
        "|---|---|---|---|---|",
    ]
    for daemon in ("branchd", "supervisord"):
        mine = [x for x in samples if x.daemon == daemon and x.error is None]
        rows.append(
            f"| {daemon} | {cell([x.write_mb_s for x in mine if x.write_mb_s], '.0f')} "
            f"| {cell([x.landed_mb_s for x in mine if x.landed_mb_s], '.0f')} "
            f"| {cell([x.cpu_s_per_gb for x in mine if x.cpu_s_per_gb], '.2f')} "
            f"| {cell([x.reader_rss_mib for x in mine if x.reader_rss_mib], '.1f')} / "
            f"{cell([x.reader_uss_mib for x in mine if x.reader_uss_mib], '.1f')} |"
        )
    errors = [f"- run {x.run + 1}, {x.daemon}: {x.error}" for x in samples if x.error]
    lines = [
        LOG_HEADING,
        "",
        f"Measured {info['date']} with `python bench/supervisor_compare.py --logs-only "
        f"--log-mb {total // 1_000_000} --runs {runs}`.",
        "",
        f"Machine: {info['nproc']} CPUs ({info['cpu']}), Linux {info['kernel']}, "
        f"Python {info['python']}; {versions['branchd']}; {versions['supervisord']}.",
        "",
        f"One child writes {total / 1e6:.0f} MB of 100-byte lines as fast as it can "
        f"(the same 64 KiB block again and again, so the child costs little) with rotation "
        f"on for both: {LOG_MAX // 2**20} MiB files, "
        f"{LOG_BACKUPS} backups. \"child writes\" is the child's own rate (its writes "
        "return once the bytes are in the pipe); \"landed\" runs from the start request "
        "until the last line is in the log file; CPU is the user+system time of the process "
        "that reads the pipe and writes the files (branchd's log writer, supervisord itself) "
        "over that time. Median of the runs, [min, max] after it. The machine is shared "
        "(2 cores, other work on it): the rates are noisy, the CPU figure less so.",
        "",
        *rows,
        "",
        "branchd: the pipe goes to the branch's log writer, which rotates at write time by "
        "rename (docs/guide.md, \"Logs and rotation\"); supervisord reads the pipe in its "
        "own select loop and rotates its files the same way. The pipe reader's memory is "
        "taken after the run: branchd's log writer (one per branch, whatever the number "
        "of instances) against the whole supervisord daemon, for scale.",
    ]
    if errors:
        lines += ["", "Problems:", "", *errors]
    return "\n".join(lines) + "\n"


def run_log_bench(opts: Options, info: dict[str, str], versions: dict[str, str]) -> str:
    total = opts.log_mb * 1_000_000
    samples: list[LogSample] = []
    for run in range(opts.runs):
        for make in daemons(opts, run):
            d = make()
            log(f"log throughput run {run + 1}/{opts.runs}: {d.label}")
            samples.append(measure_log_throughput(d, opts.branchd_python, total, run))
            log(f"  {samples[-1]}")
    return log_section(samples, opts.runs, total, info, versions)


# Main -------------------------------------------------------------------------


def parse_args(argv: list[str]) -> Options:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--counts", default="50,200", help="instance counts (default 50,200)")
    p.add_argument("--runs", type=int, default=3, help="runs of every measure (default 3)")
    p.add_argument("--kills", type=int, default=20, help="kill -9 per run (default 20)")
    p.add_argument("--status-secs", type=float, default=5.0, help="status window (default 5)")
    p.add_argument("--idle-secs", type=float, default=30.0, help="idle window (default 30)")
    p.add_argument(
        "--idle-once",
        action="store_true",
        help="measure idle CPU in the first run only (saves (runs-1) x 2 x counts x idle-secs)",
    )
    p.add_argument("--settle-secs", type=float, default=3.0, help="pause before idle (default 3)")
    p.add_argument(
        "--poll", type=float, default=0.001, help="pause between restart polls, s (default 0.001)"
    )
    p.add_argument(
        "--rolling-max",
        type=int,
        default=50,
        help="rolling restart measured for counts up to this (default 50)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp state dirs")
    p.add_argument(
        "--out", type=Path, default=ROOT / "docs" / "benchmarks.md", help="markdown to update"
    )
    p.add_argument("--no-out", action="store_true", help="only print the table")
    p.add_argument("--json", type=Path, default=None, help="also dump every sample as JSON")
    default_py = ROOT / ".venv" / "bin" / "python"
    p.add_argument(
        "--branchd-python",
        default=str(default_py) if default_py.exists() else sys.executable,
        help="python that runs branchd (default: the project .venv)",
    )
    p.add_argument(
        "--log-mb", type=int, default=200, help="log throughput: MB a child writes (0: skip)"
    )
    p.add_argument("--logs-only", action="store_true", help="only the log throughput")
    a = p.parse_args(argv)
    sleep = shutil.which("sleep")
    if sleep is None:
        p.error("coreutils sleep not found")
    counts = [int(c) for c in a.counts.split(",") if c.strip()]
    if not counts or min(counts) < 1 or a.runs < 1 or a.kills < 1:
        p.error("counts, runs and kills must be positive")
    return Options(
        counts=counts,
        runs=a.runs,
        kills=a.kills,
        status_secs=a.status_secs,
        idle_secs=a.idle_secs,
        idle_once=a.idle_once,
        settle_secs=a.settle_secs,
        poll=a.poll,
        keep=a.keep,
        out=a.out if not a.no_out else Path(),
        json_out=a.json,
        branchd_python=a.branchd_python,
        sleep_cmd=[sleep, "100000"],
        rolling_max=a.rolling_max,
        log_mb=a.log_mb,
        logs_only=a.logs_only,
    )


def daemons(opts: Options, run: int) -> Iterator[Callable[[], Supervised]]:
    """Both daemons, alternating which goes first from run to run."""
    makers: list[Callable[[], Supervised]] = [
        lambda: Branchd(opts.sleep_cmd, opts.branchd_python),
        lambda: Supervisord(opts.sleep_cmd, SUP_VENV),
    ]
    yield from makers if run % 2 == 0 else reversed(makers)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    opts = parse_args(argv)
    began = time.perf_counter()
    versions = {
        "supervisord": f"supervisord {ensure_supervisor(SUP_VENV)}",
        "branchd": f"branchd {branchd_version(opts.branchd_python).split()[0]} ({source_state()})",
    }
    info = machine()
    log(
        f"{versions['branchd']} vs {versions['supervisord']}; counts {opts.counts}, "
        f"{opts.runs} run(s), idle {opts.idle_secs:g} s"
    )
    if opts.log_mb > 0:
        text = run_log_bench(opts, info, versions)
        print(text)
        if opts.out != Path():
            write_section(opts.out, LOG_HEADING, text)
            log(f"wrote {opts.out}")
    if opts.logs_only:
        return 0
    samples: list[Sample] = []
    for run in range(opts.runs):
        for n in opts.counts:
            for make in daemons(opts, run):
                d = make()
                log(f"run {run + 1}/{opts.runs}, N={n}: {d.label}")
                with_idle = opts.idle_secs > 0 and (run == 0 or not opts.idle_once)
                samples.append(bench_one(d, n, run, opts, with_idle))
    elapsed = time.perf_counter() - began
    text = section(samples, opts, info, versions, elapsed, argv)
    print(text)
    if opts.json_out is not None:
        opts.json_out.parent.mkdir(parents=True, exist_ok=True)
        opts.json_out.write_text(
            json.dumps(
                {"machine": info, **versions, "samples": [asdict(s) for s in samples]}, indent=1
            )
        )
    if opts.out != Path():
        write_section(opts.out, HEADING, text)
        log(f"wrote {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
