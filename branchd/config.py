"""Configuration as data: TOML file < BRANCHD_* environment < command-line flags."""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, get_type_hints

from branchd.errors import ConfigError

DEFAULT_PORT = 8400


def default_state_dir(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_STATE_HOME") or os.path.join(env.get("HOME", "/tmp"), ".local", "state")
    return Path(base) / "branchd"


def parse_bind(value: str, what: str = "bind") -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{what} must be HOST:PORT, got {value!r}")
    host = host.strip("[]")
    try:
        p = int(port)
    except ValueError:
        raise ConfigError(f"{what} port must be a number, got {port!r}") from None
    if not 0 <= p <= 65535:
        raise ConfigError(f"{what} port out of range: {p}")
    return host, p


def check_join_url(url: str) -> str:
    """A ``--join`` URL: ``http(s)://host[:port]``, the API of a branch."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"join URL {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"join URL must be http://HOST:PORT (a branch's API), got {url!r}")
    del port
    return url


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Role(StrEnum):
    """What a token may do (``api/roles.py`` says which route needs which)."""

    READ = "read"  # GETs and the event stream
    OPERATE = "operate"  # start/stop/restart, consumers, autoscale, scale, logs reopen
    ADMIN = "admin"  # everything: apps, keys, drain, exit

    def allows(self, needed: Role) -> bool:
        return _RANK[self] >= _RANK[needed]


_RANK = {Role.READ: 0, Role.OPERATE: 1, Role.ADMIN: 2}


@dataclass(frozen=True)
class NamedToken:
    """One ``[tokens.NAME]`` table of a token file."""

    name: str
    token: str
    role: Role


#: The name the daemon's own token (``--token``, a one-token file, the state
#: dir's) goes by in the audit lines and 403s.
ADMIN_TOKEN_NAME = "admin"
#: Shortest named token accepted: a guessable one is worse than none.
MIN_TOKEN_LENGTH = 16


def is_token_table(text: str) -> bool:
    """A token file of named tokens (TOML with a ``[tokens]`` table), not one token."""
    import tomllib

    try:
        return isinstance(tomllib.loads(text).get("tokens"), dict)
    except tomllib.TOMLDecodeError:
        return False


def parse_token_table(text: str, where: str) -> tuple[NamedToken, ...]:
    """``[tokens.alice] token = "..." role = "operate"`` tables, checked: every
    name a table with a token and a known role, no token twice, nothing else."""
    import tomllib

    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"bad TOML in {where}: {exc}") from None
    extra = sorted(set(doc) - {"tokens"})
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(extra)} (only [tokens.NAME])")
    table = doc.get("tokens")
    if not isinstance(table, dict) or not table:
        raise ConfigError(f"{where} names no token: add [tokens.NAME] with token and role")
    out: list[NamedToken] = []
    seen: dict[str, str] = {}
    for name, entry in table.items():
        at = f"{where}: [tokens.{name}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{at} must be a table with token and role")
        unknown = sorted(set(entry) - {"token", "role"})
        if unknown:
            raise ConfigError(f"{at}: unknown key(s) {', '.join(unknown)}")
        token, role = entry.get("token"), entry.get("role")
        if not isinstance(token, str) or len(token) < MIN_TOKEN_LENGTH:
            raise ConfigError(f"{at}: token must be text of {MIN_TOKEN_LENGTH} characters or more")
        if any(c.isspace() for c in token):
            raise ConfigError(f"{at}: token must have no spaces")
        if role not in tuple(Role):
            raise ConfigError(f"{at}: role must be read, operate or admin, got {role!r}")
        if token in seen:
            raise ConfigError(f"{at}: the same token as [tokens.{seen[token]}]")
        seen[token] = name
        out.append(NamedToken(name, token, Role(role)))
    return tuple(out)


def read_token_table(path: Path) -> tuple[NamedToken, ...]:
    """The named tokens of the file at ``path`` (reloaded on SIGHUP)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"cannot read token file {path}: {reason}") from None
    return parse_token_table(text, str(path))


