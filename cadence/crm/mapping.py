"""The CRM mapping (`rules/crm.yaml`): how each CRM's stage ids, statuses, lost reasons and fields become
Cadence's words, so the same cadences work on any CRM; and the helpers adapters use to apply it.

Each adapter knows its CRM's fixed facts (amoCRM's status 142 is won everywhere); the file adds what is
particular to one account (Pipedrive stage 3 is "proposal_sent" here) and wins where the two disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, ValidationError

from cadence.errors import Problem, RulesError
from cadence.events import Event
from cadence.inbox import Reading, Rejection
from cadence.validation import validate

Status = Literal["open", "won", "lost"]


def _text(value: Any) -> Any:
    """YAML reads `3:` as a number; CRM ids are compared as text."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


#: A CRM's id or name for a stage, status, reason or field, as the CRM sends it.
Key = Annotated[str, BeforeValidator(_text), StringConstraints(min_length=1, max_length=200)]
#: A name conditions and templates can use: `contact.age`, `deal.probability`.
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=64)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FieldTarget(_Model):
    to: Name = Field(description="The Cadence name, e.g. age, seniority, sms_consent, probability.")
    type: Literal["text", "number", "integer", "boolean"] | None = Field(
        default=None, description="Read the CRM's value as this; a value that does not read is left out."
    )


class Fields(_Model):
    contact: dict[Key, Name | FieldTarget] = Field(
        default_factory=dict, description="CRM field name or id -> contact field."
    )
    deal: dict[Key, Name | FieldTarget] = Field(
        default_factory=dict, description="CRM field name or id -> deal field."
    )


class CrmMapping(_Model):
    """One CRM's ids in Cadence's words."""

    stages: dict[Key, Annotated[str, StringConstraints(min_length=1, max_length=64)]] = Field(
        default_factory=dict,
        description="Stage id -> Cadence stage name, e.g. 3: proposal_sent; an unmapped stage keeps its id.",
    )
    statuses: dict[Key, Status] = Field(
        default_factory=dict,
        description="Status value or stage id -> open, won or lost, e.g. 142: won.",
    )
    lost_reasons: dict[Key, Annotated[str, StringConstraints(min_length=1, max_length=200)]] = Field(
        default_factory=dict, description="Lost reason id or text -> the reason Cadence records."
    )
    fields: Fields = Field(default_factory=Fields)

    def stage(self, value: Any, native: Mapping[str, str] | None = None) -> str | None:
        """The Cadence stage name of a CRM stage id; an unmapped one keeps its id."""
        key = _key(value)
        if key is None:
            return None
        return self.stages.get(key) or (native or {}).get(key) or key

    def status(self, value: Any, native: Mapping[str, Status]) -> Status | None:
        key = _key(value)
        return None if key is None else self.statuses.get(key) or native.get(key)

    def lost_reason(self, value: Any) -> str | None:
        key = _key(value)
        return None if key is None else self.lost_reasons.get(key, key)

    def contact_fields(self, found: Mapping[str, Any]) -> dict[str, Any]:
        """The mapped contact fields among `found` (the CRM's fields by name or id), in Cadence's names."""
        return _mapped(self.fields.contact, found)

    def deal_fields(self, found: Mapping[str, Any]) -> dict[str, Any]:
        return _mapped(self.fields.deal, found)


class CrmMap(_Model):
    """`rules/crm.yaml`: one section per CRM; a CRM without one uses only what its adapter knows."""

    pipedrive: CrmMapping = Field(default_factory=CrmMapping)
    hubspot: CrmMapping = Field(default_factory=CrmMapping)
    amocrm: CrmMapping = Field(default_factory=CrmMapping)
    bitrix24: CrmMapping = Field(default_factory=CrmMapping)


def parse(text: str, file: str) -> CrmMap:
    """Validate a mapping file; RulesError carries every problem with its position."""
    mapping, located = validate(text, file, CrmMap, "a mapping of pipedrive, hubspot, amocrm, bitrix24")
    problems = [
        Problem(
            file,
            *located.where((crm, "fields", kind)),
            f"{crm}.fields.{kind}: {', '.join(sorted(twice))} each come from more than one CRM field",
            "map each Cadence field from one CRM field",
        )
        for crm in CrmMap.model_fields
        for kind in ("contact", "deal")
        if (twice := _repeated(getattr(getattr(mapping, crm).fields, kind)))
    ]
    if problems:
        raise RulesError(problems)
    return mapping


