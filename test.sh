#!/usr/bin/env bash
# The whole test suite, on a fresh machine: makes .venv, installs branchd with
# its test extras, then runs ruff, mypy, the import contracts (lint-imports)
# and pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
.venv/bin/ruff check branchd clients tests bench tools
.venv/bin/mypy
.venv/bin/lint-imports
exec .venv/bin/python -m pytest "$@"
