"""What changed between two rule sets, in a marketer's terms: cadences added, removed or changed field by
field and step by step, the policy too; and how the rules folder differs from what enrollments run on."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import sqlalchemy as sa
from pydantic import BaseModel
from sqlmodel import SQLModel, col, func, select

from cadence import store
from cadence.language import Parsed, parse
from cadence.models import CadenceVersion, Enrollment, EnrollmentStatus
from cadence.rules import RuleSet

Status = Literal["added", "removed", "changed", "unchanged"]
ChangeKind = Literal["added", "removed", "changed"]

_TIME = re.compile(r"^(\d{2}:\d{2}):(\d{2})(\.\d+)?$")


@dataclass(frozen=True)
class Change:
    """One difference at `path`, written as in the file (`steps[2].day`), with the values before and after."""

    path: str
    old: Any
    new: Any
    kind: ChangeKind = "changed"

    def __str__(self) -> str:
        if self.kind == "added":
            return f"{self.path} added: {show(self.new)}"
        if self.kind == "removed":
            return f"{self.path} removed: {show(self.old)}"
        return f"{self.path}: {show(self.old)} → {show(self.new)}"

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "change": self.kind, "old": self.old, "new": self.new, "text": str(self)}


@dataclass(frozen=True)
class CadenceDiff:
    """One cadence on both sides; `active_on_old` counts, against the database only, the active enrollments
    that keep running on a version other than the new one."""

    name: str
    status: Status
    changes: tuple[Change, ...] = ()
    old_file: str | None = None
    new_file: str | None = None
    old_hash: str | None = None
    new_hash: str | None = None
    active_on_old: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "old_file": self.old_file,
            "new_file": self.new_file,
            "old_hash": self.old_hash,
            "new_hash": self.new_hash,
            "active_on_old": self.active_on_old,
            "changes": [c.as_dict() for c in self.changes],
        }


@dataclass(frozen=True)
class RulesDiff:
    """Every cadence by name; `policy` is None when one side has no policy to compare (the database)."""

    cadences: tuple[CadenceDiff, ...]
    policy: tuple[Change, ...] | None = field(default=())

    @property
    def differs(self) -> bool:
        return bool(self.policy) or any(c.status != "unchanged" for c in self.cadences)

    def as_dict(self) -> dict[str, Any]:
        return {
            "differs": self.differs,
            "cadences": [c.as_dict() for c in self.cadences],
            "policy": None if self.policy is None else [c.as_dict() for c in self.policy],
        }


def show(value: Any) -> str:
    """A value from a model's JSON dump as a marketer wrote it: `09:00-18:00`, `[replied, bounced]`."""
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        match = _TIME.match(value)
        if match is None:
            return value if value else '""'
        if value.startswith("23:59:59.9"):  # how a window that runs to midnight ends
            return "24:00"
        return match.group(1) if match.group(2) == "00" else value
    if isinstance(value, list):
        if len(value) == 2 and all(isinstance(v, str) and _TIME.match(v) for v in value):
            return f"{show(value[0])}-{show(value[1])}"
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        shown = (f"{k}: {show(v)}" for k, v in value.items() if not _unset(v))
        return "{" + ", ".join(shown) + "}"
    return str(value)


def _unset(value: Any) -> bool:
    # `is`, not `in`: 0 == False, and `day: 0` is worth showing.
    return value is None or value is False or value in ("", [], {})


def _records(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, dict) for item in value)


def compare(old: Any, new: Any, path: str = "") -> list[Change]:
    """The differences between two JSON values: mappings key by key, lists of mappings (steps, blocks)
    item by item by position, anything else as a whole."""
    if old == new:
        return []
    changes: list[Change] = []
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*old, *(k for k in new if k not in old)]:
            where = f"{path}.{key}" if path else str(key)
            if key not in new:
                changes.append(Change(where, old[key], None, "removed"))
            elif key not in old:
                changes.append(Change(where, None, new[key], "added"))
            else:
                changes.extend(compare(old[key], new[key], where))
        return changes
    if _records(old) and _records(new):
        for i in range(max(len(old), len(new))):
            where = f"{path}[{i}]"
            if i >= len(new):
                changes.append(Change(where, old[i], None, "removed"))
            elif i >= len(old):
                changes.append(Change(where, None, new[i], "added"))
            else:
                changes.extend(compare(old[i], new[i], where))
        return changes
    return [Change(path, old, new)]


