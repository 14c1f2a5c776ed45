"""The i8254 programmable interval timer (0x40-0x43) and the PC's system control port B (0x61).

Constructors::

    Pit8254(*, io_base=0x40, irq: IrqLine | None = None, clock: Callable[[], float] = time.monotonic)
    SystemControlB(pit: Pit8254, *, io_base=0x61)

The three counters count ticks of a 1.193182 MHz input derived from
``clock`` (seconds, monotonic): tick ``n`` is the moment ``clock()`` reaches
``n / PIT_HZ``. Channel 0's OUT drives ``irq`` (IRQ 0); the gates of
channels 0 and 1 are tied high, channel 2's gate is bit 0 of port 0x61 and
its OUT is readable there.

The PIT has no thread: the OUT pins are computed when asked. A machine loop
calls :meth:`Pit8254.update` (every port access does too) to move IRQ 0 to
where channel 0's OUT is now, with one rising edge for any number of
periods that elapsed since the last call (a PIC latches one request per
line anyway; :meth:`~Pit8254.update` returns how many there were), and
sleeps until :meth:`Pit8254.next_due`.

Ports 0x40-0x42 are the counters, 0x43 the control word register, which
cannot be read (the data bus floats: reads are left unclaimed and answer
0xFF). Every port is 8 bits wide: a wider access arrives as byte accesses
to consecutive ports, as on the ISA bus.

At power-up the 8254's state is undefined; like QEMU, this model starts
every counter in mode 3 with a count of 65536, so channels 0 and 1 run at
18.2 Hz until the firmware programs them.

Device state (kinds ``i8254``, version 1, and ``port61``, version 1): every
counter's registers, with each moment kept as ticks relative to the tick of
the save (and how far into that tick the save came), so on restore the
counters take up where they were, with no tick passing while the state was
saved. Channel 2's GATE is the PIT's state;
port 0x61 keeps only its own four bits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from dispatcher import IrqLine, PortAccess, StateFields, on_port

__all__ = ["PIT_HZ", "Channel", "Pit8254", "SystemControlB"]

PIT_HZ = 1_193_182
# RW field of the control word
LATCH, LSB, MSB, WORD = 0, 1, 2, 3
_REFRESH_TICKS = 18  # port 0x61 bit 4 toggles every 15.085 us, 18 PIT ticks, as the DRAM refresh does


def _from_bcd(value: int) -> int:
    return sum(((value >> 4 * i) & 0xF) * 10**i for i in range(4))


def _to_bcd(value: int) -> int:
    return sum((value // 10**i % 10) << 4 * i for i in range(4))


class Channel:
    """One counter, in ticks. ``e`` is the number of ticks since its counting element was loaded."""

    def __init__(self, index: int, tick: int, gate: bool) -> None:
        self.index = index
        self.gate = gate
        self.mode = 3
        self.mode_bits = 3  # M2-M0 as written: modes 6 and 7 are 2 and 3
        self.rw = WORD
        self.bcd = False
        self.programmed = 0x10000  # the count last written, in ticks
        self.count = 0x10000  # the count the counting element runs with
        self.armed = True  # a count has been written since the control word
        self.running = False  # the counting element has a count and counts (or is frozen by GATE)
        self.start = tick  # the tick at which e = 0
        self.frozen: int | None = None  # e while GATE holds a mode 0 or 4 count
        self.held = 0  # what the counter reads while it does not run
        self.pending: int | None = None  # a mode 2/3 count waiting for the end of the (half) cycle
        self.pending_at = 0
        self.pending_start = 0
        self.null_until = tick  # the null count flag is set before this tick
        self.last = tick
        self.latched: list[int] = []  # bytes of a latched count, next first
        self.status: int | None = None  # a latched status byte
        self.read_msb = False
        self.write_msb = False
        self.write_lsb = 0
        if gate:
            self._load(tick)

    # Moments (ticks) in the state are relative to the tick of the save; a null count flag
    # waiting for a trigger or a count ("until a load") is saved as null.
    _NEVER = 1 << 62

    def save(self, now: int) -> dict[str, Any]:
        """This counter's state, moments relative to tick ``now``."""
        return {
            "mode": self.mode,
            "mode_bits": self.mode_bits,
            "rw": self.rw,
            "bcd": self.bcd,
            "gate": self.gate,
            "programmed": self.programmed,
            "count": self.count,
            "armed": self.armed,
            "running": self.running,
            "start": self.start - now,
            "frozen": self.frozen,
            "held": self.held,
            "pending": self.pending,
            # Where a pending count takes over; meaningless (null) without one.
            "pending_at": None if self.pending is None else self.pending_at - now,
            "pending_start": None if self.pending is None else self.pending_start - now,
            "null_until": None if self.null_until >= self._NEVER else self.null_until - now,
            "last": self.last - now,
            "latched": list(self.latched),
            "status": self.status,
            "read_msb": self.read_msb,
            "write_msb": self.write_msb,
            "write_lsb": self.write_lsb,
        }

    @classmethod
    def check(cls, f: StateFields, now: int) -> Callable[[Channel], None]:
        """Check a saved counter; return what puts it into a channel at tick ``now``."""
        span = 1 << 60
        mode_bits = f.integer("mode_bits", 0, 7)
        mode = f.integer("mode", 0, 5)
        selected = mode_bits & 3 if mode_bits & 2 else mode_bits
        if mode != selected:
            raise f.error("mode", f"is {mode}, but mode_bits {mode_bits:#05b} select mode {selected}")
        values = {
            "mode": mode,
            "mode_bits": mode_bits,
            "rw": f.integer("rw", LSB, WORD),
            "bcd": f.boolean("bcd"),
            "gate": f.boolean("gate"),
            "programmed": f.integer("programmed", 1, 0x10000),
            "count": f.integer("count", 1, 0x10000),
            "armed": f.boolean("armed"),
            "running": f.boolean("running"),
            "start": now + f.integer("start", -span, span),
            "frozen": f.optional_integer("frozen", 0, span),
            "held": f.integer("held", 0, 0xFFFF),
            "pending": f.optional_integer("pending", 1, 0x10000),
            "pending_at": now + (f.optional_integer("pending_at", -span, span) or 0),
            "pending_start": now + (f.optional_integer("pending_start", -span, span) or 0),
            "last": now + f.integer("last", -span, 0),
            "latched": f.ints("latched", 0, 0xFF, max_length=2),
            "status": f.optional_integer("status", 0, 0xFF),
            "read_msb": f.boolean("read_msb"),
            "write_msb": f.boolean("write_msb"),
            "write_lsb": f.integer("write_lsb", 0, 0xFF),
        }
        null_until = f.optional_integer("null_until", -span, span)
        values["null_until"] = cls._NEVER if null_until is None else now + null_until

        def apply(channel: Channel) -> None:
            for name, value in values.items():
                setattr(channel, name, value)

        return apply

    # -- the waveform -----------------------------------------------------------------------------

    @property
    def modulus(self) -> int:
        return 10000 if self.bcd else 0x10000

    def e(self, tick: int) -> int:
        return self.frozen if self.frozen is not None else tick - self.start

    def out(self, tick: int) -> bool:
        """The OUT pin at ``tick`` (the channel must have been advanced to ``tick``)."""
        mode = self.mode
        if not self.running:
            return mode != 0  # after the control word OUT is low in mode 0, high otherwise
        e = self.e(tick)
        n = self.count
        if e < 0:
            return mode != 0
        if mode in (0, 1):
            return e >= n
        if mode == 2:
            return e % n != n - 1
        if mode == 3:
            return e % n < (n + 1) // 2
        return e != n  # modes 4 and 5 strobe low for one tick

    def counter(self, tick: int) -> int:
        """The counting element's value at ``tick``, as the chip presents it (binary or BCD)."""
        e = self.e(tick)
        if not self.running or e < 0:
            value = self.held
        else:
            n = self.count
            if self.mode == 2:
                value = n - e % n
            elif self.mode == 3:
                # Each half cycle reloads N and counts down by two to 2; an odd N first
                # drops by one in the high half and by three in the low half.
                p, high = e % n, (n + 1) // 2
                q = p if p < high else p - high
                value = n if q == 0 else n - 2 * q + (0 if not n & 1 else 1 if p < high else -1)
            else:
                value = n - e
            value %= self.modulus
        return _to_bcd(value) if self.bcd else value

    def _rising(self, a: int, b: int) -> int:
        """How many times OUT rises for e in (a, b]."""
        if b <= a:
            return 0
        n, mode = self.count, self.mode
        if mode in (0, 1):
            return 1 if a < n <= b else 0
        if mode in (4, 5):
            return 1 if a < n + 1 <= b else 0
        if n == 1 or b < n:  # a count of 1 is illegal in modes 2 and 3: OUT never rises
            return 0
        return b // n - max(a, 0) // n

    def _next_rising(self, e: int) -> int | None:
        """The first e after ``e`` at which OUT rises, or None."""
        n, mode = self.count, self.mode
        if mode in (0, 1):
            return n if e < n else None
        if mode in (4, 5):
            return n + 1 if e < n + 1 else None
        if n == 1:
            return None
        return (max(e, 0) // n + 1) * n

    def advance(self, tick: int) -> int:
        """Bring the channel to ``tick``; return how many times OUT rose since the last call."""
        edges = 0
        if self.running and self.frozen is None:
            while self.pending is not None and self.pending_at <= tick:
                edges += self._rising(self.last - self.start, self.pending_at - self.start)
                self.count, self.start, self.last = self.pending, self.pending_start, self.pending_at
                self.pending = None
            edges += self._rising(self.last - self.start, tick - self.start)
        self.last = tick
        return edges

    def next_edge(self) -> int | None:
        """The tick after the last :meth:`advance` at which OUT next rises, as programmed now, or None."""
        if not self.running or self.frozen is not None:
            return None
        nxt = self._next_rising(self.last - self.start)
        if self.pending is not None and (nxt is None or self.start + nxt > self.pending_at):
            # The current count ends first; the pending one (modes 2 and 3) rises every period.
            n = self.pending
            return None if n == 1 else self.pending_start + ((self.pending_at - self.pending_start) // n + 1) * n
        return None if nxt is None else self.start + nxt

    # -- programming ----------------------------------------------------------------------------

    def control(self, value: int, tick: int) -> None:
        """A control word for this channel with RW != 0."""
        self.held = self._binary(self.counter(tick))
        self.rw = (value >> 4) & 3
        self.mode_bits = (value >> 1) & 7
        self.mode = self.mode_bits & 3 if self.mode_bits & 2 else self.mode_bits
        self.bcd = bool(value & 1)
        self.armed = self.running = False
        self.frozen = self.pending = None
        self.latched, self.status = [], None
        self.read_msb = self.write_msb = False
        self.null_until = 1 << 62

    def write(self, value: int, tick: int) -> None:
        """A byte written to the counter's port."""
        if self.rw == LSB:
            self._set_count(value, tick)
        elif self.rw == MSB:
            self._set_count(value << 8, tick)
        elif not self.write_msb:
            self.write_lsb, self.write_msb = value, True
            if self.mode == 0:  # writing the first byte stops a mode 0 count; OUT goes low
                self.held = self._binary(self.counter(tick))
                self.running = False
        else:
            self.write_msb = False
            self._set_count(self.write_lsb | value << 8, tick)

    def _binary(self, value: int) -> int:
        return _from_bcd(value) if self.bcd else value

    def _set_count(self, raw: int, tick: int) -> None:
        self.programmed = self._binary(raw) or self.modulus
        self.armed = True
        mode = self.mode
        if mode in (1, 5):
            self.null_until = 1 << 62  # until a trigger loads it
        elif mode in (2, 3) and self.running and tick >= self.start:
            self._schedule(tick)
        elif self.gate or mode in (0, 4):
            self._load(tick)

    def _load(self, tick: int) -> None:
        # The count enters the counting element on the next CLK pulse.
        self.count = self.programmed
        self.running = True
        self.start = tick + 1
        self.null_until = tick + 1
        self.pending = None
        self.frozen = None if self.gate or self.mode not in (0, 4) else 0

    def _schedule(self, tick: int) -> None:
        """A new count while modes 2/3 run: it takes over at the end of the cycle (mode 3: half cycle)."""
        n, e = self.count, tick - self.start
        base = e // n * n
        new = self.programmed
        if self.mode == 3 and e - base < (n + 1) // 2:
            # The high half ends first; the new count goes on with its own low half.
            self.pending_at = self.start + base + (n + 1) // 2
            self.pending_start = self.pending_at - (new + 1) // 2
        else:
            self.pending_at = self.pending_start = self.start + base + n
        self.pending = new
        self.null_until = self.pending_at

    def set_gate(self, level: bool, tick: int) -> None:
        """GATE changes at ``tick`` (the channel must have been advanced to ``tick``)."""
        if level == self.gate:
            return
        self.gate = level
        mode = self.mode
        if level:
            if not self.armed:
                return
            if mode in (1, 2, 3, 5):
                self._load(tick)  # a trigger: (re)load on the next CLK pulse
            elif self.frozen is not None:
                self.start, self.frozen = tick - self.frozen, None
        elif self.running:
            if mode in (0, 4):
                self.frozen = max(self.e(tick), 0)
            elif mode in (2, 3):
                # GATE low stops the count and forces OUT high; a new pending count is the one to reload.
                self.held = self._binary(self.counter(tick))
                if self.pending is not None:
                    self.programmed, self.pending = self.pending, None
                self.running = False

    def latch_count(self, tick: int) -> None:
        if self.latched:
            return  # a second latch before the first is read is ignored
        value = self.counter(tick)
        if self.rw == LSB:
            self.latched = [value & 0xFF]
        elif self.rw == MSB:
            self.latched = [value >> 8]
        else:
            self.latched = [value & 0xFF, value >> 8]

    def latch_status(self, tick: int) -> None:
        if self.status is None:
            self.status = (
                self.out(tick) << 7 | (tick < self.null_until) << 6 | self.rw << 4 | self.mode_bits << 1 | int(self.bcd)
            )

    def read(self, tick: int) -> int:
        """A byte read from the counter's port: a latched status, a latched count, or the live count."""
        if self.status is not None:
            value, self.status = self.status, None
            return value
        if self.latched:
            return self.latched.pop(0)
        count = self.counter(tick)
        if self.rw == LSB:
            return count & 0xFF
        if self.rw == MSB:
            return count >> 8
        self.read_msb = not self.read_msb
        return count & 0xFF if self.read_msb else count >> 8


class Pit8254:
    """Three 8254 counters behind four ports; channel 0's OUT drives ``irq``."""

    state_kind = "i8254"
    state_version = 1
    oldest_state_version = 1

    def __init__(
        self,
        *,
        io_base: int = 0x40,
        irq: IrqLine | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.io_base = io_base
        self.irq = irq if irq is not None else IrqLine(name="PIT")
        self.clock = clock
        # Added to clock() * PIT_HZ: a restore keeps the saved position within the current tick.
        self._phase = 0.0
        tick = self.tick()
        self.channels = (Channel(0, tick, True), Channel(1, tick, True), Channel(2, tick, False))
        self.irq.set(self.channels[0].out(tick))

    def reset(self) -> None:
        """Power-on: every counter in mode 3 with a count of 65536 (the datasheet leaves it undefined; see above).

        Channel 2's GATE is an input and keeps its level.
        """
        tick = self.tick()
        gate2 = self.channels[2].gate
        self.channels = (Channel(0, tick, True), Channel(1, tick, True), Channel(2, tick, gate2))
        self.irq.set(self.channels[0].out(tick))

    def save(self) -> dict[str, Any]:
        """The three counters, moments relative to now (see the module's docstring)."""
        ticks = self.clock() * PIT_HZ + self._phase
        now = math.floor(ticks)
        return {"tick_fraction": ticks - now, "channels": [channel.save(now) for channel in self.channels]}

    def restore(self, state: Mapping[str, Any], version: int) -> None:
        """Take a state :meth:`save` returned, re-based to now; check every field first."""
        f = StateFields(f"{self.state_kind}@{self.io_base:#x}", state)
        fraction = f.number("tick_fraction", 0.0, 1.0)
        ticks = self.clock() * PIT_HZ
        now = math.floor(ticks)
        saved = f.sections("channels", length=3)
        appliers = []
        for index, section in enumerate(saved):
            if section is None:
                raise f.error(f"channels[{index}]", "is null, not a counter")
            appliers.append(Channel.check(section, now))
        self._phase = fraction - (ticks - now)
        for channel, apply in zip(self.channels, appliers, strict=True):
            apply(channel)
        channel0 = self.channels[0]
        self.irq.set(channel0.out(channel0.last))

    def tick(self, now: float | None = None) -> int:
        """The number of input clock periods at ``now`` (default: the clock's time)."""
        return math.floor((self.clock() if now is None else now) * PIT_HZ + self._phase)

    def update(self, now: float | None = None) -> int:
        """Advance every channel to ``now`` and drive IRQ 0; return channel 0's rising edges since the last call."""
        return self._sync(self.tick(now))

    poll = update

    def _sync(self, tick: int) -> int:
        channel0 = self.channels[0]
        edges = channel0.advance(tick)
        self.channels[1].advance(tick)
        self.channels[2].advance(tick)
        if edges:
            # However many periods passed since the last look, the line shows one edge.
            self.irq.lower()
            self.irq.raise_()
        self.irq.set(channel0.out(tick))
        return edges

    def next_due(self) -> float | None:
        """The ``clock`` time of channel 0's next rising OUT edge, as of the last update, or None."""
        tick = self.channels[0].next_edge()
        if tick is None:
            return None
        when = (tick - self._phase) / PIT_HZ
        while self.tick(when) < tick:  # never wake a rounding error too early
            when = math.nextafter(when, math.inf)
        return when

    def set_gate(self, channel: int, level: bool) -> None:
        """Drive channel ``channel``'s GATE input."""
        tick = self.tick()
        self._sync(tick)
        self.channels[channel].set_gate(level, tick)
        self._sync(tick)

    def out(self, channel: int) -> bool:
        """Channel ``channel``'s OUT pin now."""
        tick = self.tick()
        self._sync(tick)
        return self.channels[channel].out(tick)

    @on_port(0, 3, max_size=1)
    def counters(self, access: PortAccess) -> int | None:
        """The counter ports of channels 0, 1 and 2."""
        tick = self.tick()
        self._sync(tick)
        channel = self.channels[access.offset]
        if not access.is_write:
            return channel.read(tick)
        channel.write(access.value & 0xFF, tick)
        self._sync(tick)
        return None

    @on_port(3, 1, access="w", max_size=1)
    def control_word(self, access: PortAccess) -> None:
        """The control word register: program a counter, latch a count, or read back."""
        tick = self.tick()
        self._sync(tick)
        value = access.value & 0xFF
        select = value >> 6
        if select == 3:  # read-back: COUNT (bit 5) and STATUS (bit 4) are active low
            for channel in self.channels:
                if value & 2 << channel.index:
                    if not value & 0x20:
                        channel.latch_count(tick)
                    if not value & 0x10:
                        channel.latch_status(tick)
        elif (value >> 4) & 3 == LATCH:
            self.channels[select].latch_count(tick)
        else:
            self.channels[select].control(value, tick)
        self._sync(tick)


class SystemControlB:
    """Port 0x61: channel 2's gate and the speaker enable (write), their state, refresh and OUT2 (read).

    Bits 0-3 read back as written (0: gate 2, 1: speaker data, 2-3: parity
    and channel check enables); bit 4 toggles with each DRAM refresh, every
    15.085 us; bit 5 is channel 2's OUT; bits 6-7 (channel check and parity
    error) read 0.
    """

    state_kind = "port61"
    state_version = 1
    oldest_state_version = 1

    def __init__(self, pit: Pit8254, *, io_base: int = 0x61) -> None:
        self.io_base = io_base
        self.pit = pit
        self.value = 0
        self._refresh_epoch = pit.tick()  # the refresh toggle counts PIT ticks from here

    def reset(self) -> None:
        """Power-on: every bit 0, so channel 2's gate is low and the speaker off."""
        self.value = 0
        self.pit.set_gate(2, False)

    def save(self) -> dict[str, Any]:
        """Bits 0-3 as written and the refresh toggle's phase (channel 2's gate is saved with the PIT)."""
        return {"value": self.value, "refresh_phase": (self.pit.tick() - self._refresh_epoch) % (2 * _REFRESH_TICKS)}

    def restore(self, state: Mapping[str, Any], version: int) -> None:
        """Take a state :meth:`save` returned."""
        f = StateFields(f"{self.state_kind}@{self.io_base:#x}", state)
        value, phase = f.integer("value", 0, 0x0F), f.integer("refresh_phase", 0, 2 * _REFRESH_TICKS - 1)
        self.value, self._refresh_epoch = value, self.pit.tick() - phase

    @property
    def speaker(self) -> bool:
        """The speaker's input: channel 2's OUT while the speaker data bit is set."""
        return bool(self.value & 2) and self.pit.out(2)

    @on_port(0, 1, max_size=1)
    def port(self, access: PortAccess) -> int | None:
        """The port itself."""
        if access.is_write:
            self.value = access.value & 0x0F
            self.pit.set_gate(2, bool(self.value & 1))
            return None
        refresh = ((self.pit.tick() - self._refresh_epoch) // _REFRESH_TICKS) & 1
        return self.value | refresh << 4 | self.pit.out(2) << 5
