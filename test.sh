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
# Each test starts many daemons, CLIs and workers: compile the checkout once so
# that none of them compiles branchd again (where PYTHONDONTWRITEBYTECODE is
# set, as on CI, nothing would cache it and each start paid ~0.13 s for it).
.venv/bin/python -m compileall -q -j 0 branchd clients tests >/dev/null
# Two test processes (one a core on CI): a module's tests stay together in one
# (loadscope), since they share its fixtures (daemons, clusters, namespaces).
# BRANCHD_TEST_PROCESSES=0 runs them all in this one.
exec .venv/bin/python -m pytest -n "${BRANCHD_TEST_PROCESSES:-2}" --dist loadscope "$@"
