"""Rows made without the models' constructor (`store.new_row`): the same row, written, read and changed
like any other."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from harness import array_ids
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.exc import StaleDataError
from sqlmodel import SQLModel, select

from cadence import store
from cadence.models import TOUCH_KEY, CadenceVersion, CallTask, Contact, Enrollment, Touch, TouchStatus

NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
TOUCH = {
    "enrollment_id": 1,
    "step_index": 2,
    "channel": "email",
    "template": "email/x",
    "reason": "a reason",
    "due_at": NOW,
}
TASK = {
    "touch_id": 1,
    "due_date": date(2026, 11, 23),
    "due_at": NOW,
    "contact_id": 1,
    "reason": "a reason",
    "script": "# Call",
    "created_at": NOW,
}


def _columns(row: SQLModel) -> dict[str, Any]:
    return {column.name: getattr(row, column.name) for column in row.__table__.columns}  # type: ignore[attr-defined]


@pytest.mark.parametrize(("model", "values"), [(Touch, TOUCH), (CallTask, TASK)], ids=["touch", "call-task"])
def test_a_new_row_has_what_the_constructor_gives(model: type[SQLModel], values: dict[str, Any]) -> None:
    assert _columns(store.new_row(model, **values)) == _columns(model(**values))


def test_a_field_without_a_default_must_be_given() -> None:
    values = {k: v for k, v in TOUCH.items() if k not in ("reason", "template")}
    with pytest.raises(TypeError, match="Touch: missing reason, template"):
        store.new_row(Touch, **values)


def test_defaults_made_by_a_factory_are_made_for_each_row() -> None:
    first, second = store.new_row(Touch, **TOUCH), store.new_row(Touch, **TOUCH)
    first.receipt["sent"] = True
    assert second.receipt == {}


def _enrollment(s: Any) -> Enrollment:
    contact = Contact(source="t", external_id="1", created_at=NOW, updated_at=NOW)
    version = CadenceVersion(name="c", content_hash="x", yaml_text="", file="c.yaml", created_at=NOW)
    s.add_all([contact, version])
    s.flush()
    enrollment = Enrollment(
        cadence_name="c",
        cadence_version_id=version.id or 0,
        subject="contact:1",
        contact_id=contact.id or 0,
        started_at=NOW,
    )
    s.add(enrollment)
    s.flush()
    return enrollment


def _stored_touches(s: Any, count: int) -> list[Touch]:
    """An enrollment's touches of steps 0 to `count` - 1, inserted and attached."""
    enrollment = _enrollment(s)
    rows = [
        store.new_row(Touch, **{**TOUCH, "enrollment_id": enrollment.id, "step_index": n})
        for n in range(count)
    ]
    store.insert_all_unless_taken(s, rows, TOUCH_KEY)
    return rows


def test_a_new_row_is_written_read_back_and_its_changes_saved(db: sa.Engine) -> None:
    with store.session(db) as s:
        enrollment = _enrollment(s)
        touch = store.new_row(Touch, **{**TOUCH, "enrollment_id": enrollment.id})
        assert store.insert_unless_taken(s, touch)
        assert not store.insert_unless_taken(
            s, store.new_row(Touch, **{**TOUCH, "enrollment_id": enrollment.id})
        )
        touch.status = TouchStatus.held  # tracked like a row that was read
        touch_id = touch.id

    with store.session(db) as s:
        [read] = s.exec(select(Touch)).all()
        assert read.id == touch_id and read.status == TouchStatus.held
        assert {k: v for k, v in _columns(read).items() if k not in ("id", "status", "enrollment_id")} == {
            k: v for k, v in _columns(Touch(**TOUCH)).items() if k not in ("id", "status", "enrollment_id")
        }


