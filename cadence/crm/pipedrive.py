"""Pipedrive webhooks, v1 (`current`, `previous`, `event`) and v2 (`data`, `previous`, `meta.entity`), checked
by the HTTP Basic credentials set on the webhook."""

from __future__ import annotations

import base64
import binascii
import hmac
import re
from typing import TYPE_CHECKING, Any

from cadence.crm.mapping import (
    CrmMapping,
    Status,
    Unreadable,
    compact,
    ident,
    need,
    percent,
    reading,
    unreadable,
)
from cadence.inbox import Reading, body_id, parse_json
from cadence.settings import Settings

if TYPE_CHECKING:
    from cadence.crm import Delivery
    from cadence.rules import RuleSet

#: Pipedrive's own deal statuses; `deleted` is none of Cadence's.
_STATUSES: dict[str, Status] = {"open": "open", "won": "won", "lost": "lost"}
#: A custom field's key: 40 hex characters.
_CUSTOM = re.compile(r"^[0-9a-f]{40}$")
#: Pipedrive's actions in v1 (`added`) and v2 (`create`) words.
_CREATED = {"added", "create"}
_CHANGED = {"updated", "change"}


class Pipedrive:
    name = "pipedrive"
    credential = "Authorization"

    def verify(self, delivery: Delivery, settings: Settings, now: float) -> str | None:
        if not settings.pipedrive_user or not settings.pipedrive_password:
            return "Pipedrive webhooks are refused: PIPEDRIVE_USER and PIPEDRIVE_PASSWORD are not set"
        scheme, _, token = delivery.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic" or not token:
            return "Pipedrive webhooks need HTTP Basic credentials (set them on the webhook)"
        try:
            user, colon, password = base64.b64decode(token, validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return "the Authorization header is not valid Basic credentials"
        same_user = hmac.compare_digest(user, settings.pipedrive_user.encode())
        same_password = hmac.compare_digest(password, settings.pipedrive_password.encode())
        return None if colon and same_user and same_password else "wrong Pipedrive webhook credentials"

    def read(self, body: bytes, rules: RuleSet) -> Reading:
        try:
            payload = parse_json(body)
        except (UnicodeDecodeError, ValueError) as exc:
            return unreadable(body_id(body), None, f"body is not JSON that can be stored: {exc}")
        if not isinstance(payload, dict):
            return unreadable(body_id(body), None, "expected a Pipedrive webhook object")
        meta: dict[str, Any] = payload["meta"] if isinstance(payload.get("meta"), dict) else {}
        if "data" in payload:  # v2
            entity, action = meta.get("entity"), meta.get("action")
            current, custom_key = payload.get("data"), "custom_fields"
            event_id = meta.get("id")
        else:
            action, _, entity = str(payload.get("event", "")).partition(".")
            current, custom_key = payload.get("current"), None
            event_id = meta.get("request_id") or _v1_id(meta)
        kind = f"{action}.{entity}" if isinstance(action, str) and isinstance(entity, str) else None
        event_id = str(event_id)[:128] if isinstance(event_id, (str, int)) and event_id else body_id(body)
        crm = rules.crm.pipedrive
        previous = payload.get("previous")

        def events() -> list[dict[str, Any]]:
            if action not in _CREATED | _CHANGED or entity not in ("deal", "person"):
                return []  # deletions, merges, activities, notes, organisations: accepted, nothing to do
            data = need(current, dict, "data" if custom_key else "current")
            before = need(previous, dict, "previous") if action in _CHANGED and previous is not None else {}
            custom = _custom(data, custom_key)
            if entity == "person":
                kind_ = "contact.created" if action in _CREATED else "contact.updated"
                return [{"type": kind_, "contact": _person(data, custom, crm)}]
            deal = _deal(data, custom, crm)
            person = _deal_person(data, crm)
            event: dict[str, Any] = {"type": _deal_event(action, data, before, crm), "deal": deal}
            if person is not None:
                event["contact"] = person
            return [event]

        return reading(event_id, kind, events)


def _v1_id(meta: dict[str, Any]) -> str | None:
    """v1 has no delivery id; its object, change time and webhook name one change, retries included."""
    parts = [meta.get(k) for k in ("webhook_id", "object", "id", "timestamp_micro")]
    return ":".join(str(p) for p in parts) if all(isinstance(p, (str, int)) for p in parts) else None


def _custom(data: dict[str, Any], key: str | None) -> dict[str, Any]:
    if key is None:
        return {k: v for k, v in data.items() if _CUSTOM.match(k) and v is not None}
    found = need(data.get(key) or {}, dict, f"data.{key}")
    return {k: v for k, v in found.items() if v is not None}


def _deal_event(action: str, data: dict[str, Any], before: dict[str, Any], crm: CrmMapping) -> str:
    if action in _CREATED:
        return "deal.created"
    status = crm.status(data.get("status"), _STATUSES)
    if (
        "status" in before
        and crm.status(before.get("status"), _STATUSES) != status
        and status in ("won", "lost")
    ):
        return f"deal.{status}"
    if "stage_id" in before and before.get("stage_id") != data.get("stage_id"):
        return "deal.stage_changed"
    return "deal.updated"


def _deal(data: dict[str, Any], custom: dict[str, Any], crm: CrmMapping) -> dict[str, Any]:
    owner = data.get("owner_name") or data.get("owner_id") or data.get("user_id")
    if isinstance(owner, dict):
        owner = owner.get("name") or owner.get("id")
    known = {
        "id": ident(data.get("id"), "id"),
        "title": data.get("title"),
        "stage": crm.stage(data.get("stage_id")),
        "status": crm.status(data.get("status"), _STATUSES),
        "amount": data.get("value"),
        "currency": data.get("currency"),
        "owner": None if owner is None else str(owner),
        "probability": percent(data.get("probability")),
        "pipeline_id": data.get("pipeline_id"),
        "lost_reason": crm.lost_reason(data.get("lost_reason")),
    }
    return {**custom, **compact(known), **crm.deal_fields({**data, **custom})}


def _deal_person(data: dict[str, Any], crm: CrmMapping) -> dict[str, Any] | None:
    """The deal's person: v1 sends its id and name, sometimes the person itself; v2 only its id."""
    person = data.get("person_id")
    if person is None:
        return None
    if isinstance(person, dict):
        return _person({**person, "id": person.get("value")}, {}, crm)
    return compact({"id": ident(person, "person_id"), "name": data.get("person_name")})


def _person(data: dict[str, Any], custom: dict[str, Any], crm: CrmMapping) -> dict[str, Any]:
    known = {
        "id": ident(data.get("id"), "id"),
        "name": data.get("name"),
        "email": _primary(data.get("emails", data.get("email")), "email"),
        "phone": _primary(data.get("phones", data.get("phone")), "phone"),
        "company": data.get("org_name"),
    }
    return {**custom, **compact(known), **crm.contact_fields({**data, **custom})}


def _primary(values: Any, field: str) -> str | None:
    """The primary address of Pipedrive's list of `{value, primary, label}`, or the first."""
    if values is None or isinstance(values, str):
        return values or None
    items = [v for v in need(values, list, field) if isinstance(v, dict) and v.get("value")]
    chosen = next((v for v in items if v.get("primary")), items[0] if items else None)
    if chosen is None:
        return None
    value = chosen["value"]
    if not isinstance(value, str):
        raise Unreadable(f"{field}: expected text addresses", field)
    return value
