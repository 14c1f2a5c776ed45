"""The devices ``serve --device MODULE:ATTR`` names, loaded onto one router per VM.

Every VM gets devices of its own: each spec that names a class or a
function is called once per VM, so two VMs never share a device object
(one VM's CMOS write is not another's). A device that must be shared across
VMs (a host-wide resource, a test double) is marked with :func:`shared`;
only a service run ``--in-process`` can serve it, since a worker process
per VM cannot share an object.

Device code comes only from where the user says: modules importable by the
interpreter (installed packages) and the directories given with
``--device-path`` (put in front of ``sys.path``); never the working
directory.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Sequence
from typing import Any, TypeVar

from dispatcher import DispatchError, Router

__all__ = [
    "SHARED_ATTRIBUTE",
    "DeviceLoader",
    "SharedDeviceError",
    "add_device_paths",
    "load_devices",
    "resolve",
    "shared",
]

SHARED_ATTRIBUTE = "__intercept_dispatch_shared__"
"""The attribute :func:`shared` sets on what it marks."""

_T = TypeVar("_T")


class SharedDeviceError(DispatchError):
    """A device marked :func:`shared` where each VM runs in a process of its own; ``str()`` names the spec."""


def shared(target: _T) -> _T:
    """Mark a device factory, class, object or router as one instance serving every VM.

    ::

        @shared
        def host_clock() -> Router: ...

    A marked factory is called once, not once per VM, and its product is
    included in every VM's router. Only ``serve --in-process`` (one process
    for all VMs, unisolated) accepts it; the default, a worker process per
    VM, refuses to start and says which device is marked.
    """
    setattr(target, SHARED_ATTRIBUTE, True)
    return target


def add_device_paths(paths: Sequence[str]) -> None:
    """Put ``paths`` (``--device-path`` directories) in front of ``sys.path``, in the order given."""
    for path in reversed([os.path.abspath(p) for p in paths]):
        if path not in sys.path:
            sys.path.insert(0, path)


class DeviceLoader:
    """Makes one router per VM from ``specs``; ``allow_shared`` permits :func:`shared` devices.

    A spec is ``module:attribute`` (the attribute may be dotted) or just
    ``module``. It may name a :class:`~dispatcher.Router` (its claims are
    copied), an object whose ``router`` attribute is one (a machine
    composition), a device object or module with ``@on_port`` handlers, or a
    class or function called without arguments to make any of these.
    Creating the loader imports the modules; :meth:`router` calls the
    factories. Both raise ``ValueError`` naming the spec when it cannot be
    loaded, :class:`SharedDeviceError` for a shared device not allowed here,
    and :class:`~dispatcher.OverlappingClaimError` when two devices claim a
    port.
    """

    def __init__(self, specs: Sequence[str], *, allow_shared: bool = True) -> None:
        self.specs = tuple(specs)
        self._targets = [(spec, resolve(spec)) for spec in self.specs]
        self._shared: dict[str, Any] = {}
        for spec, target in self._targets:
            if getattr(target, SHARED_ATTRIBUTE, False) and not allow_shared:
                raise SharedDeviceError(
                    f"device {spec!r} is marked shared across VMs; only `serve --in-process` can serve it "
                    "(each VM has a worker process of its own otherwise)"
                )

    @property
    def shared_specs(self) -> list[str]:
        """The specs whose device is marked :func:`shared`."""
        return [spec for spec, target in self._targets if getattr(target, SHARED_ATTRIBUTE, False)]

    def router(self) -> Router:
        """A new router holding every device: new device objects, except the shared ones."""
        router = Router()
        for spec, target in self._targets:
            if getattr(target, SHARED_ATTRIBUTE, False):
                if spec not in self._shared:
                    self._shared[spec] = _make(spec, target)
                made = self._shared[spec]
            else:
                made = _make(spec, target)
            made = getattr(made, "router", made)  # e.g. a machine composition holding its router
            if isinstance(made, Router):
                router.include(made)
            elif not router.include(made):
                raise ValueError(f"device {spec!r} is neither a Router nor anything with @on_port handlers")
        return router


def load_devices(specs: Sequence[str]) -> Router:
    """One router holding every device named by ``specs`` (see :class:`DeviceLoader`)."""
    return DeviceLoader(specs).router()


def _make(spec: str, target: Any) -> Any:
    if inspect.isclass(target) or inspect.isfunction(target):
        try:
            return target()
        except Exception as error:
            raise ValueError(f"device {spec!r}: calling it failed: {error!r}") from error
    return target


def resolve(spec: str, *, what: str = "device") -> Any:
    """What ``module:attribute`` (the attribute may be dotted, or absent) names, its module imported.

    :raises ValueError: naming ``what`` and the spec, when the module cannot be imported or has no such attribute.
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name:
        raise ValueError(f"{what} {spec!r}: not MODULE:ATTR")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{what} {spec!r}: cannot import {module_name!r}: {error}") from error
    for name in filter(None, attribute.split(".")):
        try:
            target = getattr(target, name)
        except AttributeError:
            raise ValueError(f"{what} {spec!r}: {module_name} has no attribute {attribute!r}") from None
    return target
