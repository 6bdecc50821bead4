"""branchd/lazy_aiohttp.py: a package whose ``__init__`` runs when a name of it
is first asked for, and aiohttp under it (issue 10, part 9).

The mechanism is checked on a package made here (in this interpreter); the
real aiohttp in a fresh interpreter, since this one has imported it already.
"""

from __future__ import annotations

import ast
import asyncio
import importlib.util
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from branchd import lazy_aiohttp

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def package(tmp_path: Path) -> Iterator[str]:
    """A package ``__init__`` that imports its ``client`` (which tells it ran)
    and a ``server`` submodule that takes only submodules and ``__version__``
    from it, as aiohttp.web does."""
    name = f"lazyfake_{uuid.uuid4().hex[:8]}"
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        '__version__ = "3.14.9"\n'
        "from . import hdrs as hdrs\n"
        "from .client import Session\n"
        "__all__ = ('hdrs', 'Session')\n"
        "def __getattr__(name):\n"
        "    if name == 'Worker':\n"
        "        return None\n"
        "    raise AttributeError(name)\n"
    )
    (pkg / "hdrs.py").write_text("ACCEPT = 'Accept'\n")
    (pkg / "client.py").write_text(
        "import sys, threading\n"
        "sys.modules[__package__].client_ran = threading.current_thread().name\n"
        "class Session: pass\n"
    )
    (pkg / "server.py").write_text(
        "from . import __version__, hdrs\nSOFTWARE = 'fake/' + __version__\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        yield name
    finally:
        sys.path.remove(str(tmp_path))
        for m in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[m]


def test_the_init_runs_at_the_first_name_that_is_not_a_submodule(package: str) -> None:
    assert lazy_aiohttp.install(package)
    pkg = sys.modules[package]
    server = importlib.import_module(f"{package}.server")
    # the server side took a submodule and __version__: the __init__ has not run
    assert server.SOFTWARE == "fake/3.14.9"
    assert f"{package}.client" not in sys.modules
    assert "client_ran" not in vars(pkg)
    assert pkg.__spec__ is not None and pkg.__spec__.name == package
    # the first other name runs it, into the same module, once
    session = pkg.Session
    assert vars(pkg)["client_ran"] == "MainThread"
    assert session is sys.modules[f"{package}.client"].Session
    assert pkg.hdrs is sys.modules[f"{package}.hdrs"]
    assert pkg.__all__ == ("hdrs", "Session")
    # its own __getattr__ answers from then on
    assert pkg.Worker is None
    with pytest.raises(AttributeError):
        _ = pkg.nothing_of_that_name


def test_loaded_runs_the_init_in_a_worker_thread_once(package: str) -> None:
    assert lazy_aiohttp.install(package)
    asyncio.run(lazy_aiohttp.loaded(package))
    pkg = sys.modules[package]
    ran = vars(pkg)["client_ran"]
    assert ran != "MainThread"  # off the event loop's thread
    assert not isinstance(vars(pkg)["__getattr__"], lazy_aiohttp._Deferred)
    asyncio.run(lazy_aiohttp.loaded(package))  # loaded already: nothing to do
    asyncio.run(lazy_aiohttp.loaded(f"{package}_not_there"))
    assert vars(pkg)["client_ran"] == ran


def test_dir_runs_the_init(package: str) -> None:
    assert lazy_aiohttp.install(package)
    assert "Session" in dir(sys.modules[package])


def test_an_unchecked_version_or_an_imported_package_is_left_alone(package: str) -> None:
    init = Path(sys.path[0]) / package / "__init__.py"
    init.write_text(init.read_text().replace('"3.14.9"', '"9.0.0"'))
    assert not lazy_aiohttp.install(package)
    assert package not in sys.modules
    importlib.import_module(package)
    assert not lazy_aiohttp.install(package)  # imported already
    assert not lazy_aiohttp.install("aiohttp")  # this interpreter imported it


def test_the_installed_aiohttp_is_a_checked_version_whose_init_only_binds_names() -> None:
    # What makes deferring it sound; on an upgrade, read its __init__ (and
    # that aiohttp.web still takes only submodules and __version__ from the
    # package) before adding the version to CHECKED.
    major_minor = ".".join(aiohttp.__version__.split(".")[:2])
    assert major_minor in lazy_aiohttp.CHECKED, (
        f"aiohttp {aiohttp.__version__} is not in lazy_aiohttp.CHECKED: read its __init__"
    )
    spec = importlib.util.find_spec("aiohttp")
    assert spec is not None and spec.origin is not None
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    for stmt in tree.body:
        if isinstance(stmt, ast.ImportFrom):
            assert stmt.level == 1 or stmt.module == "typing", ast.unparse(stmt)
        elif isinstance(stmt, ast.Assign | ast.AnnAssign):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            assert [ast.unparse(t) for t in targets] in (["__version__"], ["__all__"])
            assert stmt.value is not None and isinstance(ast.literal_eval(stmt.value), str | tuple)
        elif isinstance(stmt, ast.If):
            assert ast.unparse(stmt.test) == "TYPE_CHECKING", ast.unparse(stmt)
        else:
            assert isinstance(stmt, ast.FunctionDef), ast.unparse(stmt)
            assert stmt.name in ("__dir__", "__getattr__")


SCRIPT = """
import json, sys
lazy = sys.argv[1] == "lazy"
if lazy:
    from branchd import lazy_aiohttp
    assert lazy_aiohttp.install()
import aiohttp
from aiohttp import web
seen = {"server": sorted(m for m in sys.modules if m.startswith(("aiohttp.c", "aiohappy")))}
seen["software"] = aiohttp.http.SERVER_SOFTWARE
session = aiohttp.ClientSession
seen["same"] = session is aiohttp.client.ClientSession and aiohttp.web is web
seen["dir"] = dir(aiohttp)
seen["all"] = list(aiohttp.__all__)
seen["worker"] = repr(aiohttp.GunicornWebWorker)
seen["modules"] = sorted(m for m in sys.modules if m.startswith("aiohttp"))
print(json.dumps(seen))
"""


def test_aiohttp_web_alone_loads_no_client_and_the_first_client_name_loads_it_all() -> None:
    seen = {}
    for how in ("lazy", "eager"):
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT, how],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        seen[how] = json.loads(done.stdout)
    lazy, eager = seen["lazy"], seen["eager"]
    assert "aiohttp.client" in eager["server"]  # (the watch works)
    assert not {"aiohttp.client", "aiohttp.connector", "aiohappyeyeballs"} & set(lazy["server"])
    assert lazy["software"] == eager["software"]
    assert lazy["same"] and eager["same"]
    # once loaded, the package is the one a plain import makes
    for key in ("dir", "all", "worker", "modules"):
        assert lazy[key] == eager[key], key