@dataclass(frozen=True)
class ApiSection:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    #: The bearer token every route but /v1/ping needs. None: the daemon's own,
    #: generated once into ``<state dir>/token`` (see ``branchd.state``).
    token: str | None = None
    #: Where ``token`` was read from (``--token-file``), for the start-up log.
    token_file: Path | None = None
    #: Not set here: the named tokens of a ``token_file`` of ``[tokens.NAME]``
    #: tables, each with its role (reread on SIGHUP); the daemon's own token
    #: stays beside them, as admin.
    tokens: tuple[NamedToken, ...] = ()
    #: False (``--no-auth``): no token at all, for development on loopback only.
    auth: bool = True
    #: HTTPS: the certificate (chain), PEM; the API speaks TLS only and the
    #: branch calls its peers over https only.
    tls_cert: Path | None = None
    #: The certificate's private key, PEM (with ``tls_cert``, both or neither).
    tls_key: Path | None = None
    #: The CA that signs the other branches' certificates (``--tls-ca``): peer
    #: calls and forwards trust it alone; None: the system's trust store.
    tls_ca: Path | None = None
    #: Largest accepted request body.
    max_body: int = 1024 * 1024
    #: How many instance listings are built at once (0: no limit). A listing
    #: of 200 instances holds the event loop ~2.7 ms; a hundred clients listing
    #: at once made a ping (and a respawn) wait ~270 ms behind them. The rest
    #: wait their turn off the loop's queue (bench/ping_under_listings.py).
    listings_at_once: int = 1
    #: ``GET /metrics`` answers without a token (a Prometheus on the host
    #: with no secret to keep); every other route still needs it.
    metrics_public: bool = False


@dataclass(frozen=True)
class SupervisionSection:
    #: Exponential backoff between failed starts.
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    #: After SIGKILL the kernel needs a moment; a stop never waits forever.
    kill_grace: float = 5.0
    #: Each instance in a cgroup of its own when the machine allows (root and
    #: a writable cgroup2 hierarchy); false: process groups only.
    cgroups: bool = True


@dataclass(frozen=True)
class CelerySection:
    #: How often running Celery workers are pinged (hung-worker detection).
    health_interval: float = 5.0
    #: How often every worker is compared with its declaration (slow sweep).
    reconcile_interval: float = 60.0
    #: While a worker starts, a ping goes out this often (seconds).
    ready_ping_every: float = 0.05
    #: How long a warm stop waits for its consumer cancels before the TERM.
    warm_stop_cancel_wait: float = 0.5
    #: How often the apps with a ``scale`` policy have their queue depth read.
    depth_poll_interval: float = 2.0
    #: A draining stop sends TERM this long before its stopwaitsecs are over
    #: (at most half of them): the rest is the warm shutdown's.
    drain_term_grace: float = 10.0
    #: A worker that answers pings but took no task for this long while its
    #: queues hold ready messages is restarted (seconds; 0: never).
    stall_after: float = 300.0


@dataclass(frozen=True)
class LogsSection:
    #: How often instance log files are checked for rotation.
    check_interval: float = 5.0


#: The presets of ``cluster.profile`` (memberlist's LAN, local and WAN configs).
PROFILES = ("lan", "local", "wan")
#: The timers of the membership core a user may set one by one ([cluster] table).
TIMERS = (
    "probe_interval",
    "probe_timeout",
    "indirect_checks",
    "retransmit_mult",
    "suspicion_mult",
    "suspicion_max_timeout_mult",
    "gossip_interval",
    "gossip_nodes",
    "push_pull_interval",
    "reap_after",
)



#: A branch's slots per CPU when ``slots`` is not set. Celery runs one pool
#: process per CPU by default, and a worker of I/O-bound tasks is commonly run
#: with several times that (its processes mostly wait): 16 per CPU leaves room
#: for that, and for many small plain processes, without piling a whole
#: cluster's work on one machine.
SLOTS_PER_CPU = 16


@dataclass(frozen=True)
class ClusterSection:
    """Membership: who this branch gossips with, how, and how it is seen.

    A branch with no key and no join is a cluster of one, as a single box
    always was (``enabled`` is False and no cluster code is loaded).
    """

    #: The cluster key (base64 of 32 bytes, ``branchctl cluster keys generate``).
    key: str | None = None
    #: A file holding it (read at start, like the token file).
    key_file: Path | None = None
    #: API URLs of branches to join through (``--join``, repeatable).
    join: tuple[str, ...] = ()
    #: HOST:PORT of the UDP gossip; None: the API host, its port + 1.
    gossip: str | None = None
    #: HOST:PORT of the API as the others dial it; None: the bind address
    #: (or, bound to every address, this host's address on its default route).
    advertise: str | None = None
    #: Announce and browse ``_branchd._tcp.local.`` (non-loopback binds only).
    zeroconf: bool = True
    #: The timers' preset: lan, local or wan.
    profile: str = "lan"
    #: Instances this branch may hold.
    max_instances: int = 100
    #: Pool processes its instances may run together (a Celery instance takes
    #: its largest concurrency, a plain process one); 0: SLOTS_PER_CPU per CPU.
    slots: int = 0
    #: How often this branch's capacity is re-read and its record refreshed (s).
    record_interval: float = 5.0
    #: How often a join that has not reached anyone is retried, at most (s).
    join_retry_max: float = 30.0
    #: Each timer, when set, overrides the profile's (seconds, or counts).
    probe_interval: float | None = None
    probe_timeout: float | None = None
    indirect_checks: int | None = None
    retransmit_mult: int | None = None
    suspicion_mult: int | None = None
    suspicion_max_timeout_mult: int | None = None
    gossip_interval: float | None = None
    gossip_nodes: int | None = None
    push_pull_interval: float | None = None
    reap_after: float | None = None

    @property
    def enabled(self) -> bool:
        """A key or a join: this branch gossips. Otherwise, a cluster of one."""
        return self.key is not None or bool(self.join)

    def timers(self) -> dict[str, Any]:
        """The timers set one by one (over the profile's)."""
        return {k: v for k in TIMERS if (v := getattr(self, k)) is not None}


