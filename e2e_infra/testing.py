"""Fakes for the edges, used by the unit tests (and usable by users' own tests)."""

from __future__ import annotations

__all__ = ["FakeClock"]


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