def _repeated(fields: Mapping[str, str | FieldTarget]) -> set[str]:
    names = [t if isinstance(t, str) else t.to for t in fields.values()]
    return {n for n in names if names.count(n) > 1}


def _key(value: Any) -> str | None:
    if value is None or value == "" or isinstance(value, (dict, list)):
        return None
    return str(value)


def _mapped(fields: Mapping[str, str | FieldTarget], found: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, target in fields.items():
        if key not in found or found[key] is None:
            continue
        name, kind = (target, None) if isinstance(target, str) else (target.to, target.type)
        value = _as(kind, found[key])
        if value is not None:
            out[name] = value
    return out


_TRUE = {"1", "true", "yes", "y", "on", "да"}
_FALSE = {"0", "false", "no", "n", "off", "нет", ""}


def _as(kind: str | None, value: Any) -> Any:
    """The value read as `kind`; None when it does not read (a consent that cannot be read is not given)."""
    if kind is None:
        return value
    if isinstance(value, dict) and "value" in value:  # a money or option field: {"value": 13, ...}
        value = value["value"]
    if kind == "text":
        return value if isinstance(value, str) else None if isinstance(value, (dict, list)) else str(value)
    if kind == "boolean":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        return True if text in _TRUE else False if text in _FALSE else None
    try:
        number = float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        return None
    if number is None or number != number or number in (float("inf"), float("-inf")):
        return None
    if kind == "integer":
        return int(number) if number.is_integer() else None
    return number


def percent(value: Any) -> Any:
    """A CRM's percentage (0-100) as Cadence's probability (0-1); anything else is left for validation."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value / 100
    return value


# --- reading deliveries ---------------------------------------------------------------------------------


class Unreadable(Exception):
    """A delivery whose shape is not the CRM's: `field` is where, the answer is `status`."""

    def __init__(self, message: str, field: str | None = None, status: int = 422) -> None:
        super().__init__(message)
        self.field = field
        self.status = status


def need(value: Any, kind: type | tuple[type, ...], field: str) -> Any:
    """`value` when it is of `kind`, else Unreadable naming the field."""
    if isinstance(value, kind) and not isinstance(value, bool):
        return value
    names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
    expected = names.replace("dict", "an object").replace("list", "a list").replace("str", "text")
    raise Unreadable(f"{field}: expected {expected}, got {type(value).__name__}", field)


def ident(value: Any, field: str) -> str:
    """A CRM id: a whole number or text."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value
    raise Unreadable(f"{field}: expected an id, got {value!r:.40}", field)


def reading(event_id: str, kind: str | None, events: Callable[[], list[dict[str, Any]]]) -> Reading:
    """The Reading of one delivery: its events validated as Cadence's, or the first reason they cannot be."""
    try:
        raw = events()
    except Unreadable as exc:
        problems = [{"field": exc.field, "message": str(exc)}]
        return Reading(
            event_id, kind, rejection=Rejection(exc.status, "invalid", str(exc), exc.field, problems)
        )
    out = []
    for index, one in enumerate(raw):
        try:
            out.append(Event.model_validate(one))
        except ValidationError as exc:
            problems = [
                {"field": ".".join(str(p) for p in e["loc"]) or None, "message": e["msg"]}
                for e in exc.errors()
            ]
            first = problems[0]
            where = f"event {index}: {first['field']}" if len(raw) > 1 else first["field"]
            message = f"{where}: {first['message']}"
            return Reading(
                event_id, kind, rejection=Rejection(422, "invalid", message, first["field"], problems)
            )
    return Reading(event_id, kind, out)


def unreadable(event_id: str, kind: str | None, message: str, field: str | None = "body") -> Reading:
    """A body that cannot be read at all (not JSON, not a form): 400."""
    problems = [{"field": field, "message": message}]
    return Reading(event_id, kind, rejection=Rejection(400, "unreadable", message, field, problems))


def compact(values: Mapping[str, Any]) -> dict[str, Any]:
    """Without the fields the CRM left empty."""
    return {k: v for k, v in values.items() if v is not None}
