"""The database: engine set-up for SQLite and PostgreSQL, sessions, and schema migrations."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from pydantic_core import PydanticUndefined
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import make_transient_to_detached
from sqlalchemy.orm.exc import StaleDataError
from sqlmodel import Session, SQLModel

from cadence import models  # noqa: F401  (registers the tables on SQLModel.metadata)

#: Milliseconds an SQLite writer waits for another before giving up.
SQLITE_BUSY_TIMEOUT_MS = 30_000

_MIGRATIONS = Path(__file__).parent / "migrations"


def create_engine(url: str) -> sa.Engine:
    """An engine tuned per backend: SQLite gets WAL and takes its write lock up front (BEGIN IMMEDIATE)."""
    if url.startswith("sqlite"):
        database = sa.make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"check_same_thread": False})
        sa.event.listen(engine, "connect", _sqlite_connect)
        sa.event.listen(engine, "begin", _sqlite_begin)
        return engine
    _cache_long_statements()
    return sa.create_engine(url, pool_pre_ping=True)


#: The longest statement, and the most parameters, psycopg keeps converted: a multi-row INSERT of 32 rows
#: (of a table without a key to insert by arrays, see `_insert_by_arrays`) has several hundred parameters
#: and a few dozen kilobytes of SQL.
PSYCOPG_CACHED_STATEMENT_BYTES = 128 * 1024
PSYCOPG_CACHED_STATEMENT_PARAMS = 4096


def _cache_long_statements() -> None:
    """psycopg turns a statement's named parameters into PostgreSQL's numbered ones in Python, and caches
    the result only for statements of at most 4 KB and 50 parameters (its module's limits, which it reads
    at each call). A multi-row INSERT is longer, so each was converted anew: a sixth of a worker's time on
    PostgreSQL when a batch's touches went that way (they go as arrays now, see `_insert_by_arrays`, but a
    table inserted without a key still does). Raised to cover them; the cache stays one of 128 statements."""
    try:
        from psycopg import _queries
    except ImportError:  # another driver
        return
    for name, value in (
        ("MAX_CACHED_STATEMENT_LENGTH", PSYCOPG_CACHED_STATEMENT_BYTES),
        ("MAX_CACHED_STATEMENT_PARAMS", PSYCOPG_CACHED_STATEMENT_PARAMS),
    ):
        if isinstance(getattr(_queries, name, None), int):
            setattr(_queries, name, max(getattr(_queries, name), value))


def insert(dialect_name: str, table: sa.Table) -> Any:
    """INSERT into `table` as the database's dialect builds it, so it takes ON CONFLICT clauses (both
    PostgreSQL and SQLite have them); executed with a row's values as parameters."""
    dialect: Any = postgresql if dialect_name == "postgresql" else sqlite
    return dialect.insert(table)


M = TypeVar("M", bound=SQLModel)


def new_row(model: type[M], **values: Any) -> M:
    """A `model` row for `insert_unless_taken`, made the way rows read from the database are: the fields'
    defaults, then `values`, with none of the constructor's per-field work. That costs some 90 µs a row,
    which a batch of touches, each planning the next and some making a call task, pays many times over."""
    fields, required = _fields(model)
    if missing := required - values.keys():
        raise TypeError(f"{model.__name__}: missing {', '.join(sorted(missing))}")
    row: M = sa.inspect(model).class_manager.new_instance()
    row.__dict__.update({name: factory() if factory else default for name, default, factory in fields})
    row.__dict__.update(values)
    return row


@cache
def _fields(model: type[SQLModel]) -> tuple[list[tuple[str, Any, Any]], set[str]]:
    """Each field with a default: (name, default, default factory); and the names of those without one.
    (Made once per model; the first time also readies the ORM's mappings, which a constructor would.)"""
    sa.orm.configure_mappers()
    fields: list[tuple[str, Any, Any]] = []
    required: set[str] = set()
    for name, info in model.model_fields.items():
        if info.default_factory is not None:
            fields.append((name, None, info.default_factory))
        elif info.default is not PydanticUndefined:
            fields.append((name, info.default, None))
        else:
            required.add(name)
    return fields, required


