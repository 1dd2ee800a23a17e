"""Bench-only: each Python process records its own CPU at exit (``E2E_BENCH_CPU_DIR`` set).

``bench/e2e.py`` puts this folder first on ``PYTHONPATH`` so that every Python process of a run
(nox, its workers, the suites, the demo servers) appends one line ``role user+system`` to a file
of its own. The tool's CPU is then the run's total CPU minus what the suites and servers used
themselves. Kept tiny: it loads in every process of the run.
"""

import os
import sys

_DIR = os.environ.get("E2E_BENCH_CPU_DIR")
if _DIR:
    import atexit
    import resource

    def _record() -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        argv = " ".join(sys.argv)
        # The tool: nox (main or worker), invoke, a guardian. Other: a suite, a server.
        first = argv.split(" ")[0]
        role = "tool" if "nox" in first or "invoke" in first or "e2e_infra" in argv else "other"
        path = os.path.join(_DIR, f"{os.getpid()}.cpu")
        with open(path, "a") as out:
            out.write(f"{role} {usage.ru_utime + usage.ru_stime!r} {argv[:4000]}\n")

    atexit.register(_record)
