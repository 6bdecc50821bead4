"""aiohttp's package ``__init__`` run when first needed, not at the daemon's start.

``from aiohttp import web`` runs ``aiohttp/__init__.py`` first, and that
imports aiohttp's client side: about twenty modules a branch serving its API
never uses (``client``, ``connector``, ``cookiejar`` with pickle, ``tracing``,
``resolver``, the middlewares, aiohappyeyeballs), and ``aiohttp.connector``
builds two SSL contexts at import (the verified one parses the system's CA
file). 4.6 MiB of a branch's 47.8 at 200 instances (issue 10, part 9); only
a branch that calls another (the peer channel, forwarding, the event stream's
peers, HTTP probes) needs them.

:func:`install`, called by the daemon's entry point before anything imports
aiohttp, puts in ``sys.modules`` the ``aiohttp`` package as the import system
makes it (its real spec, ``__path__``, ``__file__``, loader) without running
its ``__init__`` yet, plus a PEP 562 module ``__getattr__``:

- a name that is one of the package's submodules (``web``, ``hdrs``,
  ``payload``: what ``aiohttp.web`` takes with ``from . import ...``) imports
  that submodule, as the import system would;
- any other name (``ClientSession``, ``TCPConnector``, ``ClientError``,
  ``__all__``...) first runs the real ``__init__`` into the same module
  (``spec.loader.exec_module``), then answers from it. That ``__init__``
  imports the submodules already loaded, so every class is the one the server
  side already uses; its own ``__getattr__`` and ``__dir__`` then replace ours.

This is sound because the ``__init__`` of the versions in :data:`CHECKED`
(read: 3.13 and 3.14) only binds names: imports from its submodules,
``__version__``, ``__all__``, ``__dir__`` and a ``__getattr__`` for its
gunicorn workers; it changes no state a submodule reads. The one name the
server side takes from the package, ``http.py``'s ``from . import
__version__``, is set beforehand, read from the same file. Any other version
is imported as usual (tests/unit/test_lazy_aiohttp.py checks the installed
``__init__`` against that description, so an upgrade is reread before it is
added).
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.machinery
import importlib.util
import re
import sys
import threading
import types

#: The aiohttp releases (major.minor) whose ``__init__.py`` was read and only
#: binds names (see the module's docstring).
CHECKED = ("3.13", "3.14")

_VERSION = re.compile(rb'^__version__ = "((\d+\.\d+)[^"]*)"', re.MULTILINE)


def install(name: str = "aiohttp") -> bool:
    """Put the package ``name`` in ``sys.modules`` with its ``__init__`` deferred.

    False (and nothing done) if it is already imported, not installed, or of a
    version not in :data:`CHECKED`: then it is imported as usual when asked for.
    """
    if name in sys.modules:
        return False
    spec = importlib.machinery.PathFinder.find_spec(name)
    if spec is None or spec.origin is None or spec.submodule_search_locations is None:
        return False
    loader = spec.loader
    if not isinstance(loader, importlib.machinery.SourceFileLoader):
        return False
    found = _VERSION.search(loader.get_data(spec.origin))
    if found is None or found.group(2).decode() not in CHECKED:
        return False
    module = importlib.util.module_from_spec(spec)
    deferred = _Deferred(module, loader)
    module.__dict__.update(
        __version__=found.group(1).decode(), __getattr__=deferred, __dir__=deferred.dir
    )
    sys.modules[name] = module
    return True


async def loaded(name: str = "aiohttp") -> None:
    """The package's deferred ``__init__`` run in a worker thread, if it still is.

    Called before the first client use (a peer call, a forward, an HTTP probe):
    loading the client side takes 60-100 ms, which the event loop would
    otherwise stand still for (aiohttp builds its SSL contexts at import on
    purpose, to keep the CA file's read off the loop). Another coroutine that
    asks for a name meanwhile waits for the same load."""
    module = sys.modules.get(name)
    deferred = None if module is None else module.__dict__.get("__getattr__")
    if isinstance(deferred, _Deferred):
        await asyncio.to_thread(deferred.load)


class _Deferred:
    """The module ``__getattr__`` until the package's ``__init__`` has run."""

    def __init__(self, module: types.ModuleType, loader: importlib.machinery.SourceFileLoader):
        self._module = module
        self._loader = loader
        # another thread may ask while the __init__ runs; the thread running it
        # may ask too (a name not bound yet): it then gets AttributeError, as
        # a module being imported answers
        self._lock = threading.RLock()
        self._running = False

    def __call__(self, attr: str) -> object:
        module = self._module
        full = f"{module.__name__}.{attr}"
        if importlib.machinery.PathFinder.find_spec(full, list(module.__path__)) is not None:
            return importlib.import_module(full)
        self.load()
        if attr in module.__dict__:
            return module.__dict__[attr]
        then = module.__dict__.get("__getattr__")
        if then is None or then is self:
            raise AttributeError(f"module {module.__name__!r} has no attribute {attr!r}")
        return then(attr)

    def dir(self) -> list[str]:
        self.load()
        if self._module.__dict__.get("__dir__") == self.dir:  # asked while it runs
            return sorted(self._module.__dict__)
        return dir(self._module)  # the package's own __dir__ now

    def load(self) -> None:
        """Run the package's ``__init__`` into its module, once."""
        with self._lock:
            if not self._running and self._module.__dict__.get("__getattr__") is self:
                self._running = True
                try:
                    self._loader.exec_module(self._module)
                finally:
                    self._running = False
