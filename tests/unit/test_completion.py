"""Issue 17, part 7: shell completion of branchctl (click's)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BRANCHCTL = Path(sys.executable).with_name("branchctl")


@pytest.mark.parametrize(
    ("shell", "says"),
    [
        ("bash", "complete -o nosort -F _branchctl_completion branchctl"),
        ("zsh", "compdef _branchctl_completion branchctl"),
        ("fish", "complete --no-files --command branchctl"),
    ],
)
def test_the_completion_source_is_produced(shell: str, says: str) -> None:
    env = {**os.environ, "_BRANCHCTL_COMPLETE": f"{shell}_source"}
    done = subprocess.run([str(BRANCHCTL)], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert says in done.stdout


def test_commands_are_completed() -> None:
    env = {
        **os.environ,
        "_BRANCHCTL_COMPLETE": "bash_complete",
        "COMP_WORDS": "branchctl inst",
        "COMP_CWORD": "1",
    }
    done = subprocess.run([str(BRANCHCTL)], env=env, capture_output=True, text=True, timeout=30)
    assert "plain,instances" in done.stdout.splitlines(), done.stdout
