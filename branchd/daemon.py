"""Composition root: builds the store, launcher, local services and API; owns signals."""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import IO, TYPE_CHECKING

from aiohttp import web

from branchd import __version__
from branchd.api.app import make_app
from branchd.api.events import ClusterEvents, Journal
from branchd.api.forward import (
    ClusterDirectory,
    Directory,
    Forwarder,
    LocalDirectory,
    NoForwarder,
)
from branchd.api.meters import Sources
from branchd.api.roles import TokenBook
from branchd.branch import BranchService, SystemProbe
from branchd.clock import LoopScheduler, SystemClock
from branchd.config import (
    SLOTS_PER_CPU,
    Config,
    NamedToken,
    is_loopback,
    is_token_table,
    load,
    parse_bind,
    read_token_table,
)
from branchd.errors import BranchdError, ConfigError
from branchd.events import EventBus
from branchd.local import Holdings, LocalBranch
from branchd.local import build as build_local
from branchd.model import State
from branchd.process.cgroups import CgroupTree
from branchd.process.launcher import ProcessLauncher
from branchd.process.logpipes import LogPipes
from branchd.sdnotify import Notifier, NotifySettings
from branchd.state import ensure_token, secure_database, secure_dir
from branchd.store import Store
from branchd.views import BranchRecord, Capacity, need_for

if TYPE_CHECKING:  # loaded only by a branch that clusters
    import ssl

    from branchd.cluster.discovery import Discovery
    from branchd.cluster.replica import Declared
    from branchd.cluster.service import ClusterService

log = logging.getLogger("branchd")

#: The store's mark of a drained branch (``POST /v1/branches/{id}/drain``).
DRAINING_MARK = "branch:draining"

#: Named exit codes of the entry point.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_LOCKED = 3