def test_a_batchs_insert_on_postgresql_is_converted_by_psycopg_once(postgres_url: str) -> None:
    """psycopg converts a statement's parameters in Python; a batch's multi-row INSERT, hundreds of
    parameters long, is kept converted, so the next batch of the same size reuses it."""
    from psycopg import _queries

    db = store.create_engine(postgres_url)
    try:
        store.migrate(db)

        def insert_batch(first: int) -> None:
            rows = [
                store.new_row(
                    Contact,
                    source="crm",
                    external_id=str(n),
                    email=f"c{n}@example.com",
                    created_at=NOW,
                    updated_at=NOW,
                )
                for n in range(first, first + 32)
            ]
            with store.session(db) as s:
                assert len(store.insert_all_unless_taken(s, rows, ("source", "external_id"))) == 32

        insert_batch(0)
        before = _queries._query2pg.cache_info()
        insert_batch(32)
        after = _queries._query2pg.cache_info()
        assert (after.hits - before.hits, after.misses - before.misses) == (1, 0)
        with store.session(db) as s:
            assert len(s.exec(select(Contact)).all()) == 64
    finally:
        db.dispose()


def test_rows_inserted_unattached_get_their_ids_and_stay_out_of_the_session(db: sa.Engine) -> None:
    with store.session(db) as s:
        enrollment = _enrollment(s)
        rows = [
            store.new_row(Touch, **{**TOUCH, "enrollment_id": enrollment.id, "step_index": n}) for n in (1, 2)
        ]
        taken = store.new_row(Touch, **{**TOUCH, "enrollment_id": enrollment.id, "step_index": 1})
        inserted = store.insert_all_unless_taken(s, [*rows, taken], TOUCH_KEY, attach=False)
        assert inserted == rows and taken.id is None
        assert all(row.id and row not in s for row in rows)
        assert not s.dirty and not s.new
        # Read in the same transaction, each is a row of the session like any other, with its id.
        read = s.exec(select(Touch).order_by(Touch.step_index)).all()  # type: ignore[arg-type]
        assert [(row.id, row.step_index) for row in read] == [(row.id, row.step_index) for row in rows]
        assert all(row in s for row in read) and read[0] is not rows[0]


def test_a_query_of_columns_sees_the_sessions_changes(db: sa.Engine) -> None:
    """`select_rows` flushes first, as the session's own queries do."""
    with store.session(db) as s:
        enrollment = _enrollment(s)
        touch = store.new_row(Touch, **{**TOUCH, "enrollment_id": enrollment.id})
        assert store.insert_unless_taken(s, touch)
        touch.status = TouchStatus.held  # not flushed yet
        statuses = select(Touch.id, Touch.status)
        assert list(store.select_rows(s, statuses, {})) == [(touch.id, TouchStatus.held)]
        assert not s.dirty


def test_rows_changes_are_written_one_update_a_set_of_columns(db: sa.Engine) -> None:
    """`update_all` writes each row's changes, and the columns noted as written without being written, by
    one UPDATE for each set of columns; the rows leave the session, whose other changes its flush writes."""
    with store.session(db) as s:
        rows = _stored_touches(s, 4)
        ids = [row.id for row in rows]
    updates: list[tuple[str, int]] = []

    def executes(_c: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, many: bool) -> None:
        if statement.startswith("UPDATE"):
            updates.append((statement.split(" SET ")[1].split(" WHERE")[0], len(parameters) if many else 1))

    sa.event.listen(db, "before_cursor_execute", executes)
    try:
        with store.session(db) as s:
            touches = s.exec(select(Touch).order_by(Touch.step_index)).all()  # type: ignore[arg-type]
            for touch in touches[:3]:
                touch.status = TouchStatus.sent
                touch.receipt = {"reference": f"r{touch.id}"}
            touches[2].status_reason = "and a reason"
            for touch in touches[:2]:
                set_committed_value(touch, "attempts", 7)  # noted as written, not written
            touches[3].reason = "changed, and left to the session"
            store.update_all(s, touches[:3], ("attempts",))
            assert all(touch not in s for touch in touches[:3]) and touches[3] in s
    finally:
        sa.event.remove(db, "before_cursor_execute", executes)
    assert sorted(updates) == [
        ("reason=?", 1),  # by the session's flush
        ("status=?, attempts=?, receipt=?", 2),
        ("status=?, status_reason=?, attempts=?, receipt=?", 1),
    ]
    with store.session(db) as s:
        read = {t.id: t for t in s.exec(select(Touch)).all()}
    assert [read[i].status for i in ids] == [TouchStatus.sent] * 3 + [TouchStatus.planned]
    assert [read[i].receipt for i in ids[:3]] == [{"reference": f"r{i}"} for i in ids[:3]]
    assert [read[i].attempts for i in ids] == [7, 7, 0, 0]
    assert (read[ids[2]].status_reason, read[ids[3]].reason) == (
        "and a reason",
        "changed, and left to the session",
    )


