"""Versioned sqlite schemas: ``PRAGMA user_version`` and ordered forward migrations.

A :class:`Schema` is the list of steps that build a store file: ``steps[i]`` takes the file from
version ``i`` to ``i + 1``, so ``len(steps)`` is the version this code writes. Step 0 is the
original schema (``CREATE TABLE IF NOT EXISTS``), which also covers files written before
versions existed: they have the version-1 tables and ``user_version`` 0, and step 0 leaves their
tables as they are (creating only a table a crash may have left out).

:func:`migrate` runs the missing steps and sets ``user_version`` in one ``BEGIN IMMEDIATE``
transaction, so processes opening the same old file at once migrate it exactly once (the others
wait for the write lock, then find it current). A file newer than the code is refused.

Adding a migration: append a step (never edit a released one), and keep it cheap: it runs at the
first open after an upgrade, by any ``ttenv`` command or pytest session.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pytest_ttenv.errors import TTError

# One step: SQL statements run in order (one statement per string: executescript would commit
# the migration transaction), or a function given the connection inside that transaction.
Step = tuple[str, ...] | Callable[[sqlite3.Connection], None]


@dataclass(frozen=True)
class Schema:
    """The migration steps of one store file; ``steps[i]`` goes from version i to i + 1."""

    steps: Sequence[Step]

    @property
    def version(self) -> int:
        """The version this code writes (and the newest it can read)."""
        return len(self.steps)


def user_version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def migrate(db: sqlite3.Connection, schema: Schema, path: Path) -> int:
    """Bring the file ``db`` has open (at ``path``, named in errors) to ``schema.version``; returns
    the version it had. ``db`` must be in autocommit mode (``isolation_level=None``) with a busy
    timeout. A file written by a newer schema is a TTError and is left untouched."""
    found = user_version(db)  # the common case, already current, takes no write lock
    if found == schema.version:
        return found
    _refuse_newer(found, schema, path)
    db.execute("BEGIN IMMEDIATE")
    try:
        found = user_version(db)  # another process may have migrated it while we waited
        _refuse_newer(found, schema, path)
        for step in schema.steps[found:]:
            _apply(db, step)
        db.execute(f"PRAGMA user_version = {schema.version:d}")
    except BaseException:
        if db.in_transaction:  # sqlite may have rolled back already (disk full, I/O error)
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return found


def _apply(db: sqlite3.Connection, step: Step) -> None:
    if callable(step):
        step(db)
    else:
        for statement in step:
            db.execute(statement)


def _refuse_newer(found: int, schema: Schema, path: Path) -> None:
    if found > schema.version:
        raise TTError(
            f"state dir {path.parent} was written by a newer pytest-ttenv "
            f"({path.name}: schema {found}, this one knows {schema.version})",
            "upgrade pytest-ttenv, or use another --state-dir / TTENV_STATE_DIR",
        )
