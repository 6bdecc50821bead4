"""Issue 17, part 5: the unit file as systemd reads it, and the settings
adoption depends on."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"
#: Directives of a newer systemd than some machines have: said, and ignored there.
NEWER = ("DelegateSubgroup",)


def _service() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((SYSTEMD / "branchd.service").read_text())
    return parser["Service"]


def test_the_unit_keeps_instances_across_restarts_and_speaks_notify() -> None:
    service = _service()
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert int(service["WatchdogSec"]) > 0
    # instances survive a daemon restart (adoption): only the daemon is signalled
    assert service["KillMode"] == "process" and service["Delegate"] == "yes"
    assert service["StateDirectory"] == "branchd"
    # it starts workers as other users: those capabilities are kept
    caps = service["CapabilityBoundingSet"].split()
    assert {"CAP_SETUID", "CAP_SETGID", "CAP_KILL", "CAP_SYS_PTRACE"} <= set(caps)
    assert "PrivateTmp" not in service and "ProtectControlGroups" not in service


def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not on this machine")
    branchd = Path(sys.executable).with_name("branchd")
    unit = (SYSTEMD / "branchd.service").read_text()
    # (verify checks that ExecStart's program exists: this install's)
    unit = unit.replace("/opt/branchd/venv/bin/branchd", str(branchd))
    (tmp_path / "branchd.service").write_text(unit)
    done = subprocess.run(
        [tool, "verify", str(tmp_path / "branchd.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    said = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if line.strip() and not any(f"Unknown key '{d}'" in line for d in NEWER)
    ]
    assert done.returncode == 0 and said == [], done.stdout + done.stderr