def insert_unless_taken(s: Session, row: SQLModel) -> bool:
    """Insert `row` by one statement and attach it to the session, as if read; False if a unique key of
    it is taken already (nothing is written then). One round trip, and no savepoint, where looking first
    and inserting after would take two."""
    return bool(insert_all_unless_taken(s, [row], key=()))


def insert_all_unless_taken(
    s: Session, rows: Sequence[M], key: tuple[str, ...], *, attach: bool = True
) -> list[M]:
    """`insert_unless_taken` for many rows of one table, in one statement; the rows inserted, given their
    ids, and attached to the session as if read unless `attach` is False. A row whose unique `key` is taken,
    by a row in the table or one before it in `rows`, is left out (and nothing of it written). With no
    `key`, `rows` is one row, and any unique key of it counts.

    Attaching a row costs about as much as inserting it. A caller that will not change the rows it inserts
    leaves them out of the session: a later query in the transaction reads them as it reads any row."""
    unique: dict[tuple[Any, ...], M] = {}
    for row in rows:
        unique.setdefault(tuple(getattr(row, name) for name in key), row)
    if not unique:
        return []
    table: sa.Table = rows[0].__table__  # type: ignore[attr-defined]
    names = [column.name for column in table.columns if column.name != "id"]
    values = [_values(row, names) for row in unique.values()]
    connection = s.connection()
    by_arrays = _insert_by_arrays(connection.dialect, table, key) if _arrays_read(connection) else None
    if by_arrays is not None:
        sql, processors = by_arrays
        returned: Any = connection.exec_driver_sql(
            sql, _arrays([[row[name] for row in values] for name in names], processors)
        )
    else:
        returned = connection.execute(_insert_returning_key(connection.dialect.name, table, key), values)
    inserted = []
    for new_id, *found in returned:
        row = unique[tuple(found)]
        if attach:
            row.id = new_id
            make_transient_to_detached(row)
            s.add(row)
        else:
            row.__dict__["id"] = new_id  # as `new_row` fills a row: its state, not a change to flush
        inserted.append(row)
    return inserted


def update_all(s: Session, rows: Sequence[SQLModel], also: tuple[str, ...] = ()) -> None:
    """Write what changed in `rows` (of one table, each in `s`), and the columns `also`, which may have been
    noted as written without being written (`set_committed_value`): one UPDATE by id for each set of
    columns changed, with all its rows' values (on PostgreSQL as one array a column, see
    `_update_by_arrays`). The rows then leave the session, their changes written; the session's other
    changes are left to its flush.

    The session's own flush does the same, but readies every row's whole history and every column for it:
    for a batch of touches, about as much as the rest of the commit."""
    rows = list({id(row): row for row in rows}.values())  # each once
    if not rows:
        return
    table: sa.Table = rows[0].__table__  # type: ignore[attr-defined]
    changes: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
    for row in rows:
        names = tuple(sorted({*also, *sa.inspect(row).committed_state}))
        held = row.__dict__
        changes.setdefault(names, []).append((held["id"], *(held[name] for name in names)))
    connection = s.connection()
    for names, values in changes.items():
        if not names:
            continue
        updated = _update_rows(connection, table, names, values)
        if updated is not None and updated != len(values):
            # As the session's flush would: a row deleted meanwhile is not quietly left unwritten.
            raise StaleDataError(f"{table.name}: UPDATE of {len(values)} rows matched {updated}")
    for row in rows:
        s.expunge(row)


def _update_rows(
    connection: sa.Connection, table: sa.Table, names: tuple[str, ...], values: list[tuple[Any, ...]]
) -> int | None:
    """Write the columns `names` of rows given as (id, *values): the rows matched, or None where the driver
    cannot tell for a statement run with many rows' values."""
    by_arrays = _update_by_arrays(connection.dialect, table, names) if _arrays_read(connection) else None
    if by_arrays is not None:
        sql, processors = by_arrays
        return connection.exec_driver_sql(sql, _arrays(list(zip(*values, strict=True)), processors)).rowcount
    parameters = [
        {"row_id": row[0], **{f"new_{name}": value for name, value in zip(names, row[1:], strict=True)}}
        for row in values
    ]
    updated = connection.execute(_update_by_id(table, names), parameters).rowcount
    return updated if len(parameters) == 1 or connection.dialect.supports_sane_multi_rowcount else None