def _dump(model: BaseModel) -> Any:
    # Generic over the language: a field added to it shows up here with no change to this module.
    return model.model_dump(mode="json", by_alias=True)


def compare_cadences(old: Mapping[str, Parsed], new: Mapping[str, Parsed]) -> tuple[CadenceDiff, ...]:
    """Every cadence named on either side, by name."""
    found = []
    for name in sorted({*old, *new}):
        before, after = old.get(name), new.get(name)
        if before is None:
            assert after is not None
            found.append(CadenceDiff(name, "added", new_file=after.file, new_hash=after.content_hash))
            continue
        if after is None:
            found.append(CadenceDiff(name, "removed", old_file=before.file, old_hash=before.content_hash))
            continue
        changes = tuple(compare(_dump(before.spec), _dump(after.spec)))
        found.append(
            CadenceDiff(
                name,
                "changed" if changes else "unchanged",
                changes,
                before.file,
                after.file,
                before.content_hash,
                after.content_hash,
            )
        )
    return tuple(found)


def compare_rules(old: RuleSet, new: RuleSet) -> RulesDiff:
    """Two loaded rule sets: their cadences and their policies."""
    return RulesDiff(
        compare_cadences(old.cadences, new.cadences), tuple(compare(_dump(old.policy), _dump(new.policy)))
    )


def _has_table(db: sa.Engine, model: type[SQLModel]) -> bool:
    # A database that has not been migrated yet holds no versions and no enrollments.
    return sa.inspect(db).has_table(str(model.__tablename__))


def stored_versions(db: sa.Engine) -> dict[str, CadenceVersion]:
    """The newest stored version of each cadence: the one its latest enrollments started on."""
    if not _has_table(db, CadenceVersion):
        return {}
    with store.session(db) as s:
        rows = s.exec(select(CadenceVersion).order_by(col(CadenceVersion.created_at), col(CadenceVersion.id)))
        return {version.name: version for version in rows}


def _active_by_version(db: sa.Engine) -> list[tuple[str, str, int]]:
    """(cadence, content hash, active enrollments) for every version something still runs on."""
    if not _has_table(db, Enrollment):
        return []
    with store.session(db) as s:
        query = (
            select(Enrollment.cadence_name, CadenceVersion.content_hash, func.count())
            .join(CadenceVersion, col(Enrollment.cadence_version_id) == col(CadenceVersion.id))
            .where(Enrollment.status == EnrollmentStatus.active)
            .group_by(col(Enrollment.cadence_name), col(CadenceVersion.content_hash))
        )
        return [(name, content_hash, count) for name, content_hash, count in s.exec(query)]


def against_db(db: sa.Engine, rules: RuleSet) -> RulesDiff:
    """The rules against the newest stored version of each cadence, with how many active enrollments keep
    an old version (running enrollments keep theirs; only new ones start on the new rules). The policy is
    not stored, so it is not compared. Raises RulesError if a stored version no longer parses."""
    stored = {name: parse(v.yaml_text, v.file) for name, v in stored_versions(db).items()}
    on_old: dict[str, int] = {}
    for name, content_hash, count in _active_by_version(db):
        current = rules.cadences.get(name)
        if current is None or current.content_hash != content_hash:
            on_old[name] = on_old.get(name, 0) + count
    cadences = tuple(
        replace(c, active_on_old=on_old.get(c.name, 0)) for c in compare_cadences(stored, rules.cadences)
    )
    return RulesDiff(cadences, policy=None)
