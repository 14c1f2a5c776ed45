"""The MC146818 real-time clock and its 128 bytes of CMOS RAM, at 0x70 (index) and 0x71 (data).

Constructor::

    Rtc146818(*, io_base=0x70, irq: IrqLine | None = None, clock: Callable[[], float] = time.monotonic,
              start: datetime | None = None, century_index: int | None = 0x32)

Writing port 0x70 selects a register with bits 0-6; bit 7 is the PC's NMI
mask (:attr:`Rtc146818.nmi_masked`). The index port cannot be read (reads
are unclaimed and answer 0xFF). Port 0x71 reads and writes the selected
register. Both ports are 8 bits wide; wider accesses arrive as bytes, so
``out 0x70, ax`` selects with AL and writes AH.

The clock keeps civil time without a zone, starting from ``start`` (by
default the host's UTC time, like QEMU's ``-rtc base=utc``) and advancing
by ``clock`` (seconds, monotonic); the host can move it with
:meth:`~Rtc146818.set_time`. Register B selects binary or BCD and 12- or
24-hour presentation; register A's divider bits start and stop the chain
(leaving divider reset, the first update comes half a second later), its
rate bits the periodic interrupt; UIP is set for the 244 us before and the
1984 us of each update. Registers C and D hold the interrupt flags and VRT.
``century_index`` names the CMOS byte that holds the century (0x32 on PCs,
as ACPI's FADT says), or None.

The chip has no thread: flags are computed when looked at. A machine loop
calls :meth:`~Rtc146818.update` to move IRQ 8 (``irq``, level: high while
register C's IRQF is set) and sleeps until :meth:`~Rtc146818.next_due`.
Not modelled: daylight saving (DSE), the square-wave pin, and time bases
other than 32.768 kHz (divider values 0 and 1 count like 2, as in QEMU).

Device state (kind ``mc146818``, version 1): the CMOS RAM (registers A and
B and the alarms included), the index and NMI mask, register C's flags, the
clock's time in seconds at the moment of the save and where the divider
chain stood within its second. On restore the clock goes on from that time
and phase: no guest time passes while the state is saved.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from dispatcher import IrqLine, PortAccess, StateFields, on_port

__all__ = ["Rtc146818", "civil_from_seconds", "seconds_from_civil"]

SECONDS, SECONDS_ALARM, MINUTES, MINUTES_ALARM, HOURS, HOURS_ALARM = 0x00, 0x01, 0x02, 0x03, 0x04, 0x05
DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR, REG_A, REG_B, REG_C, REG_D = 0x06, 0x07, 0x08, 0x09, 0x0A, 0x0B, 0x0C, 0x0D
# Register A
UIP = 0x80
# Register B
SET, PIE, AIE, UIE, SQWE, DM, HOUR24, DSE = 0x80, 0x40, 0x20, 0x10, 0x08, 0x04, 0x02, 0x01
# Register C
IRQF, PF, AF, UF = 0x80, 0x40, 0x20, 0x10
# Register D
VRT = 0x80

UIP_BEFORE = 244e-6  # UIP rises this long before an update cycle ...
UPDATE_CYCLE = 1984e-6  # ... which takes this long; the new time shows at its end
DAY = 86400
# A clock reading within this of a divider boundary counts as reaching it, so that a loop woken at
# next_due() is never early by a floating-point rounding error.
_EPS = 1e-9


def seconds_from_civil(year: int, month: int, day: int, hour: int, minute: int, second: int) -> int:
    """Seconds since 1970-01-01 00:00:00 of a proleptic Gregorian time; out-of-range fields carry over."""
    year += (month - 1) // 12
    month = (month - 1) % 12 + 1
    y = year - (month <= 2)
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5
    days = era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468 + day - 1
    return days * DAY + hour * 3600 + minute * 60 + second


def civil_from_seconds(seconds: int) -> tuple[int, int, int, int, int, int]:
    """(year, month, day, hour, minute, second) of seconds since 1970-01-01 00:00:00."""
    days, rest = divmod(seconds, DAY)
    z = days + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (month <= 2), month, day, rest // 3600, rest // 60 % 60, rest % 60


class Rtc146818:
    """The clock, its registers A-D, the CMOS RAM and the two ports."""

    state_kind = "mc146818"
    state_version = 1
    oldest_state_version = 1

    def __init__(
        self,
        *,
        io_base: int = 0x70,
        irq: IrqLine | None = None,
        clock: Callable[[], float] = time.monotonic,
        start: datetime | None = None,
        century_index: int | None = 0x32,
    ) -> None:
        if century_index is not None and not 0x0E <= century_index <= 0x7F:
            raise ValueError(f"century_index must name a RAM byte 0x0e-0x7f, not {century_index:#x}")
        self.io_base = io_base
        self.irq = irq if irq is not None else IrqLine(name="RTC")
        self.clock = clock
        self.century_index = century_index
        self.cmos = bytearray(128)  # RAM at 0x0E-0x7F; the alarms at 1, 3, 5; A and B at 0x0A, 0x0B
        self.index = 0
        self.nmi_masked = False
        self.flags = 0  # register C
        self.dow_offset = 0  # the guest may set a day of week the date does not imply
        now = clock()
        self._phase = now  # a second boundary of the divider chain
        self._last = now  # events up to here are in self.flags
        self._base = now  # the time was self._seconds at this moment
        when = start if start is not None else datetime.now(UTC)
        self._seconds = seconds_from_civil(when.year, when.month, when.day, when.hour, when.minute, when.second)
        self.cmos[REG_A] = 0x26  # 32.768 kHz time base, 1024 Hz periodic rate
        self.cmos[REG_B] = HOUR24  # BCD, 24-hour: what PC firmware sets up

    def reset(self) -> None:
        """The RESET pin at power-up: PIE, AIE, UIE and SQWE and register C's flags clear, IRQ 8 low.

        The time, the calendar, registers A and D and the RAM are battery-backed and keep their values.
        """
        self.update()
        self.cmos[REG_B] &= ~(PIE | AIE | UIE | SQWE)
        self.flags = 0
        self._drive()

    def save(self) -> dict[str, Any]:
        """The RAM, registers, time and divider phase, relative to now (see the module's docstring)."""
        now = self.clock()
        return {
            "cmos": self.cmos.hex(),
            "index": self.index,
            "nmi_masked": self.nmi_masked,
            "flags": self.flags,
            "dow_offset": self.dow_offset,
            "seconds": self._time(now),
            # How far into its second the divider chain is; a second boundary is where an update ends.
            "phase": now - self._phase - math.floor(now - self._phase + _EPS),
            "unflagged": now - self._last,  # how long ago events were last folded into the flags
        }

    def restore(self, state: Mapping[str, Any], version: int) -> None:
        """Take a state :meth:`save` returned, re-based to now; check every field first."""
        f = StateFields(f"{self.state_kind}@{self.io_base:#x}", state)
        cmos = f.data("cmos", length=128)
        index, nmi_masked = f.integer("index", 0, 0x7F), f.boolean("nmi_masked")
        flags = f.integer("flags", 0, IRQF | PF | AF | UF)
        if flags & 0x0F:
            raise f.error("flags", f"is {flags:#x}: register C has no bits 0-3")
        dow_offset = f.integer("dow_offset", 0, 6)
        seconds = f.integer("seconds", -(1 << 62), 1 << 62)  # the registers can set years past 9999
        phase = f.number("phase", -_EPS, 1.0)
        unflagged = f.number("unflagged", 0.0)
        now = self.clock()
        self.cmos[:] = cmos
        self.index, self.nmi_masked, self.flags, self.dow_offset = index, nmi_masked, flags, dow_offset
        self._seconds, self._base = seconds, now
        self._phase = now - phase
        self._last = now - unflagged
        self._drive()

    # -- time keeping -----------------------------------------------------------------------------

    def _divider_running(self) -> bool:
        return (self.cmos[REG_A] >> 4) & 7 <= 2

    def _counting(self) -> bool:
        return self._divider_running() and not self.cmos[REG_B] & SET

    def _boundaries(self, since: float, until: float) -> int:
        """Divider second boundaries in (since, until]."""
        return math.floor(until - self._phase + _EPS) - math.floor(since - self._phase + _EPS)

    def _time(self, now: float) -> int:
        if not self._counting():
            return self._seconds
        return self._seconds + self._boundaries(self._base, now)

    def _rebase(self, now: float) -> None:
        """Fold elapsed time into ``_seconds`` before the counting conditions change."""
        self._seconds = self._time(now)
        self._base = now

    def _periodic(self) -> float | None:
        rate = self.cmos[REG_A] & 0x0F
        if not rate or not self._divider_running():
            return None
        return (1 << (rate - 1 if rate >= 3 else rate + 6)) / 32768

    def set_time(self, when: datetime) -> None:
        """Set the clock to ``when``'s civil fields (its zone is ignored); the divider phase is kept."""
        now = self.clock()
        self.update(now)
        self._seconds = seconds_from_civil(when.year, when.month, when.day, when.hour, when.minute, when.second)
        self._base = now
        self.dow_offset = 0

    def current_time(self) -> datetime:
        """The clock's time now, as a naive datetime (years 1-9999)."""
        return datetime(*civil_from_seconds(self._time(self.clock())))

    # -- interrupts -------------------------------------------------------------------------------

    def update(self, now: float | None = None) -> None:
        """Set the flags of every event up to ``now`` and drive IRQ 8."""
        now = self.clock() if now is None else now
        last, self._last = self._last, now
        if now > last:
            period = self._periodic()
            if period is not None and self._periods(now, period) > self._periods(last, period):
                self.flags |= PF
            if self._counting():
                updates = self._boundaries(last, now)
                if updates:
                    self.flags |= UF
                    first = self._time(last)
                    if self._next_alarm(first) <= first + updates:
                        self.flags |= AF
        self._drive()

    poll = update

    def _periods(self, now: float, period: float) -> int:
        return math.floor((now - self._phase + _EPS) / period)

    def _drive(self) -> None:
        # IRQF = PF.PIE + AF.AIE + UF.UIE: each enable bit sits where its flag does.
        pending = self.flags & self.cmos[REG_B] & (PF | AF | UF)
        self.flags = self.flags & (PF | AF | UF) | (IRQF if pending else 0)
        self.irq.set(bool(pending))

    def next_due(self) -> float | None:
        """The ``clock`` time at which IRQ 8 will next rise, if nothing changes, or None."""
        self.update()
        if self.flags & IRQF:
            return None  # the line stays high until register C is read
        now, b = self._last, self.cmos[REG_B]
        due: list[float] = []
        period = self._periodic()
        if b & PIE and period is not None:
            due.append(self._phase + (self._periods(now, period) + 1) * period)
        if self._counting():
            next_update = self._phase + math.floor(now - self._phase + _EPS) + 1
            if b & UIE:
                due.append(next_update)
            current = self._time(now)
            alarm = self._next_alarm(current)
            if b & AIE and alarm < math.inf:
                due.append(next_update + (alarm - current - 1))
        return min(due, default=None)

    def _alarm_values(self, index: int, limit: int, encode: Callable[[int], int]) -> list[int]:
        raw = self.cmos[index]
        if raw & 0xC0 == 0xC0:
            return list(range(limit))  # "don't care"
        return [v for v in range(limit) if encode(v) == raw]

    def _next_alarm(self, seconds: int) -> float:
        """The first time after ``seconds`` whose hours, minutes and seconds match the alarm, or inf."""
        hours = self._alarm_values(HOURS_ALARM, 24, self._encode_hour)
        minutes = self._alarm_values(MINUTES_ALARM, 60, self._encode)
        secs = self._alarm_values(SECONDS_ALARM, 60, self._encode)
        if not (hours and minutes and secs):
            return math.inf
        midnight, now = divmod(seconds, DAY)
        for day in (0, 1):
            for h in hours:
                if not day and h < now // 3600:
                    continue
                for m in minutes:
                    if not day and h * 60 + m < now // 60:
                        continue
                    for s in secs:
                        candidate = h * 3600 + m * 60 + s
                        if day or candidate > now:
                            return (midnight + day) * DAY + candidate
        return math.inf  # unreachable: tomorrow always matches

    # -- register encoding ------------------------------------------------------------------------

    def _encode(self, value: int) -> int:
        if self.cmos[REG_B] & DM:
            return value & 0xFF
        return (value // 10 % 10) << 4 | value % 10

    def _decode(self, value: int) -> int:
        return value if self.cmos[REG_B] & DM else (value >> 4) * 10 + (value & 0x0F)

    def _encode_hour(self, hour: int) -> int:
        if self.cmos[REG_B] & HOUR24:
            return self._encode(hour)
        return self._encode(hour % 12 or 12) | (0x80 if hour >= 12 else 0)

    def _decode_hour(self, value: int) -> int:
        if self.cmos[REG_B] & HOUR24:
            return self._decode(value)
        return self._decode(value & 0x7F) % 12 + (12 if value & 0x80 else 0)

    def _read_time(self, index: int, now: float) -> int:
        seconds = self._time(now)
        year, month, day, hour, minute, second = civil_from_seconds(seconds)
        if index == SECONDS:
            return self._encode(second)
        if index == MINUTES:
            return self._encode(minute)
        if index == HOURS:
            return self._encode_hour(hour)
        if index == DAY_OF_WEEK:
            return self._encode((seconds // DAY + 4 + self.dow_offset) % 7 + 1)  # 1970-01-01 was a Thursday
        if index == DAY_OF_MONTH:
            return self._encode(day)
        if index == MONTH:
            return self._encode(month)
        if index == YEAR:
            return self._encode(year % 100)
        return self._encode(year // 100)  # the century byte

    def _write_time(self, index: int, value: int, now: float) -> None:
        self._rebase(now)
        year, month, day, hour, minute, second = civil_from_seconds(self._seconds)
        # The day of week is a counter of its own: writing the date leaves it alone.
        dow = self._decode(value) - 1 if index == DAY_OF_WEEK else (self._seconds // DAY + 4 + self.dow_offset) % 7
        if index == SECONDS:
            second = self._decode(value)
        elif index == MINUTES:
            minute = self._decode(value)
        elif index == HOURS:
            hour = self._decode_hour(value)
        elif index == DAY_OF_MONTH:
            day = self._decode(value)
        elif index == MONTH:
            month = self._decode(value)
        elif index == YEAR:
            year = year // 100 * 100 + self._decode(value)
        elif index != DAY_OF_WEEK:
            year = self._decode(value) * 100 + year % 100
        self._seconds = seconds_from_civil(year, month, day, hour, minute, second)
        self.dow_offset = (dow - (self._seconds // DAY + 4)) % 7

    # -- the ports --------------------------------------------------------------------------------

    @on_port(0, 1, access="w", max_size=1)
    def index_port(self, access: PortAccess) -> None:
        """Select a register (bits 0-6) and mask NMI (bit 7)."""
        self.index = access.value & 0x7F
        self.nmi_masked = bool(access.value & 0x80)

    @on_port(1, 1, max_size=1)
    def data_port(self, access: PortAccess) -> int | None:
        """The selected register."""
        now = self.clock()
        self.update(now)
        if access.is_write:
            self._write(self.index, access.value & 0xFF, now)
            self._drive()
            return None
        return self._read(self.index, now)

    def _is_time(self, index: int) -> bool:
        return index in (SECONDS, MINUTES, HOURS, DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR) or (
            index == self.century_index
        )

    def _read(self, index: int, now: float) -> int:
        if self._is_time(index):
            return self._read_time(index, now)
        if index == REG_A:
            uip = self._counting() and (now - self._phase) % 1.0 >= 1.0 - UIP_BEFORE - UPDATE_CYCLE
            return self.cmos[REG_A] | (UIP if uip else 0)
        if index == REG_C:
            flags, self.flags = self.flags, 0
            self._drive()
            return flags
        if index == REG_D:
            return VRT  # the battery is good
        return self.cmos[index]

    def _write(self, index: int, value: int, now: float) -> None:
        if self._is_time(index):
            self._write_time(index, value, now)
        elif index == REG_A:
            was_running = self._divider_running()
            self._rebase(now)
            self.cmos[REG_A] = value & 0x7F
            if self._divider_running() and not was_running:
                self._phase = now - 0.5  # the first update comes half a second after divider reset ends
        elif index == REG_B:
            self._rebase(now)
            if value & SET:
                value &= ~UIE  # SET going high clears UIE
            self.cmos[REG_B] = value
        elif index not in (REG_C, REG_D):
            self.cmos[index] = value

    # -- CMOS RAM layout --------------------------------------------------------------------------

    def set_memory_size(self, below_4g: int, above_4g: int = 0) -> None:
        """Fill the memory-size bytes the BIOS reads, as QEMU does, and the checksum.

        0x15/0x16: base memory in KiB (at most 640); 0x17/0x18 and 0x30/0x31:
        KiB above 1 MiB (at most 65535); 0x34/0x35: 64 KiB units above 16 MiB
        below 4 GiB (SeaBIOS sizes RAM from these); 0x5B-0x5D: 64 KiB units
        above 4 GiB.
        """
        if below_4g < 0 or above_4g < 0 or below_4g > 1 << 32:
            raise ValueError(f"memory sizes out of range: below_4g={below_4g:#x}, above_4g={above_4g:#x}")
        kib = 1024
        base = min(below_4g // kib, 640)
        extended = min(max(below_4g - 1024 * kib, 0) // kib, 0xFFFF)
        over_16m = min(max(below_4g - 16 * 1024 * kib, 0) // (64 * kib), 0xFFFF)
        over_4g = above_4g // (64 * kib)
        if over_4g > 0xFFFFFF:
            raise ValueError(f"above_4g={above_4g:#x} does not fit 0x5b-0x5d")
        for index, value, size in (
            (0x15, base, 2),
            (0x17, extended, 2),
            (0x30, extended, 2),
            (0x34, over_16m, 2),
            (0x5B, over_4g, 3),
        ):
            self.cmos[index : index + size] = value.to_bytes(size, "little")
        self.update_checksum()

    def update_checksum(self) -> None:
        """Store the sum of bytes 0x10-0x2D at 0x2E (high byte) and 0x2F (low byte)."""
        total = sum(self.cmos[0x10:0x2E])
        self.cmos[0x2E], self.cmos[0x2F] = total >> 8 & 0xFF, total & 0xFF
