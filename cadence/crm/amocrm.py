"""amoCRM (Kommo) webhooks: form-encoded PHP nested keys (`leads[status][0][id]=…`), checked by a secret in
the webhook's URL (`?secret=…`).

A lead (deal) delivery names no contact; a contact delivery names its leads (`linked_leads_id`), which links
them. A lead seen for the first time before its contact is refused (422) by the engine, which needs the
contact to enroll anyone; amoCRM retries it, and it goes through once the contact has come.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Any

from cadence.crm.forms import FormError, parse_form
from cadence.crm.mapping import CrmMapping, Status, compact, ident, need, reading, unreadable
from cadence.inbox import Reading, body_id
from cadence.settings import Settings

if TYPE_CHECKING:
    from cadence.crm import Delivery
    from cadence.rules import RuleSet

#: The two statuses every amoCRM pipeline has, with the same ids everywhere.
_STATUSES: dict[str, Status] = {"142": "won", "143": "lost"}
#: Contact fields amoCRM keeps as custom fields with a fixed code.
_CODES = {"PHONE": "phone", "EMAIL": "email", "POSITION": "title"}
#: Actions on leads and contacts that change something Cadence keeps; the rest are recorded only.
_LEAD_ACTIONS = ("add", "update", "status", "responsible")
_CONTACT_ACTIONS = ("add", "update")


class AmoCrm:
    name = "amocrm"
    credential = "secret"

    def verify(self, delivery: Delivery, settings: Settings, now: float) -> str | None:
        if not settings.amocrm_secret:
            return "amoCRM webhooks are refused: AMOCRM_SECRET is not set"
        given = delivery.query.get("secret")
        if not given:
            return "amoCRM webhooks need ?secret=… in the webhook URL"
        same = hmac.compare_digest(given.encode(), settings.amocrm_secret.encode())
        return None if same else "wrong amoCRM webhook secret"

    def read(self, body: bytes, rules: RuleSet) -> Reading:
        event_id = body_id(body)
        try:
            form = parse_form(body)
        except FormError as exc:
            return unreadable(event_id, None, str(exc), exc.field or "body")
        kinds = sorted(
            f"{entity}.{action}"
            for entity, actions in form.items()
            if entity != "account" and isinstance(actions, dict)
            for action in actions
        )
        crm = rules.crm.amocrm

        def events() -> list[dict[str, Any]]:
            found: list[dict[str, Any]] = []
            for action in _LEAD_ACTIONS:
                for i, lead in enumerate(_items(form, "leads", action)):
                    found.append(_lead_event(action, need(lead, dict, f"leads[{action}][{i}]"), crm))
            for action in _CONTACT_ACTIONS:
                for i, contact in enumerate(_items(form, "contacts", action)):
                    found.extend(
                        _contact_events(action, need(contact, dict, f"contacts[{action}][{i}]"), crm)
                    )
            return found

        return reading(event_id, ",".join(kinds)[:64] or None, events)


def _items(form: dict[str, Any], entity: str, action: str) -> list[Any]:
    actions = form.get(entity)
    if actions is None:
        return []
    items = need(actions, dict, entity).get(action, [])
    return list(need(items, list, f"{entity}[{action}]"))


def _lead_event(action: str, lead: dict[str, Any], crm: CrmMapping) -> dict[str, Any]:
    custom = _custom(lead.get("custom_fields"), "custom_fields")
    status_id = lead.get("status_id")
    known = {
        "id": ident(lead.get("id"), "id"),
        "title": lead.get("name"),
        "stage": crm.stage(status_id),
        "status": crm.status(status_id, _STATUSES) or ("open" if status_id else None),
        "amount": lead.get("price") or None,
        "owner": lead.get("responsible_user_id"),
        "pipeline_id": lead.get("pipeline_id"),
        "lost_reason": crm.lost_reason(lead.get("loss_reason_id")),
    }
    deal = {**custom, **compact(known), **crm.deal_fields({**lead, **custom})}
    kind = {"add": "deal.created"}.get(action, "deal.updated")
    if action == "status" and lead.get("old_status_id") != status_id:
        status = deal.get("status")
        kind = f"deal.{status}" if status in ("won", "lost") else "deal.stage_changed"
    return {"type": kind, "deal": deal}


def _contact_events(action: str, contact: dict[str, Any], crm: CrmMapping) -> list[dict[str, Any]]:
    """The contact, and one event per lead it is linked to, so each deal knows its contact."""
    custom = _custom(contact.get("custom_fields"), "custom_fields")
    coded = {
        _CODES[f["code"]]: _value(f.get("values"))
        for f in need(contact.get("custom_fields") or [], list, "custom_fields")
        if isinstance(f, dict) and f.get("code") in _CODES
    }
    known = {
        "id": ident(contact.get("id"), "id"),
        "name": contact.get("name"),
        "company": contact.get("company_name"),
        **coded,
    }
    data = {**custom, **compact(known), **crm.contact_fields({**contact, **custom})}
    linked = contact.get("linked_leads_id") or []
    leads = list(linked.values()) if isinstance(linked, dict) else need(linked, list, "linked_leads_id")
    kind = "contact.created" if action == "add" else "contact.updated"
    if not leads:
        return [{"type": kind, "contact": data}]
    return [
        {
            "type": kind if i == 0 else "contact.updated",
            "contact": data,
            "deal": {"id": ident(lead, "linked_leads_id")},
        }
        for i, lead in enumerate(leads)
    ]


def _custom(fields: Any, where: str) -> dict[str, Any]:
    """Custom fields by id, from `[{id, name, values: [{value, enum}]}]`; one value, or several as a list."""
    out: dict[str, Any] = {}
    for i, field in enumerate(need(fields or [], list, where)):
        field = need(field, dict, f"{where}[{i}]")
        out[ident(field.get("id"), f"{where}[{i}][id]")] = _value(field.get("values"))
    return out


def _value(values: Any) -> Any:
    items = [
        v.get("value") if isinstance(v, dict) else v
        for v in (values if isinstance(values, list) else [values])
    ]
    return items[0] if len(items) == 1 else items
