"""Device state: power-on reset, save and restore, one JSON document per VM.

A device with state declares what kind of device it is, the version of its
saved state and the oldest version it can still restore, and three methods
(the :class:`StatefulDevice` protocol). A plain handler function without
state needs nothing. :func:`save_devices` collects the state of every
stateful device a :class:`~dispatcher.Router` serves into one document,
:func:`restore_devices` puts it back (all devices or none), and
:func:`dump_state` / :func:`load_state` turn a document into JSON text and
back. ``docs/DEVICE_STATE.md`` is the guide for device authors.

A document::

    {"format": "intercept-dispatch device state", "format_version": 1,
     "devices": {"uart16550@0x3f8": {"kind": "uart16550", "version": 1, "state": {...}}, ...}}

Everything here is sans-I/O; the caller holds the VM's ``Dispatcher.lock``
while it saves, restores or resets a VM that is being served.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

from .errors import StateError
from .router import Router

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "STATE_OWNER",
    "StateFields",
    "StatefulDevice",
    "check_entry",
    "device_id",
    "devices_of",
    "dump_state",
    "is_stateful",
    "load_state",
    "owned_by",
    "reset_devices",
    "restore_device",
    "restore_devices",
    "save_device",
    "save_devices",
]

FORMAT = "intercept-dispatch device state"
"""The ``format`` field of every state document."""

FORMAT_VERSION = 1
"""The ``format_version`` of the documents this version writes and reads (the envelope, not a device's state)."""

STATE_OWNER = "__device_state_owner__"
"""The attribute naming the device object of a handler that is not a bound method (see :func:`~dispatcher.owned_by`)."""

_F = TypeVar("_F", bound=Callable[..., Any])


@runtime_checkable
class StatefulDevice(Protocol):
    """What a device with state defines (duck-typed: no base class is needed).

    ``restore`` receives the ``state`` a ``save`` of version ``version``
    returned (``oldest_state_version <= version <= state_version``), after a
    trip through JSON. It validates every field before it changes anything,
    and raises :class:`~dispatcher.StateError` naming the field; a device
    reading an older version converts it first. Time-driven devices save
    time relative to their clock's present and re-base it on restore, so no
    guest time passes while a VM is saved.
    """

    #: A name for the kind of device, the same in every version: "uart16550", "i8254", ...
    state_kind: ClassVar[str]
    #: The version of the state :meth:`save` returns; bumped whenever its shape or meaning changes.
    state_version: ClassVar[int]
    #: The oldest version :meth:`restore` still accepts (a converter brings it to the current one).
    oldest_state_version: ClassVar[int]

    def reset(self) -> None:
        """Return to the power-on state the device's datasheet gives."""
        ...

    def save(self) -> dict[str, Any]:
        """The device's state as JSON-able values (dict, list, str, int, float, bool, None); no side effects."""
        ...

    def restore(self, state: Mapping[str, Any], version: int) -> None:
        """Take the state ``save`` returned in version ``version``; raise ``StateError`` before changing anything."""
        ...


def is_stateful(obj: object) -> bool:
    """Whether ``obj`` declares the :class:`StatefulDevice` protocol."""
    return (
        isinstance(getattr(obj, "state_kind", None), str)
        and isinstance(getattr(obj, "state_version", None), int)
        and isinstance(getattr(obj, "oldest_state_version", None), int)
        and all(callable(getattr(obj, name, None)) for name in ("reset", "save", "restore"))
    )


def owned_by(owner: object) -> Callable[[_F], _F]:
    """Mark a handler that is not a bound method (a closure made per instance) as belonging to ``owner``.

    :func:`devices_of` finds a device through the claims of its handlers:
    a bound method names its object; a function marked with this names
    ``owner``.
    """

    def mark(handler: _F) -> _F:
        setattr(handler, STATE_OWNER, owner)
        return handler

    return mark


def _owners(handler: object) -> Iterator[object]:
    yield handler
    for attribute in ("__self__", STATE_OWNER):
        owner = getattr(handler, attribute, None)
        if owner is not None:
            yield owner


def device_id(kind: str, port: int) -> str:
    """A device's id in a state document: its kind and the first port it claims, ``"uart16550@0x3f8"``."""
    return f"{kind}@{port:#x}"


def devices_of(router: Router) -> dict[str, StatefulDevice]:
    """The stateful devices ``router`` serves, by id, in port order.

    A device is found from its claims: the object of a bound method
    handler, the handler itself if it is a stateful object, or the owner
    :func:`~dispatcher.owned_by` names. Its id is :func:`~dispatcher.device_state.device_id` of its kind and the
    lowest port it claims; should two devices share both (one claiming a
    port for reads, the other for writes), the later one gets ``#2``.
    """
    first: dict[int, tuple[int, object]] = {}
    for claim in router.claims:
        for owner in _owners(claim.handler):
            if is_stateful(owner):
                known = first.get(id(owner))
                if known is None or claim.first < known[0]:
                    first[id(owner)] = (claim.first, owner)
    found: dict[str, StatefulDevice] = {}
    for port, owner in sorted(first.values(), key=lambda item: item[0]):
        name = base = device_id(owner.state_kind, port)  # type: ignore[attr-defined]
        serial = 1
        while name in found:
            serial += 1
            name = f"{base}#{serial}"
        found[name] = owner  # type: ignore[assignment]
    return found


# -- reading saved state ------------------------------------------------------------------------------


class StateFields:
    """Typed, checked access to a saved state for a device's ``restore``.

    Each getter returns the field's value or raises :class:`StateError`
    naming ``device`` and the field's dotted path; a device reads every
    field it needs into locals first and changes itself only after the last
    one passed.
    """

    def __init__(self, device: str, state: object, path: str = "") -> None:
        self.device = device
        self.path = path
        if not isinstance(state, Mapping):
            raise StateError(f"is {_describe(state)}, not an object", device=device, field=path or "state")
        self.state: Mapping[str, Any] = state

    def error(self, name: str, reason: str) -> StateError:
        """A :class:`StateError` for field ``name`` of this object."""
        return StateError(reason, device=self.device, field=self._field(name))

    def _field(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def value(self, name: str) -> object:
        """The raw value of field ``name``; a missing field is an error."""
        try:
            return self.state[name]
        except KeyError:
            raise self.error(name, "missing") from None

    def integer(self, name: str, low: int, high: int) -> int:
        """An integer field in ``low..high``."""
        return self._int(name, self.value(name), low, high)

    def _int(self, name: str, value: object, low: int, high: int) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.error(name, f"is {_describe(value)}, not an integer")
        if not low <= value <= high:
            raise self.error(name, f"is {value:#x}, outside {low:#x}..{high:#x}")
        return value

    def optional_integer(self, name: str, low: int, high: int) -> int | None:
        """An integer field in ``low..high``, or null."""
        value = self.value(name)
        return None if value is None else self._int(name, value, low, high)

    def boolean(self, name: str) -> bool:
        """A true/false field."""
        value = self.value(name)
        if not isinstance(value, bool):
            raise self.error(name, f"is {_describe(value)}, not true or false")
        return value

    def number(self, name: str, low: float = -math.inf, high: float = math.inf) -> float:
        """A finite number field in ``low..high`` (an integer is taken as a float)."""
        value = self.value(name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise self.error(name, f"is {_describe(value)}, not a finite number")
        if not low <= value <= high:
            raise self.error(name, f"is {value!r}, outside {low!r}..{high!r}")
        return float(value)

    def choice(self, name: str, allowed: Sequence[object]) -> object:
        """A field that must hold one of ``allowed``."""
        value = self.value(name)
        if isinstance(value, bool) or value not in allowed:
            raise self.error(name, f"is {value!r}, not one of {', '.join(map(repr, allowed))}")
        return value

    def data(self, name: str, *, length: int | None = None, max_length: int = 1 << 24) -> bytearray:
        """Bytes saved as a hex string (``bytes.hex()``), of exactly ``length`` bytes if given."""
        value = self.value(name)
        if not isinstance(value, str):
            raise self.error(name, f"is {_describe(value)}, not a hex string")
        try:
            data = bytearray.fromhex(value)
        except ValueError:
            raise self.error(name, "is not a hex string") from None
        if length is not None and len(data) != length:
            raise self.error(name, f"holds {len(data)} bytes, not {length}")
        if len(data) > max_length:
            raise self.error(name, f"holds {len(data)} bytes, more than {max_length}")
        return data

    def ints(self, name: str, low: int, high: int, *, max_length: int) -> list[int]:
        """A list of at most ``max_length`` integers in ``low..high``."""
        value = self.value(name)
        if not isinstance(value, list):
            raise self.error(name, f"is {_describe(value)}, not a list")
        if len(value) > max_length:
            raise self.error(name, f"has {len(value)} entries, more than {max_length}")
        return [self._int(f"{name}[{i}]", item, low, high) for i, item in enumerate(value)]

    def section(self, name: str) -> StateFields:
        """A nested object."""
        return StateFields(self.device, self.value(name), self._field(name))

    def optional_section(self, name: str) -> StateFields | None:
        """A nested object, or null."""
        value = self.value(name)
        return None if value is None else StateFields(self.device, value, self._field(name))

    def sections(self, name: str, *, length: int) -> list[StateFields | None]:
        """A list of exactly ``length`` nested objects (or nulls)."""
        value = self.value(name)
        if not isinstance(value, list):
            raise self.error(name, f"is {_describe(value)}, not a list")
        if len(value) != length:
            raise self.error(name, f"has {len(value)} entries, not {length}")
        return [None if item is None else StateFields(self.device, item, self._field(f"{name}[{i}]"))
                for i, item in enumerate(value)]  # fmt: skip


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        shown = value if len(value) <= 20 else value[:17] + "..."
        return f"the string {shown!r}"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


# -- one device ---------------------------------------------------------------------------------------


def save_device(device: StatefulDevice) -> dict[str, Any]:
    """One device's entry in a document: ``{"kind", "version", "state"}``."""
    return {"kind": device.state_kind, "version": device.state_version, "state": device.save()}


def check_entry(device: StatefulDevice, entry: object, *, name: str) -> tuple[Mapping[str, Any], int]:
    """Check an entry's envelope against ``device`` (kind, version); return its state and version.

    :raises StateError: naming ``name`` and ``kind``, ``version`` or ``state``.
    """
    fields = StateFields(name, entry)
    kind = fields.value("kind")
    if kind != device.state_kind:
        raise fields.error("kind", f"is {kind!r}: the saved state of another device, this one is {device.state_kind!r}")
    version = fields.integer("version", 0, 1 << 31)
    if version > device.state_version:
        raise fields.error(
            "version", f"is {version}, newer than this device's version {device.state_version}: restore it with "
            "the version of this software that saved it, or a later one"
        )  # fmt: skip
    if version < device.oldest_state_version:
        raise fields.error(
            "version", f"is {version}, older than {device.oldest_state_version}, the oldest this device restores"
        )
    return fields.section("state").state, version


def restore_device(device: StatefulDevice, entry: object, *, name: str) -> None:
    """Restore one device from its document entry; on error nothing of it has changed.

    :raises StateError: naming ``name`` and the field.
    """
    state, version = check_entry(device, entry, name=name)
    _restore(device, state, version, name)


def _restore(device: StatefulDevice, state: Mapping[str, Any], version: int, name: str) -> None:
    try:
        device.restore(state, version)
    except StateError as error:
        if error.device == name:
            raise
        raise StateError(error.reason, device=name, field=error.field) from None


# -- a VM ---------------------------------------------------------------------------------------------


def save_devices(router: Router) -> dict[str, Any]:
    """The state of every stateful device ``router`` serves, as one document."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "devices": {name: save_device(device) for name, device in devices_of(router).items()},
    }


def _check_document(document: object, source: str) -> Mapping[str, Any]:
    fields = StateFields(source, document)
    if fields.value("format") != FORMAT:
        raise fields.error("format", f"is {_describe(fields.value('format'))}, not {FORMAT!r}: not a state document")
    version = fields.integer("format_version", 0, 1 << 31)
    if version != FORMAT_VERSION:
        raise fields.error("format_version", f"is {version}; this version reads {FORMAT_VERSION}")
    return fields.section("devices").state


def restore_devices(router: Router, document: object, *, source: str = "state document") -> None:
    """Restore every stateful device of ``router`` from ``document``; all of them or none.

    The document is checked first: its format, every device of the VM
    present under its id with the same kind, no device the VM lacks, each
    version between the device's oldest and current. Then each device
    restores its own state, validating it first; should one refuse, those
    already restored get back the state they had, so the VM is left as it
    was.

    :raises StateError: naming the device (``source`` for the envelope) and the field.
    """
    devices = devices_of(router)
    saved = _check_document(document, source)
    for name in saved:
        if name not in devices:
            raise StateError(
                f"is in the document but not in this VM (its devices: {', '.join(devices) or 'none'})",
                device=name, field="devices",
            )  # fmt: skip
    checked: list[tuple[str, StatefulDevice, Mapping[str, Any], int]] = []
    for name, device in devices.items():
        if name not in saved:
            raise StateError("is missing from the document", device=name, field="devices")
        state, version = check_entry(device, saved[name], name=name)
        checked.append((name, device, state, version))
    before = {name: device.save() for name, device in devices.items()}
    done: list[tuple[str, StatefulDevice]] = []
    try:
        for name, device, state, version in checked:
            try:
                _restore(device, state, version, name)
            except StateError:
                raise
            except Exception as error:
                # A restore that fails unexpectedly is still reported as the device's error, one line.
                raise StateError(
                    f"restore failed: {type(error).__name__}: {error}", device=name, field="state"
                ) from error
            done.append((name, device))
    except StateError:
        for name, device in reversed(done):
            device.restore(before[name], device.state_version)
        raise


def reset_devices(router: Router) -> None:
    """Reset every stateful device of ``router`` to its power-on state, in port order."""
    for device in devices_of(router).values():
        device.reset()


# -- JSON text ----------------------------------------------------------------------------------------


def dump_state(document: Mapping[str, Any]) -> str:
    """A document as JSON text: indented, one field per line, so that a person can read and diff it.

    :raises StateError: if a device saved something JSON cannot carry (NaN, bytes, an object).
    """
    try:
        return json.dumps(document, indent=1, allow_nan=False) + "\n"
    except (TypeError, ValueError) as error:
        raise StateError(f"cannot be written as JSON: {error}", device="state document", field="devices") from None


def load_state(text: str | bytes, *, source: str) -> dict[str, Any]:
    """Parse JSON text written by :func:`dump_state`; ``source`` (a file name) names it in errors.

    Only the JSON is checked here; :func:`restore_devices` checks the rest.

    :raises StateError: for text that is not JSON (a truncated or corrupted file), naming the line and column.
    """
    try:
        document = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as error:
        raise StateError(
            f"not valid JSON ({error.msg}): a truncated or corrupted state file",
            device=source, field=f"line {error.lineno} column {error.colno}",
        ) from None  # fmt: skip
    except UnicodeDecodeError as error:
        raise StateError(f"not UTF-8 text ({error.reason})", device=source, field=f"byte {error.start}") from None
    except ValueError as error:
        raise StateError(str(error), device=source, field="text") from None
    if not isinstance(document, dict):
        raise StateError(f"is {_describe(document)}, not a state document", device=source, field="document")
    return document


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a number a state file may hold")
