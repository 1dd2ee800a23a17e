"""invoke tasks of e2e-infra (`invoke --list`). Yours go next to them, e.g.:
ns = Collection(*namespace.collections.values(), *namespace.tasks.values(), my_task)
"""

from e2e_infra.cli import namespace  # noqa: F401  (invoke picks up `namespace`)