@dataclass(frozen=True)
class Config:
    """The whole configuration, a tree of frozen sections; each service is
    handed only its own section."""

    state_dir: Path
    log_level: str = "INFO"
    api: ApiSection = ApiSection()
    supervision: SupervisionSection = SupervisionSection()
    celery: CelerySection = CelerySection()
    logs: LogsSection = LogsSection()
    cluster: ClusterSection = ClusterSection()

    @property
    def db_path(self) -> Path:
        return self.state_dir / "branchd.db"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def token_path(self) -> Path:
        """The daemon's own token file (generated at first start, kept after)."""
        return self.state_dir / "token"

    @property
    def tls(self) -> bool:
        return self.api.tls_cert is not None

    def validate(self) -> Config:
        self._validate_tls()
        if not is_loopback(self.api.host) and not self.api.auth:
            raise ConfigError(
                f"refusing to listen on {self.api.host} without a token "
                "(--no-auth is for a loopback bind only)"
            )
        if not self.api.auth and self.api.token:
            raise ConfigError("--no-auth and a token are both given: give one")
        if self.api.listings_at_once < 0:
            raise ConfigError("listings_at_once must be 0 (no limit) or more")
        self._validate_cluster()
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(f"unknown log level {self.log_level!r}")
        return replace(self, log_level=self.log_level.upper())

    def _validate_tls(self) -> None:
        a = self.api
        if (a.tls_cert is None) != (a.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together: give both or neither")
        if a.tls_ca is not None and a.tls_cert is None:
            raise ConfigError("--tls-ca is for a branch with TLS: give --tls-cert and --tls-key")
        for what, path in (("tls-cert", a.tls_cert), ("tls-key", a.tls_key), ("tls-ca", a.tls_ca)):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"--{what} {path}: no such file")
        if a.tls_cert is not None:
            plain = [u for u in self.cluster.join if u.lower().startswith("http://")]
            if plain:
                raise ConfigError(
                    f"with TLS, join URLs must be https:// (peers are dialled over TLS), "
                    f"got {plain[0]!r}"
                )
        if a.tokens and not a.auth:
            raise ConfigError("--no-auth and a token file are both given: give one")

    def _validate_cluster(self) -> None:
        c = self.cluster
        if c.profile not in PROFILES:
            raise ConfigError(f"unknown cluster profile {c.profile!r} (lan, local or wan)")
        for url in c.join:
            check_join_url(url)
        for what, value in (("gossip", c.gossip), ("advertise", c.advertise)):
            if value is not None:
                parse_bind(value, what=what)
        if c.enabled and c.key is None and not is_loopback(self.api.host):
            raise ConfigError(
                f"refusing to cluster on {self.api.host} without a cluster key "
                "(--cluster-key or --cluster-key-file; a loopback bind may go without)"
            )
        if c.max_instances < 1:
            raise ConfigError("max_instances must be 1 or more")
        if c.slots < 0:
            raise ConfigError("slots must be 0 (16 per CPU) or more")
        if c.record_interval <= 0 or c.join_retry_max <= 0:
            raise ConfigError("record_interval and join_retry_max must be more than 0")

    @classmethod
    def for_tests(cls, state_dir: Path) -> Config:
        """Fast timers for tests: short backoff, frequent log checks, port 0."""
        return cls(
            state_dir=state_dir,
            api=ApiSection(port=0),
            supervision=SupervisionSection(backoff_base=0.1, backoff_max=0.5),
            celery=CelerySection(health_interval=0.5, reconcile_interval=5.0),
            logs=LogsSection(check_interval=0.2),
        )


