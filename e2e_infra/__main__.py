"""``python -m e2e_infra``: the same tasks as ``invoke`` and the ``e2e-infra`` console script."""

from .cli.program import main

main()