class Exit(StrEnum):
    """How the daemon was asked to end."""

    STOP = "stop"  # stop every instance, then exit (SIGTERM, SIGINT)
    KEEP = "keep"  # leave instances running for an upgrade (SIGUSR2)


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.url: str | None = None
        self._signals: list[Exit] = []
        self._wake = asyncio.Event()
        self._discovery: Discovery | None = None
        self._reload = asyncio.Event()
        self.notifier = Notifier(NotifySettings.from_env(os.environ, os.getpid()))
        #: The tokens in force; the named ones reread on SIGHUP.
        self.tokens = TokenBook(
            config.api.token if config.api.auth else None, config.api.tokens
        )

    def request_exit(self, how: Exit) -> None:
        # Only record it (uvicorn's way); run() decides what to do.
        self._signals.append(how)
        self._wake.set()

    def request_reload(self) -> None:
        self._reload.set()  # (SIGHUP: recorded; _reloads() rereads the token file)

    def reload_tokens(self) -> None:
        """Reread the token file of named tokens; a bad one is said and the
        tokens in force are kept (a typo must not lock every operator out)."""
        path = self.config.api.token_file
        try:
            text = path.read_text(encoding="utf-8") if path is not None else ""
        except (OSError, UnicodeDecodeError) as exc:
            log.error("SIGHUP: cannot read token file %s (%s): tokens unchanged", path, exc)
            return
        if path is None or not is_token_table(text):
            log.warning(
                "SIGHUP: no token file of [tokens.NAME] tables to reload (a one-token "
                "file is read at start only)"
            )
            return
        try:
            named = read_token_table(path)
        except BranchdError as exc:
            log.error("SIGHUP: %s: tokens unchanged", exc.message)
            return
        self.tokens.replace(named)
        log.info("SIGHUP: token file %s reloaded: %s", path, _roles_of(named))
        self.notifier.status(f"token file reloaded ({len(named)} named tokens)")

    async def _reloads(self) -> None:
        while True:
            await self._reload.wait()
            self._reload.clear()
            self.reload_tokens()

    async def _watchdog(self, every: float) -> None:
        # From the event loop itself: a loop that stops turning stops these,
        # and systemd restarts the daemon after WatchdogSec.
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(every)

    async def run(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        clock = SystemClock()
        store = Store(cfg.db_path, clock)  # its hybrid clock reads this wall time
        # the branch's log writer: it outlives us, and the next daemon finds it
        tls = _tls_contexts(cfg) if cfg.tls else None
        pipes = LogPipes(cfg.log_dir)
        background: list[asyncio.Task[None]] = []
        try:
            bus = EventBus()
            scheduler = LoopScheduler(clock)
            branch_id = store.branch_id()
            # numbered from the first event (adoptions too): GET /v1/events
            journal = Journal(branch_id, int(clock.wall() * 1000), clock.wall)
            bus.listen(journal.append)
            cgroups = CgroupTree.probe(branch_id) if cfg.supervision.cgroups else None
            launcher = ProcessLauncher(loop, pipes, cgroups=cgroups)
            log.info("instances are kept in %s mode", launcher.supervision.value)
            local = build_local(
                store,
                launcher,
                clock,
                cfg,
                branch_id,
                scheduler=scheduler,
                # (remote: kombu's, made with the Celery layer at its first need)
                bus=bus,
                log_pipes=pipes,
            )
            self.notifier.status("adopting instances")
            await local.start()
            empty = Capacity(1, (0.0, 0.0, 0.0), 0, 0, 0)  # the service reads the host now
            cpus = os.cpu_count() or 1
            started = clock.wall()
            branch = BranchService(
                BranchRecord(
                    id=local.branch_id,
                    hostname=socket.gethostname(),
                    version=__version__,
                    started_at=started,
                    address=f"{cfg.api.host}:{cfg.api.port}",
                    capacity=empty,
                    # a restart is a new run: a higher epoch replaces the old at once
                    epoch=int(started * 1000),
                ),
                SystemProbe(),
                bus,
                [f"{s.app}/{s.name}" for s in local.instances.specs()],
                running=running_workers(local),
                scheduler=scheduler,
                interval=cfg.cluster.record_interval,
                max_instances=cfg.cluster.max_instances,
                slots=cfg.cluster.slots or SLOTS_PER_CPU * cpus,
                slots_used=lambda: slots_used(local, cpus),
            )
            branch.start()
            cluster = (
                _cluster(
                    cfg,
                    branch,
                    scheduler,
                    bus,
                    local.apps,
                    local.holdings,
                    tls[1] if tls else None,
                )
                if cfg.cluster.enabled
                else None
            )
            directory: Directory = LocalDirectory()
            forwarder: Forwarder = NoForwarder()
            gatherer = placer = drain = moves = None
            cluster_events: ClusterEvents | None = None
            if cluster is not None:
                import random

                # an app's rate limits: a total over its running workers on
                # every branch (a worker elsewhere starts or stops: ours re-split)
                local.layer.count_elsewhere(cluster)
                cluster.on_running = local.layer.resplit

                from branchd.api.proxy import HttpForwarder, gather, place
                from branchd.placement import Recent

                # a named instance's routes go to the branch that holds it
                proxy = HttpForwarder(cluster, cfg.api.token, tls=tls[1] if tls else None)
                directory, forwarder = ClusterDirectory(cluster), proxy
                cluster_events = ClusterEvents(cluster, proxy)

                peers = cluster

                def gatherer(
                    request: web.Request, local: web.StreamResponse
                ) -> Awaitable[web.StreamResponse]:
                    return gather(proxy, peers, request, local)

                rng = random.Random()
                recent = Recent()  # what this branch placed that records may not say yet

                def drain(on: bool) -> None:
                    # kept across a restart: a drained machine stays drained
                    store.set_mark(DRAINING_MARK, on)
                    branch.set_draining(on)
                    log.info("branch %s %s", branch.record().id, "drains" if on else "undrained")

                branch.set_draining(bool(store.marks(DRAINING_MARK)))

                from branchd.api.move import Mover

                moves = Mover(
                    proxy,
                    cluster,
                    local,
                    local.holdings,
                    scheduler,
                    draining=lambda: branch.record().capacity.draining,
                )

                async def placer(
                    request: web.Request, here: Callable[[], Awaitable[web.StreamResponse]]
                ) -> web.StreamResponse:
                    app = await local.apps.get_app(request.match_info["app"])  # (404: none)
                    return await place(proxy, peers, request, here, app, rng, recent)
            runner = web.AppRunner(
                make_app(
                    local,
                    token=cfg.api.token,
                    tokens=self.tokens,
                    loopback=is_loopback(cfg.api.host),
                    max_body=cfg.api.max_body,
                    listings_at_once=cfg.api.listings_at_once,
                    branch=branch.record,
                    directory=directory,
                    forwarder=forwarder,
                    cluster=cluster,
                    gatherer=gatherer,
                    placer=placer,
                    drain=drain,
                    moves=moves,
                    on_exit=lambda keep: self.request_exit(Exit.KEEP if keep else Exit.STOP),
                    daemon={
                        "pid": os.getpid(),
                        "state_dir": str(cfg.state_dir),
                        "supervision": launcher.supervision.value,
                    },
                    journal=journal,
                    cluster_events=cluster_events,
                    metric_sources=Sources(
                        celery=local.layer.worker_figures,
                        gossip=cluster.counters if cluster is not None else None,
                        members=cluster.branches if cluster is not None else None,
                        streams=lambda: journal.streams,
                        depths=local.layer.known_depths,
                    ),
                    metrics_public=cfg.api.metrics_public,
                ),
                access_log=None,
                shutdown_timeout=2.0,
            )
            await runner.setup()
            site = web.TCPSite(
                runner, cfg.api.host, cfg.api.port, ssl_context=tls[0] if tls else None
            )
            try:
                await site.start()
            except OSError as exc:
                await branch.close()
                await local.shutdown(keep=True)
                raise ConfigError(
                    f"cannot listen on {cfg.api.host}:{cfg.api.port}: {exc.strerror}"
                ) from None
            host, port = runner.addresses[0][:2]
            scheme = "https" if tls else "http"
            self.url = f"{scheme}://{host if ':' not in host else f'[{host}]'}:{port}"
            if cluster is None:
                branch.with_address(api_url=self.url)  # (a cluster of one: as bound)
            else:
                try:
                    await self._start_cluster(cluster, branch, port)
                except BranchdError:
                    await runner.cleanup()
                    await branch.close()
                    await local.shutdown(keep=True)
                    raise
            (cfg.state_dir / "branchd.url").write_text(self.url + "\n")
            for sig, how in (
                (signal.SIGTERM, Exit.STOP),
                (signal.SIGINT, Exit.STOP),
                (signal.SIGUSR2, Exit.KEEP),
            ):
                loop.add_signal_handler(sig, self.request_exit, how)
            loop.add_signal_handler(signal.SIGHUP, self.request_reload)
            background.append(asyncio.ensure_future(self._reloads()))
            every = self.notifier.settings.watchdog_every
            if every is not None:
                background.append(asyncio.ensure_future(self._watchdog(every)))
            # READY=1 once the API listens and the instances were adopted
            self.notifier.ready(
                f"listening on {self.url}, {len(local.instances.specs())} instances"
            )
            log.info(
                "branchd %s (branch %s) listening on %s, state in %s",
                __version__,
                local.branch_id,
                self.url,
                cfg.state_dir,
            )
            await self._wake.wait()
            how = self._signals[0]
            self.notifier.stopping(
                "stopping instances" if how == Exit.STOP else "exiting, instances keep running"
            )
            log.info(
                "exiting (%s): %s",
                how.value,
                "stopping instances" if how == Exit.STOP else "instances keep running",
            )
            if moves is not None:
                await moves.close()  # (a move under way ends; what it made stays)
            if cluster is not None:
                if self._discovery is not None:
                    await self._discovery.close()
                # goodbye first, while the API still answers push-pulls: the
                # others see "left" (never dead) within a second
                await cluster.leave(timeout=2.0)
                await cluster.close()
            close = getattr(forwarder, "close", None)
            if close is not None:
                await close()
            await runner.cleanup()
            await branch.close()
            await local.shutdown(keep=how == Exit.KEEP)
        finally:
            for task in background:
                task.cancel()
            self.notifier.close()
            pipes.close()
            store.close()


    async def _start_cluster(
        self, cluster: ClusterService, branch: BranchService, api_port: int
    ) -> None:
        cfg = self.config
        adv_host, adv_port = _advertised(cfg, api_port)
        scheme = "https" if cfg.tls else "http"
        branch.with_address(
            api_url=f"{scheme}://{_bracketed(adv_host)}:{adv_port}",
            address=f"{_bracketed(adv_host)}:{adv_port}",
        )
        try:
            await cluster.start()
        except BranchdError as exc:
            await cluster.close()
            raise ConfigError(exc.message) from None
        branch.with_address(gossip_addr=cluster.gossip_addr or "")
        branch.on_change = cluster.announce
        cluster.announce()
        if cfg.cluster.zeroconf and not is_loopback(adv_host):
            self._discovery = await _discover(cluster, branch, adv_host, adv_port, cfg.tls)
        log.info(
            "clustering: gossip on %s (advertised %s), API advertised as %s%s",
            cfg.cluster.gossip or "the API port + 1",
            cluster.gossip_addr,
            branch.record().api_url,
            f", joining via {', '.join(cfg.cluster.join)}" if cfg.cluster.join else "",
        )


async def _discover(
    cluster: ClusterService, branch: BranchService, host: str, api_port: int, tls: bool
) -> Discovery | None:
    """Announce this branch and join whoever zeroconf finds (a LAN address
    only). A failure to start is said once; the branch clusters without it."""
    from branchd.cluster.discovery import Announcement, Peer, ZeroconfDiscovery
    from branchd.cluster.transport import split_addr

    rec = branch.record()
    try:
        _, gossip_port = split_addr(rec.gossip_addr)
        me = Announcement(rec.id, rec.version, api_port, gossip_port, rec.epoch)

        def found(peer: Peer) -> None:
            # (a branch with TLS is one of a cluster with TLS: its peers' too)
            url = peer.api_url
            if tls and url.startswith("http://"):
                url = "https://" + url.removeprefix("http://")
            cluster.join([url])

        discovery = ZeroconfDiscovery(me, host, found)
        await discovery.start()
    except (BranchdError, OSError, ValueError) as exc:
        log.warning("zeroconf discovery is off: %s", exc)
        return None
    log.info("zeroconf: announcing %s on %s", discovery.name, host)
    return discovery


def _wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::", "")


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _default_address() -> str:
    """This host's address on its default route (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: only the route is looked up
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def _advertised(cfg: Config, api_port: int) -> tuple[str, int]:
    """The API's HOST:PORT as the other branches dial it."""
    if cfg.cluster.advertise:
        return parse_bind(cfg.cluster.advertise, what="advertise")
    host = cfg.api.host
    return (_default_address() if _wildcard(host) else host), api_port


def _gossip_bind(cfg: Config) -> tuple[str, int]:
    if cfg.cluster.gossip:
        return parse_bind(cfg.cluster.gossip, what="gossip")
    # the API port + 1; a free one when the API's is picked by the system (tests)
    return cfg.api.host, (cfg.api.port + 1 if cfg.api.port else 0)


def slots_used(local: LocalBranch, cpus: int) -> int:
    """What this branch's instances take of its slots (``views.need_for``)."""
    specs = local.instances.specs()
    apps = {name: local.apps.find_app(name) for name in {s.app for s in specs}}
    return sum(need_for(s, apps[s.app], cpus=cpus).slots for s in specs)


def running_workers(local: LocalBranch) -> list[str]:
    """``app/name`` of the Celery workers running now (adopted ones, at start)."""
    engine = local.instances
    return [
        f"{s.app}/{s.name}"
        for s in engine.celery_instances()
        if (p := engine.proc(s.name)) is not None and p.state == State.RUNNING
    ]


def _cluster(
    cfg: Config,
    branch: BranchService,
    scheduler: LoopScheduler,
    bus: EventBus,
    declarations: Declared,
    holdings: Holdings,
    tls: ssl.SSLContext | None = None,
) -> ClusterService:
    """The cluster service of a branch that clusters (not started yet)."""
    from branchd.cluster.service import ClusterService, HttpPeerClient, Settings, load_keyring
    from branchd.cluster.timing import MembershipConfig

    keys_path = cfg.state_dir / "cluster-keys"
    try:
        keyring = load_keyring(keys_path, cfg.cluster.key)
    except BranchdError as exc:
        raise ConfigError(exc.message) from None
    if keyring is not None and not keys_path.exists():
        from branchd.cluster.service import save_keyring

        save_keyring(keys_path, keyring)
    membership = replace(MembershipConfig.profile(cfg.cluster.profile), **cfg.cluster.timers())
    host, port = _gossip_bind(cfg)
    adv_host, _ = _advertised(cfg, cfg.api.port)
    advertise = f"{_bracketed(adv_host)}:{port}" if port and (
        cfg.cluster.advertise or _wildcard(host)
    ) else None
    settings = Settings(
        branch_id=branch.record().id,
        epoch=branch.record().epoch,
        gossip_bind=f"{_bracketed(host)}:{port}",
        gossip_advertise=advertise,
        join=cfg.cluster.join,
        membership=membership,
        join_retry_max=cfg.cluster.join_retry_max,
        keys_path=keys_path,
    )
    return ClusterService(
        settings,
        scheduler=scheduler,
        bus=bus,
        record=branch.record,
        keyring=keyring,
        # without a key (loopback only) the peer calls carry this branch's token
        client=HttpPeerClient(None if keyring is not None else cfg.api.token, tls=tls),
        declarations=declarations,  # apps and queues on every branch
        holdings=holdings,  # this branch's instances, for the names across the cluster
    )


def _tls_contexts(cfg: Config) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """The server's context (its certificate) and the one its peer calls and
    forwards verify the others with: the cluster CA (``--tls-ca``) alone, or
    the system's trust store; the host name checked either way."""
    import ssl

    a = cfg.api
    try:
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server.load_cert_chain(str(a.tls_cert), str(a.tls_key))
        client = ssl.create_default_context(cafile=str(a.tls_ca) if a.tls_ca else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS: cannot load the certificate, key or CA: {exc}") from None
    return server, client


def _roles_of(named: tuple[NamedToken, ...]) -> str:
    return ", ".join(f"{t.name} ({t.role.value})" for t in named) or "none"


def _lock(state_dir: Path) -> IO[str]:
    """One daemon per state dir: a second would start every instance twice."""
    try:
        secure_dir(state_dir)
    except OSError as exc:
        raise ConfigError(f"cannot use state dir {state_dir}: {exc.strerror}") from None
    fh = open(state_dir / "branchd.lock", "a+")  # noqa: SIM115 - held for the process' life
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise ConfigError(f"another branchd already runs on {state_dir}") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh


def _secure_state(cfg: Config) -> Config:
    """The database 0600 before it opens; the token in force (``None`` with
    --no-auth), generated into the state dir at the first start."""
    try:
        secure_database(cfg.db_path)
        if not cfg.api.auth:
            return cfg
        token = ensure_token(cfg.token_path, cfg.api.token)
    except OSError as exc:
        raise ConfigError(f"cannot secure {cfg.state_dir}: {exc.strerror}") from None
    return replace(cfg, api=replace(cfg.api, token=token))


def _say_how_auth_works(cfg: Config, token_on_command_line: bool) -> None:
    if not cfg.api.auth:
        log.warning(
            "authentication is OFF (--no-auth): every local user, and any web page "
            "that finds the port, can run commands as uid %d; for development only",
            os.geteuid(),
        )
        return
    if token_on_command_line:
        log.warning(
            "the token was given with --token: every local user sees it in the "
            "process list; use --token-file or BRANCHD_TOKEN_FILE instead"
        )
    log.info("API token in %s (clients on this machine read it there)", cfg.token_path)
    if cfg.api.tokens:
        log.info("named tokens of %s: %s", cfg.api.token_file, _roles_of(cfg.api.tokens))


@dataclass(frozen=True)
class Flag:
    """One option of ``branchd``: the setting ``key`` it gives config.load."""

    flag: str
    key: str
    help: str
    #: "text" (a value), "int", "switch" (no value: true when given) or "repeat"
    #: (a value, repeatable: a tuple of them)
    kind: str = "text"
    choices: tuple[str, ...] = ()


#: branchd's options, in --help's order; tools/gen_docs.py makes
#: docs/configuration.md's table from them (with config._ENV and the sections).
FLAGS = (
    Flag(
        "--state-dir",
        "state_dir",
        "State directory [env BRANCHD_STATE_DIR; default ~/.local/state/branchd]",
    ),
    Flag(
        "--bind", "bind", "HOST:PORT to serve the API on [env BRANCHD_BIND; default 127.0.0.1:8400]"
    ),
    Flag(
        "--token",
        "token",
        "Bearer token required by the API [env BRANCHD_TOKEN]; visible to every "
        "local user in the process list: prefer --token-file",
    ),
    Flag(
        "--token-file",
        "token_file",
        "File holding the bearer token, or named tokens with roles as TOML "
        "[tokens.NAME] tables (reread on SIGHUP) [env BRANCHD_TOKEN_FILE; default: one "
        "generated at the first start into <state dir>/token]",
    ),
    Flag(
        "--no-auth",
        "no_auth",
        "Require no token (development only; loopback binds only) [env BRANCHD_NO_AUTH]",
        kind="switch",
    ),
    Flag(
        "--cluster-key",
        "cluster_key",
        "The cluster key (base64 of 32 bytes): gossip and peer calls are sealed with it "
        "[env BRANCHD_CLUSTER_KEY]; visible in the process list: prefer --cluster-key-file",
    ),
    Flag(
        "--cluster-key-file",
        "cluster_key_file",
        "File holding the cluster key [env BRANCHD_CLUSTER_KEY_FILE]",
    ),
    Flag(
        "--join",
        "join",
        "API URL of a branch to join through (repeatable; retried with backoff) "
        "[env BRANCHD_JOIN, comma-separated]",
        kind="repeat",
    ),
    Flag(
        "--gossip",
        "gossip",
        "HOST:PORT of the UDP gossip [env BRANCHD_GOSSIP; default the API port + 1]",
    ),
    Flag(
        "--advertise",
        "advertise",
        "HOST:PORT of the API as other branches dial it [env BRANCHD_ADVERTISE; "
        "default the bind address]",
    ),
    Flag(
        "--no-zeroconf",
        "no_zeroconf",
        "Do not announce or browse _branchd._tcp.local. [env BRANCHD_NO_ZEROCONF]",
        kind="switch",
    ),
    Flag(
        "--cluster-profile",
        "cluster_profile",
        "Membership timers preset [env BRANCHD_CLUSTER_PROFILE; default lan]",
        choices=("lan", "local", "wan"),
    ),
    Flag(
        "--max-instances",
        "max_instances",
        "Instances this branch may hold [env BRANCHD_MAX_INSTANCES; default 100]",
        kind="int",
    ),
    Flag(
        "--slots",
        "slots",
        "Pool processes its instances may run together [env BRANCHD_SLOTS; default 16 per CPU]",
        kind="int",
    ),
    Flag(
        "--tls-cert",
        "tls_cert",
        "PEM certificate (chain): serve the API over HTTPS and call the other branches "
        "over HTTPS only [env BRANCHD_TLS_CERT]",
    ),
    Flag("--tls-key", "tls_key", "PEM key of --tls-cert [env BRANCHD_TLS_KEY]"),
    Flag(
        "--tls-ca",
        "tls_ca",
        "PEM CA that signs the other branches' certificates; peers are verified "
        "against it alone [env BRANCHD_TLS_CA; default the system's trust store]",
    ),
    Flag(
        "--metrics-public",
        "metrics_public",
        "GET /metrics needs no token [env BRANCHD_METRICS_PUBLIC]",
        kind="switch",
    ),
    Flag("--config", "config", "TOML config file [env BRANCHD_CONFIG]"),
    Flag("--log-level", "log_level", "DEBUG, INFO, WARNING, ERROR [env BRANCHD_LOG_LEVEL]"),
)

_ABOUT = """Run a branch: supervise this machine's instances and serve the API.

SIGTERM or SIGINT stop every instance and exit; SIGUSR2 exits and leaves
them running (a new branchd on the same state dir adopts them); SIGHUP
rereads the token file of named tokens."""


def _parser() -> argparse.ArgumentParser:
    # argparse, not click as branchctl: aiohttp.web imports argparse anyway, and
    # click was about 1 MiB of the daemon's resident memory (issue 10, part 9)
    parser = argparse.ArgumentParser(
        prog="branchd",
        usage="%(prog)s [OPTIONS]",
        description=_ABOUT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # as click: an option is named in full
        add_help=False,
    )
    parser.add_argument("-h", "--help", action="help", help="Show this message and exit.")
    for f in FLAGS:
        what = f.help.replace("%", "%%")  # (argparse formats help with %)
        if f.kind == "switch":
            parser.add_argument(f.flag, dest=f.key, action="store_const", const=True, help=what)
        elif f.kind == "repeat":
            parser.add_argument(f.flag, dest=f.key, action="append", metavar="TEXT", help=what)
        else:
            parser.add_argument(
                f.flag,
                dest=f.key,
                type=int if f.kind == "int" else str,
                choices=f.choices or None,
                metavar=None if f.choices else "INTEGER" if f.kind == "int" else "TEXT",
                help=what,
            )
    parser.add_argument(
        "--version",
        action="version",
        version=f"branchd, version {__version__}",
        help="Show the version and exit.",
    )
    return parser


def _values_joined(argv: Sequence[str]) -> list[str]:
    """``--flag VALUE`` as ``--flag=VALUE``: an option that takes a value takes
    the next argument whatever it looks like (a token may start with "-"), as
    click did; argparse would take it for an option."""
    takes = {f.flag for f in FLAGS if f.kind != "switch"}
    out: list[str] = []
    rest = iter(argv)
    for arg in rest:
        value = next(rest, None) if arg in takes else None
        out.append(arg if value is None else f"{arg}={value}")
        if arg == "--":
            out.extend(rest)
    return out


def parse_flags(argv: Sequence[str]) -> dict[str, object]:
    """The settings ``argv`` gives, as config.load takes them (None: not given).

    A usage error, ``--help`` and ``--version`` exit (2, 0, 0) as argparse does."""
    args = _parser().parse_args(_values_joined(argv))
    flags: dict[str, object] = {f.key: getattr(args, f.key) for f in FLAGS}
    flags["join"] = tuple(args.join) if args.join else None
    return flags


def cli(argv: Sequence[str] | None = None) -> None:
    """``branchd [OPTIONS]`` (see :data:`FLAGS` and ``_ABOUT``)."""
    try:
        _main(parse_flags(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:  # (before the daemon's own SIGINT handler), as click said it
        print("\nAborted!", file=sys.stderr)
        sys.exit(EXIT_FAILURE)


def _main(flags: dict[str, object]) -> None:
    token, cluster_key = flags["token"], flags["cluster_key"]
    try:
        cfg = load(flags, os.environ)
        lock = _lock(cfg.state_dir)
    except BranchdError as exc:
        print(f"branchd: {exc.message}", file=sys.stderr)
        sys.exit(EXIT_LOCKED if "already runs" in exc.message else EXIT_CONFIG)
    try:
        cfg = _secure_state(cfg)
    except BranchdError as exc:
        lock.close()
        print(f"branchd: {exc.message}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    logging.basicConfig(
        level=cfg.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    _say_how_auth_works(cfg, token_on_command_line=token is not None)
    if cluster_key is not None:
        log.warning(
            "the cluster key was given with --cluster-key: every local user sees it in "
            "the process list; use --cluster-key-file or BRANCHD_CLUSTER_KEY_FILE instead"
        )
    try:
        asyncio.run(Daemon(cfg).run())
    except BranchdError as exc:
        print(f"branchd: {exc.message}", file=sys.stderr)
        sys.exit(EXIT_FAILURE)
    finally:
        lock.close()
    sys.exit(EXIT_OK)