@cache
def _update_by_id(table: sa.Table, names: tuple[str, ...]) -> sa.Update:
    """UPDATE of the columns `names` by id, the values as parameters "new_<name>"; made once per set."""
    return (
        sa.update(table)
        .where(table.c.id == sa.bindparam("row_id"))
        .values({name: sa.bindparam(f"new_{name}", type_=table.c[name].type) for name in names})
    )


@cache
def _update_by_arrays(
    dialect: sa.Dialect, table: sa.Table, names: tuple[str, ...]
) -> tuple[str, list[tuple[int, Any]]] | None:
    """On PostgreSQL, `_update_by_id` for many rows as one statement: the ids and each column's values as
    one array each, which `unnest` makes rows of to join by id. One statement instead of one a row, and a
    parameter a column instead of one a value. The SQL, and each array's conversion (see `_insert_by_arrays`);
    None where `_by_arrays` says."""
    columns = [table.c.id, *(table.c[name] for name in names)]
    if not _by_arrays(dialect, columns):
        return None
    quote = dialect.identifier_preparer.quote
    given = ", ".join(quote(column.name) for column in columns)
    sets = ", ".join(f"{quote(name)} = given.{quote(name)}" for name in names)
    sql = (
        f"UPDATE {quote(table.name)} SET {sets} FROM {_unnest(columns, dialect)} AS given({given}) "
        f"WHERE {quote(table.name)}.{quote('id')} = given.{quote('id')}"
    )
    return sql, _array_processors(columns, dialect)


def select_rows(
    s: Session, statement: sa.Executable, params: dict[str, Any]
) -> sa.CursorResult[*tuple[Any, ...]]:
    """The rows of a query of columns, not of whole ORM rows, run in `s`'s transaction as SQLAlchemy's Core
    runs it: a third cheaper than the session's `exec`, which readies ORM loading the query has no use for.
    The session's changes are flushed first, as its own `exec` does, so the query sees them."""
    s.flush()
    return s.connection().execute(statement, params)


def _values(row: SQLModel, names: list[str]) -> dict[str, Any]:
    """The row's values of the columns `names`, read from its state where it has them (a row from `new_row`
    has them all) rather than through the ORM's attribute access."""
    state = row.__dict__
    return {name: state[name] if name in state else getattr(row, name) for name in names}


@cache
def _insert_by_arrays(
    dialect: sa.Dialect, table: sa.Table, key: tuple[str, ...]
) -> tuple[str, list[tuple[int, Any]]] | None:
    """On PostgreSQL, the multi-row INSERT of `_insert_returning_key` as one row of arrays a column, which
    `unnest` turns into rows: a dozen parameters, not a dozen a row, each an array in its text form (see
    `_arrays`). The SQL, and each column's conversion by its type (its position among the columns but the
    id, and the function). None where `_by_arrays` says, and for a key whose returned values might need
    converting back to compare: only a key of types that say they hold integers or strings takes this way
    (the touches' and the call tasks' do; SQLModel's own string type says nothing, so a key of it takes the
    usual way)."""
    columns = [column for column in table.columns if column.name != "id"]
    if not key or not _by_arrays(dialect, columns):
        return None
    if not all(table.c[name].type.python_type in (int, str) for name in key):
        return None
    quote = dialect.identifier_preparer.quote
    sql = (
        f"INSERT INTO {quote(table.name)} ({', '.join(quote(column.name) for column in columns)}) "
        f"SELECT * FROM {_unnest(columns, dialect)} ON CONFLICT DO NOTHING "
        f"RETURNING {quote('id')}, {', '.join(quote(name) for name in key)}"
    )
    return sql, _array_processors(columns, dialect)


def _by_arrays(dialect: sa.Dialect, columns: Sequence[sa.Column[Any]]) -> bool:
    """Whether statements of arrays may write these columns: on PostgreSQL, with no binary column, whose
    values `_array_literal` does not write."""
    return dialect.name == "postgresql" and not any(isinstance(c.type, sa.LargeBinary) for c in columns)


#: Where a connection keeps whether its database reads arrays' nulls (see `_arrays_read`).
_ARRAY_NULLS = "cadence.array_nulls"


