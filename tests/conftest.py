"""Settings for every test of e2e-infra's own suite (unit and integration)."""

from __future__ import annotations

from hypothesis import settings

# No per-example deadline for hypothesis: the suite runs on 2-core CI machines beside real
# PostgreSQL servers, browsers and the integration tests' processes, where one example touching
# the filesystem took over the 200 ms default (test_bad_input's registry files). A deadline there
# measures the machine's load, not the code; a hang is still bounded by pytest-timeout's per-test
# timeout (pyproject.toml).
settings.register_profile("e2e-infra", deadline=None)
settings.load_profile("e2e-infra")
