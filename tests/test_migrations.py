"""Alembic migrations on SQLite and PostgreSQL: they build exactly the models' schema, and go down and up."""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlmodel import SQLModel, col, select

from cadence import store
from cadence.models import CadenceVersion, Contact, Enrollment, EnrollmentStatus

NOW = datetime(2026, 11, 23, 6, 0, tzinfo=UTC)
TABLES = {
    "api_key",
    "activity",
    "digest",
    "block",
    "cadence_version",
    "call_task",
    "contact",
    "deal",
    "enrollment",
    "inbound_event",
    "outcome",
    "touch",
}


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'migrations.db'}"
    postgres_url: str = request.getfixturevalue("postgres_url")
    return postgres_url


@pytest.fixture
def db(url: str) -> Iterator[sa.Engine]:
    engine = store.create_engine(url)
    yield engine
    engine.dispose()


def _differences(engine: sa.Engine) -> list[object]:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, SQLModel.metadata))


def _revision(engine: sa.Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def _head(url: str) -> str | None:
    return ScriptDirectory.from_config(store.alembic_config(url)).get_current_head()


def _tables(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names()) - {"alembic_version"}


def test_migrate_creates_the_schema_of_the_models(db: sa.Engine, url: str) -> None:
    store.migrate(db)

    assert _tables(db) == TABLES == set(SQLModel.metadata.tables)
    assert _revision(db) == _head(url)
    assert _differences(db) == []


def test_migrate_twice_is_harmless(db: sa.Engine, url: str) -> None:
    store.migrate(db)
    _seed_enrollment(db, EnrollmentStatus.active)

    store.migrate(db)

    assert _revision(db) == _head(url)
    assert _differences(db) == []
    with store.session(db) as s:
        assert len(s.exec(select(Enrollment)).all()) == 1


def _alembic(db: sa.Engine, url: str, run: Callable[[Config, str], None], revision: str) -> None:
    """Run an Alembic command on one of our connections, the way `store.migrate` does."""
    config = store.alembic_config(url)
    with db.begin() as connection:
        config.attributes["connection"] = connection
        run(config, revision)


def test_downgrade_to_base_and_upgrade_again(db: sa.Engine, url: str) -> None:
    store.migrate(db)

    _alembic(db, url, command.downgrade, "base")

    assert _tables(db) == set()
    assert _revision(db) is None

    _alembic(db, url, command.upgrade, "head")

    assert _tables(db) == TABLES
    assert _revision(db) == _head(url)
    assert _differences(db) == []


@pytest.mark.integration
def test_alembic_commands_given_only_the_url_close_their_connection(postgres_url: str) -> None:
    """`alembic upgrade` from the command line, or a script, hands env.py a URL and no connection."""
    config = store.alembic_config(postgres_url)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        command.upgrade(config, "head")
        command.downgrade(config, "base")
        gc.collect()  # a connection left open is reported when it is collected

    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []


def test_the_active_enrollment_index_is_a_partial_unique_index(db: sa.Engine) -> None:
    store.migrate(db)

    [index] = [i for i in sa.inspect(db).get_indexes("enrollment") if i["name"] == "uq_enrollment_active"]

    assert index["unique"]
    assert index["column_names"] == ["cadence_name", "subject"]


# --- the partial unique index -------------------------------------------------------------------------------


def _seed_enrollment(db: sa.Engine, status: str, subject: str = "deal:1") -> int:
    with store.session(db) as s:
        contact = s.exec(select(Contact)).first()
        version = s.exec(select(CadenceVersion)).first()
        if contact is None or version is None:
            contact = Contact(source="generic", external_id="c-1", created_at=NOW, updated_at=NOW)
            version = CadenceVersion(
                name="open-deal", content_hash="h", yaml_text="", file="open-deal.yaml", created_at=NOW
            )
            s.add_all([contact, version])
            s.flush()
        enrollment = Enrollment(
            cadence_name="open-deal",
            cadence_version_id=version.id or 0,
            subject=subject,
            contact_id=contact.id or 0,
            status=status,
            started_at=NOW,
            ended_at=None if status == EnrollmentStatus.active else NOW,
        )
        s.add(enrollment)
        s.flush()
        return enrollment.id or 0


def test_only_one_active_enrollment_per_cadence_and_subject(db: sa.Engine) -> None:
    store.migrate(db)
    _seed_enrollment(db, EnrollmentStatus.active)

    with pytest.raises(sa.exc.IntegrityError):
        _seed_enrollment(db, EnrollmentStatus.active)

    with store.session(db) as s:
        assert [e.status for e in s.exec(select(Enrollment)).all()] == [EnrollmentStatus.active]


def test_ended_enrollments_of_the_same_subject_may_be_many(db: sa.Engine) -> None:
    store.migrate(db)
    ended = [
        EnrollmentStatus.completed,
        EnrollmentStatus.exited,
        EnrollmentStatus.exited,
        EnrollmentStatus.completed,
    ]

    for status in ended:
        _seed_enrollment(db, status)
    _seed_enrollment(db, EnrollmentStatus.active)
    _seed_enrollment(db, EnrollmentStatus.active, subject="deal:2")

    with store.session(db) as s:
        statuses = s.exec(select(Enrollment.status).order_by(col(Enrollment.id))).all()
    assert list(statuses) == [*ended, EnrollmentStatus.active, EnrollmentStatus.active]


def test_ending_the_active_enrollment_frees_its_subject(db: sa.Engine) -> None:
    store.migrate(db)
    first = _seed_enrollment(db, EnrollmentStatus.active)
    with store.session(db) as s:
        enrollment = s.get_one(Enrollment, first)
        enrollment.status, enrollment.ended_at = EnrollmentStatus.exited, NOW

    second = _seed_enrollment(db, EnrollmentStatus.active)

    assert second != first