#: The keys of the file (flat, as they always were) and where they go.
_FLAT: dict[str, tuple[str, str]] = {
    "token": ("api", "token"),
    "token_file": ("api", "token_file"),
    "max_body": ("api", "max_body"),
    "listings_at_once": ("api", "listings_at_once"),
    "tls_cert": ("api", "tls_cert"),
    "tls_key": ("api", "tls_key"),
    "tls_ca": ("api", "tls_ca"),
    "metrics_public": ("api", "metrics_public"),
    "backoff_base": ("supervision", "backoff_base"),
    "backoff_max": ("supervision", "backoff_max"),
    "kill_grace": ("supervision", "kill_grace"),
    "cgroups": ("supervision", "cgroups"),
    "health_interval": ("celery", "health_interval"),
    "reconcile_interval": ("celery", "reconcile_interval"),
    "ready_ping_every": ("celery", "ready_ping_every"),
    "warm_stop_cancel_wait": ("celery", "warm_stop_cancel_wait"),
    "depth_poll_interval": ("celery", "depth_poll_interval"),
    "drain_term_grace": ("celery", "drain_term_grace"),
    "stall_after": ("celery", "stall_after"),
    "log_check_interval": ("logs", "check_interval"),
    "cluster_key": ("cluster", "key"),
    "cluster_key_file": ("cluster", "key_file"),
    "join": ("cluster", "join"),
    "gossip": ("cluster", "gossip"),
    "advertise": ("cluster", "advertise"),
    "zeroconf": ("cluster", "zeroconf"),
    "cluster_profile": ("cluster", "profile"),
    "max_instances": ("cluster", "max_instances"),
    "slots": ("cluster", "slots"),
}
_SECTIONS: dict[str, type[Any]] = {
    "api": ApiSection,
    "supervision": SupervisionSection,
    "celery": CelerySection,
    "logs": LogsSection,
    "cluster": ClusterSection,
}


_ENV = {
    "BRANCHD_STATE_DIR": "state_dir",
    "BRANCHD_BIND": "bind",
    "BRANCHD_TOKEN": "token",
    "BRANCHD_TOKEN_FILE": "token_file",
    "BRANCHD_NO_AUTH": "no_auth",
    "BRANCHD_TLS_CERT": "tls_cert",
    "BRANCHD_TLS_KEY": "tls_key",
    "BRANCHD_TLS_CA": "tls_ca",
    "BRANCHD_LOG_LEVEL": "log_level",
    "BRANCHD_CLUSTER_KEY": "cluster_key",
    "BRANCHD_CLUSTER_KEY_FILE": "cluster_key_file",
    "BRANCHD_JOIN": "join",  # several: separated by commas or spaces
    "BRANCHD_GOSSIP": "gossip",
    "BRANCHD_ADVERTISE": "advertise",
    "BRANCHD_NO_ZEROCONF": "no_zeroconf",
    "BRANCHD_CLUSTER_PROFILE": "cluster_profile",
    "BRANCHD_MAX_INSTANCES": "max_instances",
    "BRANCHD_SLOTS": "slots",
    "BRANCHD_METRICS_PUBLIC": "metrics_public",
}


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def _boolean(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ConfigError(f"{key} must be true or false, got {value!r}")


def _section(name: str, values: Mapping[str, Any]) -> Any:
    """One section from its settings, each checked against the field's type
    (a string where a number belongs once started and failed at the first use)."""
    cls = _SECTIONS[name]
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s) in [{name}]: {', '.join(unknown)}")
    checked: dict[str, Any] = {}
    for key, value in values.items():
        if (name, key) == ("api", "tokens"):
            # only as a token file gives them (_read_token_file), never set by hand
            if not isinstance(value, tuple) or not all(isinstance(t, NamedToken) for t in value):
                raise ConfigError(
                    "api.tokens: named tokens go in a token file of [tokens.NAME] "
                    "tables, given with --token-file"
                )
            checked[key] = value
            continue
        checked[key] = _typed(f"{name}.{key}", hints[key], value)
    return cls(**checked)


def _typed(where: str, hint: Any, value: Any) -> Any:
    if value is None and "None" in str(hint):
        return None
    if isinstance(hint, str) and hint.endswith(" | None"):
        hint = hint.removesuffix(" | None")  # an optional setting, given: its type
    elif "| None" in str(hint) and str(hint).count("|") == 1:
        hint = str(hint).replace(" | None", "").replace("None | ", "")
    if hint is bool or hint == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if hint in (int, float) or str(hint) in ("int", "float"):
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value < 0:
            raise ConfigError(f"{where} must be a number of 0 or more, got {value!r}")
        if (hint is int or str(hint) == "int") and value != int(value):
            raise ConfigError(f"{where} must be a whole number, got {value!r}")
        return int(value) if hint is int or str(hint) == "int" else float(value)
    if "tuple" in str(hint):
        items = value.replace(",", " ").split() if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
            raise ConfigError(f"{where} must be a list of text, got {value!r}")
        return tuple(items)
    if "str" in str(hint) and not isinstance(value, str | Path):
        raise ConfigError(f"{where} must be text, got {value!r}")
    return value


