"""The whole task tree: ``ports``, ``pg``, ``db``, ``e2e``, ``hooks``, and ``init`` at the top."""

from __future__ import annotations

from invoke.collection import Collection

from .db import db
from .e2e import e2e, e2e_init
from .hooks import hooks
from .pg import pg
from .ports import ports

__all__ = ["namespace"]

namespace = Collection(ports, pg, db, e2e, hooks)
namespace.add_task(e2e_init, name="init")
