"""The devices ``serve --device MODULE:ATTR`` names, loaded onto one router."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Sequence
from typing import Any

from dispatcher import Router

__all__ = ["load_devices"]


def load_devices(specs: Sequence[str]) -> Router:
    """One router holding every device named by ``specs``.

    A spec is ``module:attribute`` (the attribute may be dotted) or just
    ``module``. It may name a :class:`~dispatcher.Router` (its claims are
    copied), an object whose ``router`` attribute is one (a machine
    composition), a device object or module with ``@on_port`` handlers, or a
    class or function called without arguments to make any of these. Raises
    ``ValueError`` naming the spec when it cannot be loaded, and
    :class:`~dispatcher.OverlappingClaimError` when two devices claim a port.
    """
    router = Router()
    for spec in specs:
        target = _resolve(spec)
        if inspect.isclass(target) or inspect.isfunction(target):
            try:
                target = target()
            except Exception as error:
                raise ValueError(f"device {spec!r}: calling it failed: {error!r}") from error
        target = getattr(target, "router", target)  # e.g. a machine composition holding its router
        if isinstance(target, Router):
            router.include(target)
        elif not router.include(target):
            raise ValueError(f"device {spec!r} is neither a Router nor anything with @on_port handlers")
    return router


def _resolve(spec: str) -> Any:
    module_name, _, attribute = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"device {spec!r}: cannot import {module_name!r}: {error}") from error
    for name in filter(None, attribute.split(".")):
        try:
            target = getattr(target, name)
        except AttributeError:
            raise ValueError(f"device {spec!r}: {module_name} has no attribute {attribute!r}") from None
    return target
