"""Bitrix24 events (`ONCRMDEALUPDATE`, `ONCRMCONTACTADD`, …): form-encoded PHP nested keys, checked by the
application token in `auth[application_token]`.

Bitrix24 sends only the object's id (`data[FIELDS][ID]`) and expects the rest to be read back from its REST
API, which Cadence does not call. So a deal event says only "this deal changed": for a deal Cadence knows it
records the change (deal.updated), and for a deal seen for the first time the engine refuses it (422), as
it needs the contact. Fields Bitrix24 does send beside the id (`data[FIELDS][STAGE_ID]`, `[CONTACT_ID]`,
`[TITLE]`, `UF_CRM_…`; an integration may add them) are read. A stage change cannot be told from an update
without the stage before it, so no deal.stage_changed comes from here: a cadence that enrolls on one needs the
full deal, e.g. from a Bitrix24 robot posting to /webhooks/generic.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Any

from cadence.crm.forms import FormError, parse_form
from cadence.crm.mapping import CrmMapping, Status, compact, ident, need, percent, reading, unreadable
from cadence.inbox import Reading, body_id
from cadence.settings import Settings

if TYPE_CHECKING:
    from cadence.crm import Delivery
    from cadence.rules import RuleSet

#: The final stages of every Bitrix24 deal funnel; funnels after the first prefix them (`C1:WON`).
_STATUSES: dict[str, Status] = {"WON": "won", "LOSE": "lost", "APOLOGY": "lost"}
_EVENTS = {
    "ONCRMDEALADD": "deal.created",
    "ONCRMDEALUPDATE": "deal.updated",
    "ONCRMCONTACTADD": "contact.created",
    "ONCRMCONTACTUPDATE": "contact.updated",
}


class Bitrix24:
    name = "bitrix24"
    credential = "auth[application_token]"

    def verify(self, delivery: Delivery, settings: Settings, now: float) -> str | None:
        if not settings.bitrix24_application_token:
            return "Bitrix24 events are refused: BITRIX24_APPLICATION_TOKEN is not set"
        try:
            auth = parse_form(delivery.body).get("auth")
        except FormError as exc:
            return f"cannot find auth[application_token] in a body that is not a form: {exc}"
        token = auth.get("application_token") if isinstance(auth, dict) else None
        if not isinstance(token, str) or not token:
            return "Bitrix24 events carry auth[application_token]; this one has none"
        same = hmac.compare_digest(token.encode(), settings.bitrix24_application_token.encode())
        return None if same else "wrong Bitrix24 application token"

    def read(self, body: bytes, rules: RuleSet) -> Reading:
        event_id = body_id(body)
        try:
            form = parse_form(body)
        except FormError as exc:
            return unreadable(event_id, None, str(exc), exc.field or "body")
        name = form.get("event")
        if not isinstance(name, str) or not name:
            return unreadable(event_id, None, "no `event` field: not a Bitrix24 event", "event")
        kind = _EVENTS.get(name.upper())
        crm = rules.crm.bitrix24

        def events() -> list[dict[str, Any]]:
            if kind is None:
                return []  # leads, companies, deletions, …: accepted, nothing to do
            data = need(form.get("data"), dict, "data")
            fields = need(data.get("FIELDS"), dict, "data[FIELDS]")
            if kind.startswith("contact."):
                return [{"type": kind, "contact": _contact(fields, crm)}]
            event = {"type": kind, "deal": _deal(fields, crm)}
            if fields.get("CONTACT_ID") not in (None, "", "0"):
                event["contact"] = {"id": ident(fields["CONTACT_ID"], "data[FIELDS][CONTACT_ID]")}
            return [event]

        return reading(event_id, name[:64], events)


def _custom(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if k.startswith("UF_") and v not in (None, "")}


def _deal(fields: dict[str, Any], crm: CrmMapping) -> dict[str, Any]:
    stage = fields.get("STAGE_ID")
    custom = _custom(fields)
    known = {
        "id": ident(fields.get("ID"), "data[FIELDS][ID]"),
        "title": fields.get("TITLE"),
        "stage": crm.stage(stage),
        "status": _status(stage, crm),
        "amount": fields.get("OPPORTUNITY") or None,
        "currency": fields.get("CURRENCY_ID"),
        "owner": fields.get("ASSIGNED_BY_ID"),
        "probability": percent(fields.get("PROBABILITY") or None),
        "category_id": fields.get("CATEGORY_ID"),
    }
    return {**custom, **compact(known), **crm.deal_fields(fields)}


def _status(stage: Any, crm: CrmMapping) -> Status | None:
    """WON, LOSE and APOLOGY end every funnel, also as `C1:WON`; a stage the mapping names wins."""
    if not isinstance(stage, str) or not stage:
        return None
    return crm.status(stage, {}) or _STATUSES.get(stage.rpartition(":")[2]) or "open"


def _contact(fields: dict[str, Any], crm: CrmMapping) -> dict[str, Any]:
    parts = [fields.get(k) for k in ("NAME", "SECOND_NAME", "LAST_NAME")]
    name = " ".join(p for p in parts if isinstance(p, str) and p) or None
    known = {
        "id": ident(fields.get("ID"), "data[FIELDS][ID]"),
        "name": name,
        "email": _first(fields.get("EMAIL"), "EMAIL"),
        "phone": _first(fields.get("PHONE"), "PHONE"),
        "title": fields.get("POST"),
    }
    return {**_custom(fields), **compact(known), **crm.contact_fields(fields)}


def _first(values: Any, field: str) -> Any:
    """The first of Bitrix24's multi-fields: `EMAIL[0][VALUE]=…`."""
    if values is None or isinstance(values, str):
        return values or None
    items = need(values, list, f"data[FIELDS][{field}]")
    return next((v.get("VALUE") for v in items if isinstance(v, dict) and v.get("VALUE")), None)