def test_a_batchs_insert_on_postgresql_sends_one_array_a_column(postgres_url: str) -> None:
    """On PostgreSQL the rows go as one array a column, which `unnest` makes rows of: what is read back is
    what was given, NULLs, times and JSON included, and a taken key is left out as on any database."""
    db = store.create_engine(postgres_url)
    inserts: list[Any] = []

    def executes(_c: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        if statement.startswith("INSERT INTO touch"):
            inserts.append(parameters)

    try:
        store.migrate(db)
        with store.session(db) as s:
            enrollment = _enrollment(s)
        sa.event.listen(db, "before_cursor_execute", executes)
        given = [
            {
                **TOUCH,
                "enrollment_id": enrollment.id,
                "step_index": 1,
                "receipt": {"reference": "r", "n": [1]},
            },
            {
                **TOUCH,
                "enrollment_id": enrollment.id,
                "step_index": 2,
                "variant": "b",
                "queued_at": datetime(2026, 11, 23, 12, 0, tzinfo=ZoneInfo("Europe/Moscow")),
                "status_reason": "Ünïcode, 'quotes' and {braces}",
            },
        ]
        with store.session(db) as s:
            rows = [store.new_row(Touch, **values) for values in given]
            taken = store.new_row(Touch, **given[0])
            assert store.insert_all_unless_taken(s, rows, TOUCH_KEY, attach=False) == rows
            assert store.insert_all_unless_taken(s, [taken], TOUCH_KEY) == []
        columns = len(Touch.__table__.columns) - 1  # type: ignore[attr-defined]
        assert [len(parameters) for parameters in inserts] == [columns, columns]
        with store.session(db) as s:
            read = s.exec(select(Touch).order_by(Touch.step_index)).all()  # type: ignore[arg-type]
        assert [row.id for row in read] == [row.id for row in rows]
        assert [_columns(row) for row in read] == [_columns(row) for row in rows]
        assert read[1].queued_at == datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
    finally:
        db.dispose()


def test_arrays_in_postgresqls_text_form_read_back_as_given(postgres_url: str) -> None:
    """What the statements of arrays send: every value of each kind reads back as it was, a text that
    spells NULL or holds quotes, backslashes and braces included, and None as NULL."""
    given: list[tuple[str, list[Any]]] = [
        ("TEXT", ['say "hi"', "back\\slash", "{a,b}", "NULL", "", " spaced ", "Ünïcode", None]),
        ("INTEGER", [0, -7, 2**31 - 1, None]),
        ("FLOAT8", [0.1, -2.5, 1e300, float("inf"), float("-inf"), None]),
        ("BOOLEAN", [True, False, None]),
        ("TIMESTAMP", [datetime(2026, 11, 23, 9, 0), datetime(2026, 1, 2, 3, 4, 5, 678901), None]),
        ("DATE", [date(2026, 11, 23), None]),
    ]
    db = sa.create_engine(postgres_url)
    try:
        with db.connect() as connection:
            for kind, values in given:
                literal = store._array_literal(values)
                read = connection.exec_driver_sql(f"SELECT %s::{kind}[]", (literal,)).scalar_one()
                assert read == values, kind
            documents = [json.dumps({"q": 'a "quote" and \\', "n": [1, None]}), json.dumps(None), None]
            read = connection.exec_driver_sql(
                "SELECT %s::JSON[]", (store._array_literal(documents),)
            ).scalar_one()
            assert read == [{"q": 'a "quote" and \\', "n": [1, None]}, None, None]
    finally:
        db.dispose()


def test_a_value_too_long_is_refused_by_the_array_insert_as_by_any(postgres_url: str) -> None:
    db = store.create_engine(postgres_url)
    try:
        store.migrate(db)
        with store.session(db) as s:
            enrollment = _enrollment(s)
        too_long = store.new_row(Touch, **{**TOUCH, "enrollment_id": enrollment.id, "channel": "e" * 17})
        with pytest.raises(sa.exc.DataError, match="too long"), store.session(db) as s:
            store.insert_all_unless_taken(s, [too_long], TOUCH_KEY)
        with store.session(db) as s:
            assert s.exec(select(Touch)).all() == []
    finally:
        db.dispose()


def test_text_of_a_fixed_length_too_long_is_refused_by_the_array_insert_not_cut(postgres_url: str) -> None:
    """CHAR(n) as VARCHAR(n): the array is cast as text and the column refuses a longer value, where a cast
    to the column's own type would cut it short without a word."""
    table = sa.Table(
        "coded",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("code", sa.CHAR(3), unique=True),
    )
    db = store.create_engine(postgres_url)
    try:
        table.create(db)
        by_arrays = store._insert_by_arrays(db.dialect, table, ("code",))
        assert by_arrays is not None
        sql, processors = by_arrays
        with db.begin() as connection:
            connection.exec_driver_sql(sql, store._arrays([["abc", "de"]], processors))
        with pytest.raises(sa.exc.DataError, match="too long"), db.begin() as connection:
            connection.exec_driver_sql(sql, store._arrays([["abcdef"]], processors))
        with db.connect() as connection:
            assert connection.execute(sa.select(table.c.code).order_by(table.c.id)).scalars().all() == [
                "abc",
                "de ",
            ]
    finally:
        db.dispose()


def test_a_batchs_update_on_postgresql_sends_one_array_a_column(postgres_url: str) -> None:
    """On PostgreSQL each set of columns is written by one UPDATE joined to arrays of the ids and values:
    what is read back is what was given (NULLs, times in another zone, JSON, awkward text); a value too long
    is refused and a row gone raises, as with one UPDATE a row, and nothing is written then."""
    db = store.create_engine(postgres_url)
    updates: list[tuple[str, Any]] = []

    def executes(_c: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        if statement.startswith("UPDATE touch"):
            updates.append((statement, parameters))

    try:
        store.migrate(db)
        with store.session(db) as s:
            rows = _stored_touches(s, 4)
        sa.event.listen(db, "before_cursor_execute", executes)
        with store.session(db) as s:
            touches = s.exec(select(Touch).order_by(Touch.step_index)).all()  # type: ignore[arg-type]
            for n, touch in enumerate(touches[:3]):
                touch.status = TouchStatus.sent
                touch.receipt = {"reference": f"r{n}", "parts": [n, None]} if n else None
                touch.status_reason = "Ünïcode, 'quotes', {braces} and \\back\\slashes" if n == 1 else None
                touch.sending_at = datetime(2026, 11, 23, 12, n, tzinfo=ZoneInfo("Europe/Moscow"))
                set_committed_value(touch, "attempts", 3 + n)  # noted as written, not written
            touches[2].variant = "b"
            store.update_all(s, touches[:3], ("attempts",))
        # Two sets of columns (all set, the last row's variant too): the ids, and each column's values.
        assert [statement.count("unnest") for statement, _ in updates] == [1, 1]
        assert sorted((len(parameters), array_ids(parameters[0])) for _, parameters in updates) == [
            (6, [touches[0].id, touches[1].id]),
            (7, [touches[2].id]),
        ]
        with store.session(db) as s:
            read = s.exec(select(Touch).order_by(Touch.step_index)).all()  # type: ignore[arg-type]
        assert [t.status for t in read] == [TouchStatus.sent] * 3 + [TouchStatus.planned]
        assert [t.receipt for t in read[:3]] == [
            None,
            {"reference": "r1", "parts": [1, None]},
            {"reference": "r2", "parts": [2, None]},
        ]
        assert _columns(read[3]) == _columns(rows[3])  # not given: as it was
        assert [t.status_reason for t in read[:3]] == [
            None,
            "Ünïcode, 'quotes', {braces} and \\back\\slashes",
            None,
        ]
        assert [t.sending_at for t in read[:3]] == [
            datetime(2026, 11, 23, 9, n, tzinfo=UTC) for n in range(3)
        ]
        assert [t.attempts for t in read] == [3, 4, 5, 0]
        assert [t.variant for t in read] == [None, None, "b", None]

        with pytest.raises(sa.exc.DataError, match="too long"), store.session(db) as s:
            first, second = s.exec(select(Touch).where(Touch.step_index < 2).order_by(Touch.step_index)).all()  # type: ignore[arg-type]
            first.status_reason, second.channel = "kept back", "e" * 17
            store.update_all(s, [first, second])
        with pytest.raises(StaleDataError, match="touch: UPDATE of 2 rows matched 1"), store.session(db) as s:
            first, last = s.exec(
                select(Touch).where(Touch.step_index.in_([0, 3])).order_by(Touch.step_index)
            ).all()  # type: ignore[arg-type,attr-defined]
            first.status_reason = last.status_reason = "kept back"
            s.connection().execute(sa.delete(Touch).where(Touch.id == last.id))  # type: ignore[arg-type]
            store.update_all(s, [first, last])
        with store.session(db) as s:
            after = s.exec(select(Touch).order_by(Touch.step_index)).all()  # type: ignore[arg-type]
        assert [_columns(t) for t in after] == [_columns(t) for t in read]
    finally:
        db.dispose()


def test_a_database_reading_arrays_nulls_as_text_gets_a_value_a_parameter(postgres_url: str) -> None:
    """With `array_nulls` off, PostgreSQL reads an unquoted NULL in an array as the text "NULL": a batch's
    insert and update then send no arrays, and a null is written as a null, not as that text."""
    db = store.create_engine(postgres_url)
    statements: list[str] = []

    def executes(_c: Any, _cursor: Any, statement: str, _parameters: Any, _context: Any, _many: bool) -> None:
        statements.append(statement)

    try:
        store.migrate(db)
        with db.begin() as connection:
            name = connection.exec_driver_sql("SELECT current_database()").scalar_one()
            connection.exec_driver_sql(f'ALTER DATABASE "{name}" SET array_nulls = off')
        db.dispose()  # new connections take the database's setting
        sa.event.listen(db, "before_cursor_execute", executes)
        with store.session(db) as s:
            _stored_touches(s, 2)  # their nulls (variant, sending_at, ...) inserted
        with store.session(db) as s:
            touches = s.exec(select(Touch).order_by(Touch.step_index)).all()  # type: ignore[arg-type]
            for touch in touches:
                touch.status, touch.variant, touch.status_reason = TouchStatus.sent, None, None
                touch.sending_at = NOW
            store.update_all(s, touches)
        assert not [statement for statement in statements if "unnest" in statement]
        assert len([statement for statement in statements if statement == "SHOW array_nulls"]) == 1
        with db.connect() as connection:
            assert connection.exec_driver_sql("SHOW array_nulls").scalar() == "off"
            read = connection.exec_driver_sql(
                "SELECT status, variant, status_reason, sending_at FROM touch ORDER BY step_index"
            ).all()
        assert [tuple(row) for row in read] == [(TouchStatus.sent, None, None, NOW.replace(tzinfo=None))] * 2
    finally:
        db.dispose()


def test_writing_a_row_gone_meanwhile_raises_and_a_row_given_twice_is_written_once(db: sa.Engine) -> None:
    with store.session(db) as s:
        _stored_touches(s, 2)
    with store.session(db) as s:
        first, second = s.exec(select(Touch).order_by(Touch.step_index)).all()  # type: ignore[arg-type]
        first.status = TouchStatus.sent
        store.update_all(s, [first, first])
    with pytest.raises(StaleDataError, match="touch: UPDATE of 1 rows matched 0"), store.session(db) as s:
        second = s.get_one(Touch, second.id)
        second.status = TouchStatus.sent
        s.connection().execute(sa.delete(Touch).where(Touch.id == second.id))  # type: ignore[arg-type]
        store.update_all(s, [second])
    with store.session(db) as s:
        assert [t.status for t in s.exec(select(Touch).order_by(Touch.step_index))] == [  # type: ignore[arg-type]
            TouchStatus.sent,
            TouchStatus.planned,
        ]
