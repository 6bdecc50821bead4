"""Configuration as data: TOML file < BRANCHD_* environment < command-line flags."""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from branchd.errors import ConfigError

DEFAULT_PORT = 8400


def default_state_dir(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_STATE_HOME") or os.path.join(env.get("HOME", "/tmp"), ".local", "state")
    return Path(base) / "branchd"


def parse_bind(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"bind must be HOST:PORT, got {value!r}")
    host = host.strip("[]")
    try:
        p = int(port)
    except ValueError:
        raise ConfigError(f"bind port must be a number, got {port!r}") from None
    if not 0 <= p <= 65535:
        raise ConfigError(f"bind port out of range: {p}")
    return host, p


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Config:
    state_dir: Path
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    token: str | None = None
    log_level: str = "INFO"
    #: Exponential backoff between failed starts.
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    #: How often instance log files are checked for rotation.
    log_check_interval: float = 5.0
    #: How often running Celery workers are pinged (hung-worker detection).
    health_interval: float = 5.0
    #: How often every worker is compared with its declaration (slow sweep).
    reconcile_interval: float = 60.0
    #: Largest accepted request body.
    max_body: int = 1024 * 1024

    @property
    def db_path(self) -> Path:
        return self.state_dir / "branchd.db"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    def validate(self) -> Config:
        if not is_loopback(self.host) and not self.token:
            raise ConfigError(
                f"refusing to listen on {self.host} without a token (use --token or BRANCHD_TOKEN)"
            )
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(f"unknown log level {self.log_level!r}")
        return replace(self, log_level=self.log_level.upper())

    @classmethod
    def for_tests(cls, state_dir: Path) -> Config:
        """Fast timers for tests: short backoff, frequent log checks, port 0."""
        return cls(
            state_dir=state_dir,
            port=0,
            backoff_base=0.1,
            backoff_max=0.5,
            log_check_interval=0.2,
            health_interval=0.5,
            reconcile_interval=5.0,
        )


_ENV = {
    "BRANCHD_STATE_DIR": "state_dir",
    "BRANCHD_BIND": "bind",
    "BRANCHD_TOKEN": "token",
    "BRANCHD_LOG_LEVEL": "log_level",
}


def load(
    flags: Mapping[str, Any],
    env: Mapping[str, str],
) -> Config:
    """Merge file < environment < flags; flags whose value is None are unset."""
    merged: dict[str, Any] = {}
    config_file = flags.get("config") or env.get("BRANCHD_CONFIG")
    if config_file:
        try:
            with open(config_file, "rb") as fh:
                merged.update(tomllib.load(fh))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"bad TOML in {config_file}: {exc}") from None
    for var, key in _ENV.items():
        if env.get(var):
            merged[key] = env[var]
    for key, value in flags.items():
        if value is not None and key != "config":
            merged[key] = value

    known = {f.name for f in fields(Config)} | {"bind"}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise ConfigError(f"unknown configuration key(s): {', '.join(unknown)}")
    if "bind" in merged:
        merged["host"], merged["port"] = parse_bind(str(merged.pop("bind")))
    merged["state_dir"] = Path(merged.get("state_dir") or default_state_dir(env)).expanduser()
    try:
        cfg = Config(**merged)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
    return cfg.validate()
