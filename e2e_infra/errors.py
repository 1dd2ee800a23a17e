"""The one exception tree of e2e-infra.

Every error the library raises on purpose derives from :class:`E2EInfraError`. Each carries the
data that explains it (a port, a database name, a timeout, a log tail) and a message that ends with
what to do next, so the command-line adapters can print ``str(exc)`` on one line and exit with
``exc.exit_code`` instead of a traceback::

    E2EInfraError                       exit 1
    +-- UsageError                      exit 2: bad input from the command line
    |   +-- InvalidNameError            a project / port / profile / database name is malformed
    +-- ConfigError                     exit 2: a bad key or value, names the key and the file
    +-- DeadlineExceeded                a wait ran out of time; names what it waited for
    +-- FolderError                     a state / results folder cannot be made or written
    +-- RegistryError                   the lease registry could not be read or written
    |   +-- LockTimeoutError            the registry lock was held too long by someone else
    +-- PortError
    |   +-- PortRangeError              the range is malformed or overlaps the ephemeral range
    |   +-- PortsExhaustedError         no free port left; says who holds what
    +-- PostgresError
    |   +-- BinariesNotFoundError       no initdb / pg_ctl; says where it looked
    |   +-- ClusterError                the embedded cluster failed to init / start / stop
    |   +-- ServerUnreachableError      cannot connect; names the masked URL and the fix
    +-- DatabaseError
    |   +-- MigrationError              a migration or seed failed; names the file (and its log)
    |   +-- SeedProfileNotFoundError
    |   +-- DatabaseLimitError          the cap on live databases is reached
    |   +-- DatabaseNotFoundError       exit 2: no live database for that project
    |   +-- CloneError                  the template stayed busy; names the blocking sessions
    +-- ServerError
    |   +-- ServerExitedError           the server process died before it was healthy
    |   +-- ServerStartTimeoutError     the server never became healthy in time
    +-- PrepareError                    a run's prepare step failed; names the step and its log
    +-- SuiteFailedError                the project's test suite failed
    +-- Interrupted                     SIGINT / SIGTERM arrived; everything was released
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "BinariesNotFoundError",
    "CloneError",
    "ClusterError",
    "ConfigError",
    "DatabaseError",
    "DatabaseLimitError",
    "DatabaseNotFoundError",
    "DeadlineExceeded",
    "E2EInfraError",
    "FolderError",
    "Interrupted",
    "InvalidNameError",
    "LockTimeoutError",
    "MigrationError",
    "PortError",
    "PortRangeError",
    "PortsExhaustedError",
    "PostgresError",
    "PrepareError",
    "RegistryError",
    "SeedProfileNotFoundError",
    "ServerError",
    "ServerExitedError",
    "ServerStartTimeoutError",
    "ServerUnreachableError",
    "SuiteFailedError",
    "UsageError",
]


class E2EInfraError(Exception):
    """Root of every error e2e-infra raises on purpose."""

    exit_code = 1

    def one_line(self) -> str:
        """The first line of the message (details such as a log tail follow on later lines)."""
        first = str(self).strip().splitlines()[0] if str(self).strip() else type(self).__name__
        return " ".join(first.split())


class UsageError(E2EInfraError):
    exit_code = 2


class InvalidNameError(UsageError):
    def __init__(self, message: str, *, kind: str, value: object) -> None:
        super().__init__(message)
        self.kind = kind
        self.value = value


class ConfigError(E2EInfraError):
    exit_code = 2

    def __init__(self, message: str, *, key: str | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.path = path


class DeadlineExceeded(E2EInfraError):
    def __init__(self, message: str, *, what: str, timeout: float) -> None:
        super().__init__(message)
        self.what = what
        self.timeout = timeout


class FolderError(E2EInfraError):
    """A folder the tool keeps state or results in cannot be created or written: names it."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class RegistryError(E2EInfraError):
    pass