def _arrays_read(connection: sa.Connection) -> bool:
    """Whether the database reads arrays as `_array_literal` writes them: PostgreSQL, unless `array_nulls`
    is off (for the server, the database or the role), which reads an unquoted NULL as the text "NULL" and
    so would write a null as that text, or refuse it in a column of another type. Asked once a connection;
    without it, a batch's statements take the usual way, a value a parameter."""
    if connection.dialect.name != "postgresql":
        return False
    known: bool | None = connection.info.get(_ARRAY_NULLS)
    if known is None:
        known = connection.exec_driver_sql("SHOW array_nulls").scalar() == "on"
        connection.info[_ARRAY_NULLS] = known
    return known


def _unnest(columns: Sequence[sa.Column[Any]], dialect: sa.Dialect) -> str:
    """The rows of a statement of arrays: `unnest` of one parameter a column, cast to its array type."""
    return f"unnest({', '.join(f'%s::{_array_type(column.type, dialect)}[]' for column in columns)})"


def _array_processors(columns: Sequence[sa.Column[Any]], dialect: sa.Dialect) -> list[tuple[int, Any]]:
    """Each column's conversion into its array, by its position among `columns`: those that need one."""
    processors = [(index, _to_array_value(column.type, dialect)) for index, column in enumerate(columns)]
    return [(index, process) for index, process in processors if process is not None]


def _arrays(columns: Sequence[Sequence[Any]], processors: list[tuple[int, Any]]) -> tuple[str, ...]:
    """The parameters of a statement of arrays: each column's values, converted as `processors` say, as an
    array in PostgreSQL's text form (which the statement casts to the column's array type)."""
    arrays = [list(values) for values in columns]
    for index, process in processors:
        arrays[index] = [process(value) for value in arrays[index]]
    return tuple(_array_literal(values) for values in arrays)


def _array_literal(values: Sequence[Any]) -> str:
    """An array of `values` in PostgreSQL's text form: each value's text quoted, None as NULL; the element
    type's own input reads each, as it reads a parameter. psycopg makes the same of a list, but a value at a
    time through its adapters: four to fifteen times the cost (integers, times, texts)."""
    return "{" + ",".join("NULL" if value is None else _array_element(value) for value in values) + "}"


def _array_element(value: Any) -> str:
    # A str subclass (an enum's member) by its characters, not by its __str__; numbers and times by theirs.
    text = str.__str__(value) if isinstance(value, str) else str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _array_type(kind: sa.types.TypeEngine[Any], dialect: sa.Dialect) -> str:
    """The type of a column's array: its own, but text for text of a bounded length (VARCHAR, CHAR), which
    an explicit cast would cut short where the INSERT into the column refuses a value too long, as it does
    for any INSERT."""
    name = kind.compile(dialect=dialect)
    return "TEXT" if name.startswith(("VARCHAR", "CHAR", "NCHAR", "NVARCHAR")) else name


def _to_array_value(kind: sa.types.TypeEngine[Any], dialect: sa.Dialect) -> Any:
    """What a value of a column of type `kind` is before its text goes into its array: as its type binds
    it, but JSON as its text (None as JSON's null, as SQLAlchemy writes it)."""
    if isinstance(kind, sa.JSON):
        return json.dumps
    return kind.bind_processor(dialect)


@cache
def _insert_returning_key(dialect_name: str, table: sa.Table, key: tuple[str, ...]) -> sa.Insert:
    """INSERT ... ON CONFLICT DO NOTHING, RETURNING the id and the key: made once per table and key, the
    values come as parameters; run with many rows' values, SQLAlchemy sends them as one multi-row INSERT."""
    returned = [table.c.id, *(table.c[name] for name in key)]
    statement: sa.Insert = insert(dialect_name, table).on_conflict_do_nothing().returning(*returned)
    return statement


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite's own handling defers it).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(connection: sa.Connection) -> None:
    # IMMEDIATE takes the write lock up front: a read that later writes cannot fail with "database is locked".
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def migrate(engine: sa.Engine) -> None:
    """Bring the schema to the newest migration; safe to run at every start."""
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


@contextmanager
def session(engine: sa.Engine) -> Iterator[Session]:
    """One transaction: committed when the block ends, rolled back when it raises."""
    with Session(engine, expire_on_commit=False) as s:
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise
