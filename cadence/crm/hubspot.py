"""HubSpot webhook subscriptions: a JSON array of events, signed v1 or v3 with the app's client secret.

HubSpot's events name only the object and the property that changed, never its associations: a deal event
carries no contact, so it acts only on a deal Cadence already knows with its contact; a deal seen for the
first time is refused (422) by the engine, which needs the contact to enroll anyone.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import TYPE_CHECKING, Any

from cadence.crm.mapping import CrmMapping, Status, Unreadable, compact, ident, need, reading, unreadable
from cadence.inbox import Reading, body_id, parse_json
from cadence.settings import Settings

if TYPE_CHECKING:
    from cadence.crm import Delivery
    from cadence.rules import RuleSet

#: The stages of HubSpot's default pipeline, the same in every portal.
_STAGES = {"presentationscheduled": "proposal_sent", "contractsent": "proposal_sent"}
_STATUSES: dict[str, Status] = {"closedwon": "won", "closedlost": "lost"}
#: HubSpot's own deal and contact properties with a Cadence name.
_DEAL_PROPERTIES = {
    "dealname": "title",
    "amount": "amount",
    "deal_currency_code": "currency",
    "hubspot_owner_id": "owner",
    "hs_deal_stage_probability": "probability",
    "closed_lost_reason": "lost_reason",
}
_CONTACT_PROPERTIES = {
    "email": "email",
    "phone": "phone",
    "mobilephone": "mobile",
    "company": "company",
    "jobtitle": "title",
    "country": "country",
    "firstname": "first_name",
    "lastname": "last_name",
}
#: Events one request may carry; HubSpot sends at most 100.
MAX_EVENTS = 1000


class HubSpot:
    name = "hubspot"
    credential = "X-HubSpot-Signature"

    def verify(self, delivery: Delivery, settings: Settings, now: float) -> str | None:
        secret = settings.hubspot_client_secret
        if not secret:
            return "HubSpot webhooks are refused: HUBSPOT_CLIENT_SECRET is not set"
        headers = delivery.headers
        if "x-hubspot-signature-v3" in headers:
            return _verify_v3(delivery, secret, now, settings.hubspot_tolerance_seconds)
        signature = headers.get("x-hubspot-signature")
        if not signature:
            return "no X-HubSpot-Signature-v3 or X-HubSpot-Signature header"
        version = headers.get("x-hubspot-signature-version", "v1").lower()
        if version == "v1":
            source = secret.encode() + delivery.body
        elif version == "v2":
            source = secret.encode() + delivery.method.encode() + delivery.url.encode() + delivery.body
        else:
            return f"unknown X-HubSpot-Signature-Version {version[:10]!r}; v1, v2 and v3 are known"
        expected = hashlib.sha256(source).hexdigest()
        return None if hmac.compare_digest(expected, signature.lower()) else "wrong HubSpot signature"

    def read(self, body: bytes, rules: RuleSet) -> Reading:
        try:
            payload = parse_json(body)
        except (UnicodeDecodeError, ValueError) as exc:
            return unreadable(body_id(body), None, f"body is not JSON that can be stored: {exc}")
        if not isinstance(payload, list) or not all(isinstance(e, dict) for e in payload):
            return unreadable(body_id(body), None, "expected HubSpot's JSON array of event objects")
        ids = [e.get("eventId") for e in payload]
        event_id = _delivery_id(ids) if ids and all(isinstance(i, (int, str)) for i in ids) else body_id(body)
        kinds = sorted({t for e in payload if isinstance(t := e.get("subscriptionType"), str)})
        crm = rules.crm.hubspot

        def events() -> list[dict[str, Any]]:
            if len(payload) > MAX_EVENTS:
                raise Unreadable(f"over {MAX_EVENTS} events in one request", "body")
            return [e for i, one in enumerate(payload) if (e := _event(one, f"{i}", crm)) is not None]

        return reading(event_id, ",".join(kinds) or None, events)


def _verify_v3(delivery: Delivery, secret: str, now: float, tolerance: int) -> str | None:
    stamp = delivery.headers.get("x-hubspot-request-timestamp", "")
    if not stamp.isdigit() or len(stamp) > 16:
        return "X-HubSpot-Signature-v3 needs X-HubSpot-Request-Timestamp in milliseconds"
    if abs(now - int(stamp) / 1000) > tolerance:
        return f"X-HubSpot-Request-Timestamp is more than {tolerance} seconds from now"
    source = delivery.method.encode() + delivery.url.encode() + delivery.body + stamp.encode()
    expected = base64.b64encode(hmac.new(secret.encode(), source, hashlib.sha256).digest()).decode()
    given = delivery.headers["x-hubspot-signature-v3"]
    return None if hmac.compare_digest(expected.encode(), given.encode()) else "wrong HubSpot signature"


def _delivery_id(ids: list[Any]) -> str:
    """HubSpot's event id, or for a batch its ids together: a retried batch is the same delivery."""
    joined = ",".join(str(i) for i in ids)
    return joined if len(joined) <= 128 else "hubspot:" + hashlib.sha256(joined.encode()).hexdigest()


def _event(one: dict[str, Any], at: str, crm: CrmMapping) -> dict[str, Any] | None:
    kind = one.get("subscriptionType")
    subject, _, change = kind.partition(".") if isinstance(kind, str) else ("", "", "")
    if subject not in ("deal", "contact") or change not in ("creation", "propertyChange"):
        return None  # deletions, merges, associations, companies, tickets: accepted, nothing to do
    object_id = ident(one.get("objectId"), f"{at}.objectId")
    fields: dict[str, Any] = {}
    name = one.get("propertyName")
    if change == "propertyChange":
        name = need(name, str, f"{at}.propertyName")
        value = one.get("propertyValue")
        native = _DEAL_PROPERTIES if subject == "deal" else _CONTACT_PROPERTIES
        fields = {native.get(name, name): value, **_mapped(crm, subject, {name: value})}
    if subject == "contact":
        kind = "contact.created" if change == "creation" else "contact.updated"
        return {"type": kind, "contact": compact({"id": object_id, **fields})}
    deal: dict[str, Any] = {"id": object_id, **fields}
    if change == "creation":
        return {"type": "deal.created", "deal": deal}
    if name != "dealstage":
        if "lost_reason" in deal:
            deal["lost_reason"] = crm.lost_reason(deal["lost_reason"])
        return {"type": "deal.updated", "deal": compact(deal)}
    stage = deal.pop("dealstage")
    deal.update(stage=crm.stage(stage, _STAGES), status=crm.status(stage, _STATUSES) or "open")
    return {
        "type": f"deal.{deal['status']}" if deal["status"] != "open" else "deal.stage_changed",
        "deal": deal,
    }


def _mapped(crm: CrmMapping, subject: str, found: dict[str, Any]) -> dict[str, Any]:
    return crm.deal_fields(found) if subject == "deal" else crm.contact_fields(found)