class LockTimeoutError(RegistryError):
    def __init__(self, message: str, *, lock_path: str, timeout: float) -> None:
        super().__init__(message)
        self.lock_path = lock_path
        self.timeout = timeout


class PortError(E2EInfraError):
    pass


class PortRangeError(PortError):
    exit_code = 2

    def __init__(self, message: str, *, low: int | None = None, high: int | None = None) -> None:
        super().__init__(message)
        self.low = low
        self.high = high


class PortsExhaustedError(PortError):
    def __init__(
        self, message: str, *, low: int, high: int, wanted: int, leased: dict[str, int]
    ) -> None:
        super().__init__(message)
        self.low = low
        self.high = high
        self.wanted = wanted
        self.leased = leased  # project -> number of ports it holds


class PostgresError(E2EInfraError):
    pass


class BinariesNotFoundError(PostgresError):
    def __init__(self, message: str, *, searched: Sequence[str]) -> None:
        super().__init__(message)
        self.searched = list(searched)


class ClusterError(PostgresError):
    def __init__(self, message: str, *, log_tail: str = "") -> None:
        super().__init__(message)
        self.log_tail = log_tail


class ServerUnreachableError(PostgresError):
    def __init__(self, message: str, *, url: str) -> None:
        super().__init__(message)
        self.url = url  # always the masked form


class DatabaseError(E2EInfraError):
    def __init__(self, message: str, *, dbname: str | None = None) -> None:
        super().__init__(message)
        self.dbname = dbname


class MigrationError(DatabaseError):
    def __init__(
        self,
        message: str,
        *,
        file: str,
        dbname: str | None = None,
        log_path: str | None = None,
        log_tail: str = "",
    ) -> None:
        super().__init__(message, dbname=dbname)
        self.file = file
        self.log_path = log_path  # a command's whole output, kept in the run's folder
        self.log_tail = log_tail  # its last lines


class SeedProfileNotFoundError(DatabaseError):
    exit_code = 2

    def __init__(self, message: str, *, profile: str, available: Sequence[str]) -> None:
        super().__init__(message)
        self.profile = profile
        self.available = list(available)


class DatabaseLimitError(DatabaseError):
    def __init__(self, message: str, *, limit: int) -> None:
        super().__init__(message)
        self.limit = limit


class DatabaseNotFoundError(DatabaseError):
    exit_code = 2

    def __init__(self, message: str, *, project: str) -> None:
        super().__init__(message)
        self.project = project


class CloneError(DatabaseError):
    def __init__(
        self, message: str, *, dbname: str, template: str, blockers: Sequence[str] = ()
    ) -> None:
        super().__init__(message, dbname=dbname)
        self.template = template
        self.blockers = list(blockers)


class ServerError(E2EInfraError):
    def __init__(self, message: str, *, server: str, log_tail: str = "") -> None:
        super().__init__(message)
        self.server = server
        self.log_tail = log_tail


class ServerExitedError(ServerError):
    def __init__(
        self, message: str, *, server: str, returncode: int | None, log_tail: str = ""
    ) -> None:
        super().__init__(message, server=server, log_tail=log_tail)
        self.returncode = returncode


class ServerStartTimeoutError(ServerError):
    def __init__(self, message: str, *, server: str, timeout: float, log_tail: str = "") -> None:
        super().__init__(message, server=server, log_tail=log_tail)
        self.timeout = timeout


class PrepareError(E2EInfraError):
    """A run-level prepare step (``[tool.e2e_infra.prepare.<name>]``) failed: no project runs."""

    def __init__(
        self, message: str, *, step: str, log_path: str | None = None, log_tail: str = ""
    ) -> None:
        super().__init__(message)
        self.step = step
        self.log_path = log_path
        self.log_tail = log_tail


class SuiteFailedError(E2EInfraError):
    def __init__(self, message: str, *, project: str, returncode: int) -> None:
        super().__init__(message)
        self.project = project
        self.returncode = returncode


class Interrupted(E2EInfraError):
    exit_code = 130

    def __init__(self, message: str, *, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
