"""Fakes for the edges, used by the unit tests (and usable by users' own tests)."""

from __future__ import annotations

__all__ = ["FakeClock", "FakeHealthCheck", "FakePortProbe"]


class FakeClock:
    """A clock whose sleep advances time instantly; records every sleep."""

    def __init__(self, start: float = 1000.0, wall: float = 1_800_000_000.0) -> None:
        self.now = start
        self.wall = wall
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.wall + self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += max(0.0, seconds)

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeHealthCheck:
    """A health check (``e2e_infra.health.HealthCheck``) that answers from a script.

    ``results`` are returned in order, the last one repeated forever (default: never healthy).
    Each probe is recorded with the clock's time, when a clock is given; ``advance`` seconds of
    that clock pass per probe, like a real probe's round trip.
    """

    def __init__(
        self,
        results: list[bool] | None = None,
        *,
        clock: FakeClock | None = None,
        advance: float = 0.0,
        description: str = "fake probe",
    ) -> None:
        self.results = list(results or [False])
        self.clock = clock
        self.advance = advance
        self.description = description
        self.probes: list[float] = []
        self.last_error = ""

    def probe(self) -> bool:
        self.probes.append(self.clock.now if self.clock else float(len(self.probes)))
        if self.clock is not None:
            self.clock.advance(self.advance)
        index = min(len(self.probes) - 1, len(self.results) - 1)
        healthy = self.results[index]
        self.last_error = "" if healthy else "not ready"
        return healthy


class FakePortProbe:
    """A port probe for ``PortAllocator(probe=...)``: ports in ``busy`` are taken; records calls."""

    def __init__(self, busy: set[int] | None = None) -> None:
        self.busy = set(busy or ())
        self.probed: list[int] = []

    def __call__(self, port: int) -> bool:
        self.probed.append(port)
        return port not in self.busy
