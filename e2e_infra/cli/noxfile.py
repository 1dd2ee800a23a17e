"""The nox sessions of a repository without a noxfile of its own (``e2e-infra e2e.all``).

``E2E_CONFIG`` names the config: nox runs from this file's folder, inside the installed package.
"""

from e2e_infra.cli import register_sessions

register_sessions()
