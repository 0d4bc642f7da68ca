"""Pressure stall information (PSI): parsing the files and grading stall into levels.

A PSI file (``/proc/pressure/memory`` or a cgroup v2 ``memory.pressure``) reads::

    some avg10=0.00 avg60=0.00 avg300=0.00 total=0
    full avg10=0.00 avg60=0.00 avg300=0.00 total=0

``total`` is the cumulated stall in microseconds: *some* while at least one task stalled on
memory, *full* while all non-idle tasks did. Its delta over a sampling period is the only
PSI number that is fresh on every read (the averages lag by ~2 s), so severity comes from it.
"""

from __future__ import annotations

from dataclasses import dataclass

from blkback.core.policy import PressureLevel


@dataclass(frozen=True, slots=True)
class PsiLine:
    """One line (``some`` or ``full``) of a PSI file."""

    avg10: float
    avg60: float
    avg300: float
    total_us: int


@dataclass(frozen=True, slots=True)
class PsiSample:
    """Both lines of a PSI file. ``full`` is absent in the CPU file of old kernels."""

    some: PsiLine
    full: PsiLine | None


def parse_psi(text: str) -> PsiSample:
    """Parse the text of a PSI file; ValueError names what is wrong."""
    lines: dict[str, PsiLine] = {}
    for raw in text.splitlines():
        parts = raw.split()
        if not parts:
            continue
        kind = parts[0]
        if kind not in ("some", "full"):
            raise ValueError(f"unexpected PSI line {raw!r}")
        fields: dict[str, str] = {}
        for part in parts[1:]:
            key, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"unexpected PSI field {part!r} in {raw!r}")
            fields[key] = value
        try:
            lines[kind] = PsiLine(
                float(fields["avg10"]),
                float(fields["avg60"]),
                float(fields["avg300"]),
                int(fields["total"]),
            )
        except (KeyError, ValueError) as exc:
            raise ValueError(f"bad PSI line {raw!r}: {exc}") from None
    if "some" not in lines:
        raise ValueError("PSI text has no 'some' line")
    return PsiSample(lines["some"], lines.get("full"))


@dataclass(frozen=True, slots=True)
class PsiThresholds:
    """Stall fractions (stall time / wall time over one sampling period) for each level.

    Defaults, for a 50 ms period: *low* at 2 % ``some`` (1 ms of stall: reclaim has started
    to make tasks wait), *medium* at 10 % ``some`` (5 ms: the first clearly non-noise sample
    in the measurements of pressure-signals.md), *critical* at 10 % ``full`` (every task
    stalled for 5 ms) or 40 % ``some``. They are the same order as GLib's (3.5-5 % over 2 s)
    and lmkd's (7 % ``some`` medium, 70 % ``full`` critical over 1 s), scaled up because a
    short period is noisier.
    """

    low_some: float = 0.02
    medium_some: float = 0.10
    critical_some: float = 0.40
    critical_full: float = 0.10

    def level(self, some_frac: float, full_frac: float) -> PressureLevel | None:
        """The level of one period's stall fractions, or None below *low*."""
        if full_frac >= self.critical_full or some_frac >= self.critical_some:
            return PressureLevel.CRITICAL
        if some_frac >= self.medium_some:
            return PressureLevel.MEDIUM
        if some_frac >= self.low_some:
            return PressureLevel.LOW
        return None


def stall_fractions(before: PsiSample, after: PsiSample, elapsed_ns: int) -> tuple[float, float]:
    """``some`` and ``full`` stall as fractions of ``elapsed_ns`` between two samples."""
    if elapsed_ns <= 0:
        return 0.0, 0.0
    elapsed_us = elapsed_ns / 1000
    some = max(0, after.some.total_us - before.some.total_us) / elapsed_us
    full = 0.0
    if after.full is not None and before.full is not None:
        full = max(0, after.full.total_us - before.full.total_us) / elapsed_us
    return some, full


@dataclass(frozen=True, slots=True)
class TriggerSpec:
    """One PSI trigger: ``<kind> <stall_us> <window_us>`` and the level it reports."""

    level: PressureLevel
    kind: str  # "some" or "full"
    stall_us: int
    window_us: int

    def text(self) -> bytes:
        """The bytes to write: always NUL-terminated, since ``psi_write()`` overwrites the
        last byte of the write with a NUL (without one, "2000000" is parsed as "200000")."""
        return f"{self.kind} {self.stall_us} {self.window_us}".encode() + b"\0"


# With CAP_SYS_RESOURCE any window from 500 ms to 10 s is accepted: lmkd's shapes.
PRIVILEGED_TRIGGERS: tuple[TriggerSpec, ...] = (
    TriggerSpec(PressureLevel.LOW, "some", 50_000, 1_000_000),
    TriggerSpec(PressureLevel.MEDIUM, "some", 100_000, 1_000_000),
    TriggerSpec(PressureLevel.CRITICAL, "full", 100_000, 1_000_000),
)
# Without it the window must be a multiple of 2 s: GLib's GMemoryMonitorPsi shapes.
UNPRIVILEGED_TRIGGERS: tuple[TriggerSpec, ...] = (
    TriggerSpec(PressureLevel.LOW, "some", 70_000, 2_000_000),
    TriggerSpec(PressureLevel.MEDIUM, "some", 100_000, 2_000_000),
    TriggerSpec(PressureLevel.CRITICAL, "full", 100_000, 2_000_000),
)
