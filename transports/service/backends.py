"""The event loops ``serve`` can run on, and the optional package (and extra) each needs.

::

    check_backend("trio")   # raises BackendUnavailableError if trio cannot be imported

asyncio comes with Python; trio and uvloop are optional dependencies,
installed with the package's extras of the same names
(``pip install 'intercept-dispatch[trio]'``).
"""

from __future__ import annotations

import importlib
from typing import NamedTuple

from dispatcher import DispatchError

__all__ = ["BACKENDS", "Backend", "BackendUnavailableError", "check_backend"]

DISTRIBUTION = "intercept-dispatch"


class Backend(NamedTuple):
    """One event loop: the module it needs (None: the standard library's) and the extra that installs it."""

    name: str
    module: str | None
    extra: str | None


BACKENDS: dict[str, Backend] = {
    "asyncio": Backend("asyncio", None, None),
    "trio": Backend("trio", "trio", "trio"),
    "uvloop": Backend("uvloop", "uvloop", "uvloop"),
}
"""Every backend ``serve --backend`` accepts, by name."""


class BackendUnavailableError(DispatchError):
    """A backend that is unknown, or whose package is not installed (or fails to import).

    ``str()`` is the whole user-facing explanation, e.g. ``--backend trio
    needs the trio package: pip install 'intercept-dispatch[trio]'``.
    """

    def __init__(self, message: str, *, backend: str, extra: str | None) -> None:
        super().__init__(message)
        self.backend = backend
        self.extra = extra


def check_backend(name: str) -> None:
    """Raise :class:`BackendUnavailableError` unless the event loop ``name`` can run here.

    Imports the backend's package (the event loop will need it at once
    anyway), so a package that is installed but broken is found too.
    """
    backend = BACKENDS.get(name)
    if backend is None:
        known = ", ".join(BACKENDS)
        raise BackendUnavailableError(
            f"--backend {name}: unknown event loop (choose {known})", backend=name, extra=None
        )
    if backend.module is None:
        return
    install = f"pip install '{DISTRIBUTION}[{backend.extra}]'"
    try:
        importlib.import_module(backend.module)
    except ImportError as error:
        if error.name == backend.module:
            message = f"--backend {name} needs the {backend.module} package: {install}"
        else:
            message = f"--backend {name}: the {backend.module} package does not import ({error}); try {install}"
        raise BackendUnavailableError(message, backend=name, extra=backend.extra) from None