def _read_secret_file(section: dict[str, Any], key: str, what: str) -> None:
    """``<key>_file`` (a path) into ``<key>``, one of the two, never both: the
    token file and the cluster key file are read the same way."""
    file_key = f"{key}_file"
    if section.get(file_key) is None:
        return
    if section.get(key) is not None:
        raise ConfigError(f"give the {what} or a {what} file, not both")
    path = Path(str(section[file_key])).expanduser()
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"cannot read {what} file {path}: {reason}") from None
    if not secret:
        raise ConfigError(f"{what} file {path} is empty")
    if any(c.isspace() for c in secret):
        raise ConfigError(f"{what} file {path} must hold one {what} (no spaces)")
    section[key], section[file_key] = secret, path


def _read_token_file(api: dict[str, Any]) -> None:
    """A token file of ``[tokens.NAME]`` tables (named tokens with roles), or
    of one token (admin, as it always was)."""
    for key in ("tls_cert", "tls_key", "tls_ca"):
        if api.get(key) is not None:
            api[key] = Path(str(api[key])).expanduser()
    path = api.get("token_file")
    if path is not None:
        path = Path(str(path)).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            text = ""  # (_read_secret_file says why)
        if is_token_table(text):
            api["tokens"], api["token_file"] = parse_token_table(text, str(path)), path
            return
    _read_secret_file(api, "token", "token")


def load(
    flags: Mapping[str, Any],
    env: Mapping[str, str],
) -> Config:
    """Merge file < environment < flags; flags whose value is None are unset."""
    merged: dict[str, Any] = {}
    config_file = flags.get("config") or env.get("BRANCHD_CONFIG")
    if config_file:
        import tomllib  # only with a config file (~0.1 MiB resident otherwise)

        try:
            with open(config_file, "rb") as fh:
                merged.update(tomllib.load(fh))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"bad TOML in {config_file}: {exc}") from None
        if "no_auth" in merged and not isinstance(merged["no_auth"], bool):
            # (the environment's BRANCHD_NO_AUTH is text; a file has booleans)
            raise ConfigError(f"no_auth must be true or false, got {merged['no_auth']!r}")
    for var, key in _ENV.items():
        if env.get(var):
            merged[key] = env[var]
    for key, value in flags.items():
        if value is not None and key != "config":
            merged[key] = value

    known = {"state_dir", "log_level", "bind", "no_auth", "no_zeroconf", *_FLAT, *_SECTIONS}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise ConfigError(f"unknown configuration key(s): {', '.join(unknown)}")
    # [section] tables of the file, and the flat keys, into the sections
    parts: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    for name in _SECTIONS:
        table = merged.pop(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"[{name}] must be a table of settings")
        parts[name].update(table)
    for key, (section, field) in _FLAT.items():
        if key in merged:
            parts[section][field] = merged.pop(key)
    if "bind" in merged:
        parts["api"]["host"], parts["api"]["port"] = parse_bind(str(merged.pop("bind")))
    if "no_auth" in merged:
        parts["api"]["auth"] = not _boolean("no_auth", merged.pop("no_auth"))
    if "no_zeroconf" in merged:
        parts["cluster"]["zeroconf"] = not _boolean("no_zeroconf", merged.pop("no_zeroconf"))
    if "metrics_public" in parts["api"]:
        parts["api"]["metrics_public"] = _boolean(
            "metrics_public", parts["api"]["metrics_public"]
        )
    for key in ("max_instances", "slots"):
        if isinstance(parts["cluster"].get(key), str):  # (from the environment)
            text = parts["cluster"][key]
            if not text.strip().isdigit():
                raise ConfigError(f"{key} must be a whole number, got {text!r}")
            parts["cluster"][key] = int(text)
    _read_token_file(parts["api"])
    _read_secret_file(parts["cluster"], "key", "cluster key")
    merged["state_dir"] = Path(merged.get("state_dir") or default_state_dir(env)).expanduser()
    try:
        sections = {name: _section(name, values) for name, values in parts.items()}
        cfg = Config(**merged, **sections)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
    return cfg.validate()
