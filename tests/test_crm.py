"""CRM webhooks through the real app: each CRM's recorded deliveries, its authentication, duplicates, and
mangled bodies; the mapping file that makes them read in Cadence's words."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from fuzz_strategies import GENERIC_BODY, mangled_bodies
from harness import REPO, Harness, make_settings, start_harness
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlmodel import col, select
from starlette.requests import Request
from starlette.testclient import TestClient

from cadence import rules, store
from cadence.api import path_and_query
from cadence.crm import adapters
from cadence.crm.forms import FormError, parse_form
from cadence.crm.mapping import CrmMap
from cadence.errors import RulesError
from cadence.events import ContactData, DealData, Event
from cadence.models import Contact, Deal, InboundEvent

FIXTURES = Path(__file__).parent / "fixtures" / "crm_webhooks"
#: HubSpot's documented example: this client secret signs contact_creation_v1_signed.json as below.
HUBSPOT_SECRET = "yyyyyyyy-yyyy-yyyy-yyyy-yyyyyyyyyyyy"
HUBSPOT_EXAMPLE_SIGNATURE = "232db2615f3d666fe21a8ec971ac7b5402d33b9a925784df3ca654d05f4817de"
#: The application tokens in the two Bitrix24 recordings (two different portals).
BITRIX_CONTACT_TOKEN = "3c6c9248ec54af6bea1159b43ee0ab32"
BITRIX_DEAL_TOKEN = "51856fefc120afa4b628cc82d3935cce"
AMO_SECRET = "amo-s3cret"
PIPEDRIVE = ("cadence", "pässwort-1")
CREDENTIALS: dict[str, Any] = {
    "pipedrive_user": PIPEDRIVE[0],
    "pipedrive_password": PIPEDRIVE[1],
    "hubspot_client_secret": HUBSPOT_SECRET,
    "amocrm_secret": AMO_SECRET,
    "bitrix24_application_token": BITRIX_DEAL_TOKEN,
}
FORM = {"content-type": "application/x-www-form-urlencoded"}


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def test_fixtures_are_the_shared_recordings_byte_for_byte() -> None:
    shared = REPO.parent / "shared" / "fixtures" / "crm_webhooks"
    if not shared.is_dir():
        pytest.skip("the shared fixtures are not beside this clone")
    for path in sorted(FIXTURES.rglob("*")):
        if path.is_file():
            assert path.read_bytes() == (shared / path.relative_to(FIXTURES)).read_bytes(), path


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    started: list[Harness] = []

    def make(**overrides: Any) -> Harness:
        harness = start_harness(make_settings(tmp_path / str(len(started)), **{**CREDENTIALS, **overrides}))
        started.append(harness)
        return harness

    yield make
    for harness in started:
        harness.stop()


@pytest.fixture
def h(start: Callable[..., Harness]) -> Harness:
    return start()


# --- sending as each CRM does -----------------------------------------------------------------------------


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"authorization": f"Basic {token}", "content-type": "application/json"}


def pipedrive(h: Harness, body: bytes, auth: tuple[str, str] = PIPEDRIVE) -> Any:
    return h.client.post("/webhooks/pipedrive", content=body, headers=basic(*auth))


def hubspot_v1(h: Harness, body: bytes, secret: str = HUBSPOT_SECRET) -> Any:
    signature = hashlib.sha256(secret.encode() + body).hexdigest()
    headers = {"x-hubspot-signature": signature, "x-hubspot-signature-version": "v1"}
    return h.client.post(
        "/webhooks/hubspot", content=body, headers={**headers, "content-type": "application/json"}
    )


def hubspot_v3(h: Harness, body: bytes, at_ms: int | None = None, secret: str = HUBSPOT_SECRET) -> Any:
    stamp = str(at_ms if at_ms is not None else int(time.time() * 1000))
    url = f"{h.service.settings.public_url}/webhooks/hubspot"
    signed = hmac.new(
        secret.encode(), b"POST" + url.encode() + body + stamp.encode(), hashlib.sha256
    ).digest()
    headers = {
        "x-hubspot-signature-v3": base64.b64encode(signed).decode(),
        "x-hubspot-request-timestamp": stamp,
        "content-type": "application/json",
    }
    return h.client.post("/webhooks/hubspot", content=body, headers=headers)


def amocrm(h: Harness, body: bytes, secret: str | None = AMO_SECRET) -> Any:
    query = f"?secret={quote(secret)}" if secret is not None else ""
    return h.client.post(f"/webhooks/amocrm{query}", content=body, headers=FORM)


def bitrix24(h: Harness, body: bytes) -> Any:
    return h.client.post("/webhooks/bitrix24", content=body, headers=FORM)


def form(fields: dict[str, str]) -> bytes:
    return "&".join(f"{quote(k)}={quote(v)}" for k, v in fields.items()).encode()


def contact(h: Harness, source: str, external_id: str) -> Contact:
    with store.session(h.service.db) as s:
        return s.exec(
            select(Contact).where(Contact.source == source, Contact.external_id == external_id)
        ).one()


def deal(h: Harness, source: str, external_id: str) -> Deal:
    with store.session(h.service.db) as s:
        return s.exec(select(Deal).where(Deal.source == source, Deal.external_id == external_id)).one()


def _deals(h: Harness, source: str) -> list[Deal]:
    with store.session(h.service.db) as s:
        return list(s.exec(select(Deal).where(Deal.source == source)).all())


def cadences(h: Harness) -> list[tuple[str, str]]:
    return [(e.cadence_name, e.status) for e in h.enrollments()]


def accepted(response: Any) -> dict[str, Any]:
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    assert body["duplicate"] is False
    return body


def refused(response: Any, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    assert words in response.json()["error"]["message"], response.json()


def known_deal(h: Harness, source: str, deal_id: str, contact_id: str, **fields: Any) -> None:
    """A deal Cadence already holds with its contact (an earlier delivery, an import)."""
    event = Event(
        type="deal.created",
        contact=ContactData(id=contact_id, name="Анна Петрова", email="anna@example.com"),
        deal=DealData(id=deal_id, stage="appointmentscheduled", status="open", **fields),
    )
    with store.session(h.service.db) as s:
        h.service.engine.handle_event(s, source, event, h.clock())


# --- Pipedrive ----------------------------------------------------------------------------------------------


def test_pipedrive_v2_stage_change_enrolls_the_deal_with_its_fields(h: Harness) -> None:
    answer = accepted(pipedrive(h, fixture("pipedrive/v2_change_deal_stage.json")))

    assert answer["event_id"] == "6ba407fc-006d-4556-9804-8298e584a288"
    assert len(answer["enrolled"]) == 1
    assert cadences(h) == [("open-deal", "active")]
    row = deal(h, "pipedrive", "213973")
    assert (row.title, row.stage, row.status, row.amount, row.currency) == (
        "TESTEMORANGO001",
        "proposal_sent",
        "open",
        112,
        "BRL",
    )
    assert row.probability == pytest.approx(0.01)  # Pipedrive's percent
    assert row.attributes["setup_fee"] == 13  # mapped in rules/crm.yaml
    custom = "3b6419d7a9a8aeb60aff65af19850ad3ea50d172"
    assert row.attributes[custom] == {"currency": "BRL", "type": "monetary", "value": 0.5}
    assert "f0e7dc75928ee7be1d26b6ed65df1e26e944468d" not in row.attributes  # empty fields are not kept
    assert row.contact_id == contact(h, "pipedrive", "176578").id


def _v1(event: str, **current: Any) -> bytes:
    payload = json.loads(fixture("pipedrive/v1_updated_deal.json"))
    payload["event"] = event
    payload["meta"]["timestamp_micro"] += 1
    payload["current"].update(current)
    if event.startswith("added."):
        payload["previous"] = None
    return json.dumps(payload, ensure_ascii=False).encode()


def test_pipedrive_v1_updated_deal_updates_the_deal_it_names(h: Harness) -> None:
    accepted(pipedrive(h, _v1("added.deal", title="Old title", person_id=55, person_name="Анна Петрова")))

    answer = accepted(pipedrive(h, fixture("pipedrive/v1_updated_deal.json")))

    assert answer["enrolled"] == []
    row = deal(h, "pipedrive", "9")
    assert (row.title, row.stage, row.status, row.owner) == ("Updated Deal Title", "1", "open", "Owner Name")
    assert contact(h, "pipedrive", "55").name == "Анна Петрова"
    with store.session(h.service.db) as s:
        kinds = s.exec(select(InboundEvent.type).order_by(col(InboundEvent.id))).all()
    assert kinds == ["added.deal", "updated.deal"]


def _kept_without_contact(h: Harness, source: str, external_id: str, answer: dict[str, Any]) -> None:
    """A deal first seen without its contact is kept, not enrolled: a cadence touches a person."""
    assert answer["enrolled"] == []
    assert deal(h, source, external_id).contact_id is None
    assert cadences(h) == []


def test_a_deal_seen_first_without_its_contact_is_kept_until_one_comes(h: Harness) -> None:
    answer = accepted(pipedrive(h, fixture("pipedrive/v1_updated_deal.json")))
    _kept_without_contact(h, "pipedrive", "9", answer)


def test_pipedrive_v1_stage_then_won_enrolls_then_moves_to_onboarding(h: Harness) -> None:
    accepted(pipedrive(h, _v1("added.deal", person_id=55, person_name="Анна Петрова")))
    payload = json.loads(_v1("updated.deal", stage_id=3, person_id=55))
    payload["meta"]["timestamp_micro"] += 1  # a later change than the one that added the deal
    accepted(pipedrive(h, json.dumps(payload).encode()))
    assert cadences(h) == [("open-deal", "active")]

    payload["meta"]["timestamp_micro"] += 1
    payload["previous"] = dict(payload["current"])
    payload["current"]["status"] = "won"
    accepted(pipedrive(h, json.dumps(payload).encode()))

    assert deal(h, "pipedrive", "9").status == "won"
    assert ("onboarding", "active") in cadences(h)
    assert ("open-deal", "active") not in cadences(h)


def test_pipedrive_v2_person_keeps_non_latin_names_and_mapped_fields(h: Harness) -> None:
    body = {
        "data": {
            "id": 77,
            "name": "Анна Петрова",
            "emails": [
                {"value": "old@example.com", "primary": False},
                {"value": "anna@example.com", "primary": True},
            ],
            "phones": [{"value": "+79161234567", "primary": True}],
            "custom_fields": {
                "3f1b6a2e9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f": "56",
                "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678": "yes",
                "8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b": "executive",
            },
        },
        "previous": None,
        "meta": {"action": "create", "entity": "person", "id": "p-1"},
    }
    accepted(pipedrive(h, json.dumps(body, ensure_ascii=False).encode()))

    row = contact(h, "pipedrive", "77")
    assert (row.name, row.email, row.phone) == ("Анна Петрова", "anna@example.com", "+79161234567")
    assert {k: row.attributes[k] for k in ("age", "sms_consent", "seniority")} == {
        "age": 56,
        "sms_consent": True,
        "seniority": "executive",
    }


@pytest.mark.parametrize(
    ("overrides", "auth", "words"),
    [
        ({}, ("cadence", "wrong"), "wrong Pipedrive"),
        ({}, ("someone", PIPEDRIVE[1]), "wrong Pipedrive"),
        ({"pipedrive_password": None}, PIPEDRIVE, "not set"),
    ],
)
def test_pipedrive_refuses_wrong_or_unset_credentials(
    start: Callable[..., Harness], overrides: dict[str, Any], auth: tuple[str, str], words: str
) -> None:
    h = start(**overrides)
    refused(pipedrive(h, fixture("pipedrive/v2_change_deal_stage.json"), auth), 401, words)
    headers = {"content-type": "application/json"}
    no_auth = h.client.post("/webhooks/pipedrive", content=b"{}", headers=headers)
    assert no_auth.status_code == 401
    assert h.enrollments() == []


# --- HubSpot ------------------------------------------------------------------------------------------------


def test_hubspot_documented_v1_example_verifies_and_creates_the_contact(h: Harness) -> None:
    body = fixture("hubspot/contact_creation_v1_signed.json")
    headers = {
        "x-hubspot-signature": HUBSPOT_EXAMPLE_SIGNATURE,
        "x-hubspot-signature-version": "v1",
        "content-type": "application/json",
    }

    answer = accepted(h.client.post("/webhooks/hubspot", content=body, headers=headers))

    assert answer["event_id"] == "1"
    assert contact(h, "hubspot", "123").external_id == "123"


def test_hubspot_dealstage_change_enrolls_a_known_deal(h: Harness) -> None:
    known_deal(h, "hubspot", "697680835", "hs-c-1")

    answer = accepted(hubspot_v3(h, fixture("hubspot/deal_propertychange_dealstage.json")))

    assert answer["event_id"] == "802835955"
    assert len(answer["enrolled"]) == 1
    row = deal(h, "hubspot", "697680835")
    assert (row.stage, row.status) == ("proposal_sent", "open")
    assert cadences(h) == [("open-deal", "active")]


def test_hubspot_deal_unknown_to_cadence_is_kept_until_its_contact_comes(h: Harness) -> None:
    answer = accepted(hubspot_v3(h, fixture("hubspot/deal_propertychange_dealstage.json")))
    [stored] = _deals(h, "hubspot")
    _kept_without_contact(h, "hubspot", stored.external_id, answer)


def test_hubspot_closedlost_is_a_lost_deal(h: Harness) -> None:
    known_deal(h, "hubspot", "5", "hs-c-1")
    body = [{"eventId": 9, "subscriptionType": "deal.propertyChange", "objectId": 5}]
    body[0] |= {"propertyName": "dealstage", "propertyValue": "closedlost"}

    accepted(hubspot_v1(h, json.dumps(body).encode()))

    assert deal(h, "hubspot", "5").status == "lost"


def test_hubspot_batch_gives_one_event_each(h: Harness) -> None:
    body = [
        {"eventId": 1, "subscriptionType": "contact.creation", "objectId": 1},
        {"eventId": 2, "subscriptionType": "contact.creation", "objectId": 2},
        {"eventId": 3, "subscriptionType": "contact.propertyChange", "objectId": 2}
        | {"propertyName": "age", "propertyValue": "61"},
        {"eventId": 4, "subscriptionType": "company.creation", "objectId": 3},
    ]

    answer = accepted(hubspot_v1(h, json.dumps(body).encode()))

    assert answer["event_id"] == "1,2,3,4"
    assert contact(h, "hubspot", "1").external_id == "1"
    assert contact(h, "hubspot", "2").attributes["age"] == 61


@pytest.mark.parametrize(
    ("send", "words"),
    [
        (lambda h, body: hubspot_v3(h, body, at_ms=int((time.time() - 301) * 1000)), "more than 300 seconds"),
        (lambda h, body: hubspot_v3(h, body, secret="not-the-secret"), "wrong HubSpot signature"),
        (lambda h, body: hubspot_v1(h, body, secret="not-the-secret"), "wrong HubSpot signature"),
        (lambda h, body: h.client.post("/webhooks/hubspot", content=body), "no X-HubSpot-Signature"),
    ],
)
def test_hubspot_refuses_stale_wrong_or_missing_signatures(
    h: Harness, send: Callable[[Harness, bytes], Any], words: str
) -> None:
    refused(send(h, fixture("hubspot/contact_creation_v1_signed.json")), 401, words)


def test_hubspot_refused_when_no_secret_is_set(start: Callable[..., Harness]) -> None:
    h = start(hubspot_client_secret=None)
    refused(hubspot_v1(h, fixture("hubspot/contact_creation_v1_signed.json")), 401, "not set")


# --- amoCRM -------------------------------------------------------------------------------------------------


def _amo_contact(lead_id: str) -> bytes:
    return form(
        {
            "contacts[add][0][id]": "9001",
            "contacts[add][0][name]": "Анна Петрова",
            "contacts[add][0][linked_leads_id][" + lead_id + "]": lead_id,
            "contacts[add][0][custom_fields][0][id]": "100",
            "contacts[add][0][custom_fields][0][code]": "PHONE",
            "contacts[add][0][custom_fields][0][values][0][value]": "+79161234567",
            "contacts[add][0][custom_fields][1][id]": "512001",
            "contacts[add][0][custom_fields][1][values][0][value]": "56",
            "contacts[add][0][custom_fields][2][id]": "512003",
            "contacts[add][0][custom_fields][2][values][0][value]": "1",
        }
    )


def test_amocrm_status_change_enrolls_the_lead_its_contact_named(h: Harness) -> None:
    accepted(amocrm(h, _amo_contact("30267969")))

    answer = accepted(amocrm(h, fixture("amocrm/leads_status_change.txt")))

    assert len(answer["enrolled"]) == 1
    assert cadences(h) == [("open-deal", "active")]
    row = deal(h, "amocrm", "30267969")
    assert (row.title, row.stage, row.status, row.amount, row.owner) == (
        "apple tv 3",
        "proposal_sent",
        "open",
        1,
        "1764433",
    )
    assert row.attributes["lead_type"] == "Lead nou"
    assert row.attributes["device_condition"] == "Zghirieturi minore"
    assert row.attributes["491053"] == "1"  # unmapped custom fields keep their id
    person = contact(h, "amocrm", "9001")
    assert (person.name, person.phone, row.contact_id) == ("Анна Петрова", "+79161234567", person.id)
    assert (person.attributes["age"], person.attributes["sms_consent"]) == (56, True)


def test_amocrm_leads_add_updates_the_lead(h: Harness) -> None:
    accepted(amocrm(h, _amo_contact("30052055")))

    answer = accepted(amocrm(h, fixture("amocrm/leads_add.txt")))

    assert answer["enrolled"] == []
    row = deal(h, "amocrm", "30052055")
    assert (row.title, row.stage, row.attributes["pipeline_id"]) == (
        "TEST MISHA (SORRY)",
        "17944873",
        "936736",
    )


def test_amocrm_won_status_is_a_won_deal(h: Harness) -> None:
    accepted(amocrm(h, _amo_contact("30267969")))
    accepted(amocrm(h, fixture("amocrm/leads_status_change.txt")))
    won = fixture("amocrm/leads_status_change.txt").replace(b"status_id%5D=16525558", b"status_id%5D=142")

    accepted(amocrm(h, won))

    assert deal(h, "amocrm", "30267969").status == "won"
    assert ("onboarding", "active") in cadences(h)


@pytest.mark.parametrize(("secret", "words"), [("wrong", "wrong amoCRM"), (None, "?secret=")])
def test_amocrm_refuses_a_wrong_or_missing_secret(h: Harness, secret: str | None, words: str) -> None:
    refused(amocrm(h, fixture("amocrm/leads_add.txt"), secret), 401, words)


# --- Bitrix24 -----------------------------------------------------------------------------------------------


def test_bitrix24_contact_add_creates_the_contact(start: Callable[..., Harness]) -> None:
    h = start(bitrix24_application_token=BITRIX_CONTACT_TOKEN)

    answer = accepted(bitrix24(h, fixture("bitrix24/oncrmcontactadd_app_event.txt")))

    assert answer["enrolled"] == []
    assert contact(h, "bitrix24", "134806").name is None  # Bitrix24 sends the id only


def test_bitrix24_deal_update_touches_the_known_deal(h: Harness) -> None:
    added = {
        "event": "ONCRMDEALADD",
        "data[FIELDS][ID]": "759",
        "data[FIELDS][TITLE]": "Поставка оборудования",
        "data[FIELDS][STAGE_ID]": "C1:NEW",
        "data[FIELDS][CONTACT_ID]": "134806",
        "data[FIELDS][UF_CRM_PROBABILITY]": "0.4",
        "auth[application_token]": BITRIX_DEAL_TOKEN,
    }
    accepted(bitrix24(h, form(added)))
    before = deal(h, "bitrix24", "759")

    h.clock.advance(timedelta(seconds=60))
    answer = accepted(bitrix24(h, fixture("bitrix24/oncrmdealupdate_app_event.txt")))

    assert answer["enrolled"] == []
    row = deal(h, "bitrix24", "759")
    assert (row.title, row.stage, row.status, row.probability) == (
        "Поставка оборудования",
        "C1:NEW",
        "open",
        0.4,
    )
    assert row.updated_at > before.updated_at
    assert row.contact_id == contact(h, "bitrix24", "134806").id


def test_bitrix24_deal_update_unknown_to_cadence_is_kept_until_its_contact_comes(h: Harness) -> None:
    answer = accepted(bitrix24(h, fixture("bitrix24/oncrmdealupdate_app_event.txt")))
    [stored] = _deals(h, "bitrix24")
    _kept_without_contact(h, "bitrix24", stored.external_id, answer)


@pytest.mark.parametrize(
    ("overrides", "body", "words"),
    [
        ({}, "bitrix24/oncrmcontactadd_app_event.txt", "wrong Bitrix24"),
        ({"bitrix24_application_token": None}, "bitrix24/oncrmdealupdate_app_event.txt", "not set"),
    ],
)
def test_bitrix24_refuses_a_wrong_or_unset_token(
    start: Callable[..., Harness], overrides: dict[str, Any], body: str, words: str
) -> None:
    refused(bitrix24(start(**overrides), fixture(body)), 401, words)


def test_bitrix24_refuses_a_body_without_a_token(h: Harness) -> None:
    refused(bitrix24(h, b"event=ONCRMDEALUPDATE&data%5BFIELDS%5D%5BID%5D=759"), 401, "has none")


# --- every CRM ----------------------------------------------------------------------------------------------


def _senders() -> list[Any]:
    return [
        pytest.param(pipedrive, "pipedrive/v2_change_deal_stage.json", id="pipedrive"),
        pytest.param(hubspot_v1, "hubspot/contact_creation_v1_signed.json", id="hubspot"),
        pytest.param(bitrix24, "bitrix24/oncrmdealupdate_app_event.txt", id="bitrix24"),
    ]


@pytest.mark.parametrize(("send", "name"), _senders())
def test_a_repeated_delivery_is_a_harmless_duplicate(
    h: Harness, send: Callable[[Harness, bytes], Any], name: str
) -> None:
    known_deal(h, "bitrix24", "759", "b-1")
    body = fixture(name)
    first = accepted(send(h, body))
    enrollments = cadences(h)

    again = send(h, body)

    assert again.status_code == 200
    assert again.json() == {
        "event_id": first["event_id"],
        "duplicate": True,
        "queued": False,
        "enrolled": [],
        "ended": [],
    }
    assert cadences(h) == enrollments
    with store.session(h.service.db) as s:
        assert len(s.exec(select(InboundEvent)).all()) == 1


def test_amocrm_repeated_delivery_is_a_harmless_duplicate(h: Harness) -> None:
    accepted(amocrm(h, _amo_contact("30267969")))
    accepted(amocrm(h, fixture("amocrm/leads_status_change.txt")))

    again = amocrm(h, fixture("amocrm/leads_status_change.txt"))

    assert (again.status_code, again.json()["duplicate"]) == (200, True)
    assert cadences(h) == [("open-deal", "active")]


@pytest.mark.parametrize(
    ("send", "body", "kind"),
    [
        (
            pipedrive,
            b'{"event": "added.activity", "current": {"id": 1}, "previous": null, "meta": {}}',
            "added.activity",
        ),
        (
            pipedrive,
            b'{"data": {"id": 1}, "previous": null, "meta": {"action": "delete", "entity": "deal"}}',
            "delete.deal",
        ),
        (
            hubspot_v1,
            b'[{"eventId": 5, "subscriptionType": "company.creation", "objectId": 1}]',
            "company.creation",
        ),
        (amocrm, b"leads%5Bdelete%5D%5B0%5D%5Bid%5D=1", "leads.delete"),
        (
            bitrix24,
            f"event=ONCRMLEADADD&data[FIELDS][ID]=1&auth[application_token]={BITRIX_DEAL_TOKEN}".encode(),
            "ONCRMLEADADD",
        ),
    ],
)
def test_event_types_not_acted_on_are_recorded(
    h: Harness, send: Callable[[Harness, bytes], Any], body: bytes, kind: str
) -> None:
    answer = accepted(send(h, body))

    assert answer["enrolled"] == []
    with store.session(h.service.db) as s:
        row = s.exec(select(InboundEvent)).one()
    assert (row.type, row.status) == (kind, "processed")


BITRIX_AUTH = f"&auth[application_token]={BITRIX_DEAL_TOKEN}".encode()


@pytest.mark.parametrize(
    ("send", "body", "status"),
    [
        (pipedrive, fixture("pipedrive/v2_change_deal_stage.json")[:500], 400),
        (pipedrive, b'{"data": [], "previous": null, "meta": {"action": "change", "entity": "deal"}}', 422),
        (pipedrive, b'{"data": {"id": {"x": 1}}, "meta": {"action": "change", "entity": "deal"}}', 422),
        (
            pipedrive,
            b'{"data": {"id": 1, "value": "lots"}, "meta": {"action": "create", "entity": "deal"}}',
            422,
        ),
        (pipedrive, b"[1, 2]", 400),
        (hubspot_v1, fixture("hubspot/deal_propertychange_dealstage.json")[:-3], 400),
        (hubspot_v1, b'[{"subscriptionType": "deal.creation", "objectId": {}}]', 422),
        (hubspot_v1, b'{"subscriptionType": "deal.creation"}', 400),
        (
            hubspot_v1,
            b'[{"subscriptionType": "contact.propertyChange", "objectId": 1, "propertyName": 5}]',
            422,
        ),
        (amocrm, b"leads%5Bstatus%5B0%5D%5Bid%5D=1", 400),
        (amocrm, b"leads[status]=1&leads[status][0][id]=2", 400),
        (amocrm, b"leads[status]=x", 422),
        (amocrm, b"leads[status][0][id]=1&leads[status][0][price]=much", 422),
        (amocrm, b"leads[add][0][name]=no-id", 422),
        (amocrm, b"a=%ff", 400),
        (amocrm, b"&".join([b"a" + b"[x]" * 20 + b"=1"]), 400),
        (bitrix24, b"event=ONCRMDEALUPDATE&data=5" + BITRIX_AUTH, 422),
        (bitrix24, b"event=ONCRMDEALUPDATE&data[FIELDS][NAME]=x" + BITRIX_AUTH, 422),
        (bitrix24, b"data[FIELDS][ID]=1" + BITRIX_AUTH, 400),
        (bitrix24, b"event=ONCRMDEALUPDATE&data[FIELDS][ID]=1&auth[application_token", 401),
    ],
)
def test_mangled_bodies_get_a_4xx_that_says_why(
    h: Harness, send: Callable[[Harness, bytes], Any], body: bytes, status: int
) -> None:
    lenient = TestClient(h.client.app, raise_server_exceptions=False)
    h.client, strict = lenient, h.client
    try:
        response = send(h, body)
    finally:
        h.client = strict
    assert response.status_code == status, response.text
    assert response.json()["error"]["message"]


# --- reading any body ---------------------------------------------------------------------------------------

SHIPPED = rules.load([REPO / "rules"], REPO / "templates")
BODIES = {
    name: fixture(name)
    for name in (
        "pipedrive/v1_updated_deal.json",
        "pipedrive/v2_change_deal_stage.json",
        "hubspot/contact_creation_v1_signed.json",
        "hubspot/deal_propertychange_dealstage.json",
        "amocrm/leads_status_change.txt",
        "amocrm/leads_add.txt",
        "bitrix24/oncrmcontactadd_app_event.txt",
        "bitrix24/oncrmdealupdate_app_event.txt",
    )
}


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    name = draw(st.sampled_from(sorted(BODIES)))
    body = bytearray(BODIES[name])
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(body)))
        action = draw(st.sampled_from(["cut", "flip", "insert", "delete"]))
        if action == "cut":
            del body[at:]
        elif action == "flip" and at < len(body):
            body[at] = draw(st.sampled_from(b'[]{}"&=%,:0a\x00\xff'))
        elif action == "insert":
            body[at:at] = draw(
                st.sampled_from([b"[", b"]", b"%5B", b"%5D", b'"', b"{}", b"[]", b"null", b"&x"])
            )
        elif at < len(body):
            del body[at : at + draw(st.integers(1, 20))]
    return name, bytes(body)


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(case=mutated())
def test_any_mutated_body_reads_as_events_or_a_4xx(case: tuple[str, bytes]) -> None:
    name, body = case
    reading = adapters()[name.partition("/")[0]].read(body, SHIPPED)

    assert reading.event_id
    if reading.rejection is not None:
        assert 400 <= reading.rejection.status < 500
        assert reading.rejection.message


# --- the mapping file ---------------------------------------------------------------------------------------


def test_without_crm_yaml_the_adapters_own_knowledge_applies(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text("caps: {per_day: null}\n", encoding="utf-8")
    assert rules.load([tmp_path], REPO / "templates").crm == CrmMap()


@pytest.mark.parametrize(
    ("text", "found"),
    [
        (
            "pipedrive:\n  stage:\n    3: proposal_sent\n",
            "crm.yaml:2:3: error: unknown key 'stage' at pipedrive.stage",
        ),
        ("pipedrive: {}\nhubsopt: {}\n", "unknown key 'hubsopt' at hubsopt (hint: did you mean 'hubspot'?)"),
        ("amocrm:\n  statuses:\n    142: wonn\n", "crm.yaml:3:10: error: amocrm.statuses.142"),
        (
            "bitrix24:\n  fields:\n    contact:\n      UF_AGE: {to: 'my age'}\n",
            "bitrix24.fields.contact.UF_AGE",
        ),
        ("hubspot:\n  fields:\n    deal: {a: x, b: x}\n", "x each come from more than one CRM field"),
    ],
)
def test_a_wrong_mapping_is_a_located_error(tmp_path: Path, text: str, found: str) -> None:
    (tmp_path / "crm.yaml").write_text(text, encoding="utf-8")
    with pytest.raises(RulesError) as raised:
        rules.load([tmp_path], REPO / "templates")
    assert found in str(raised.value)


def test_forms_read_php_nested_keys_into_dicts_and_lists() -> None:
    assert parse_form(b"a[0][b]=1&a[1][b]=%D0%AF&c[]=x&c[]=y&d=") == {
        "a": [{"b": "1"}, {"b": "Я"}],
        "c": ["x", "y"],
        "d": "",
    }
    for bad in (b"a[b=1", b"a=1&a=2", b"a=1&a[b]=2", b"[x]=1", b"a=%00", b"a" + b"[b]" * 11 + b"=1"):
        with pytest.raises(FormError):
            parse_form(bad)


# --- mangled bodies for every adapter, through the app --------------------------------------------------

#: A recorded delivery of each CRM, and one in Cadence's own event shape: what mangled bodies start from.
SEEDS = {**BODIES, "generic/event.json": GENERIC_BODY}


def generic(h: Harness, body: bytes) -> Any:
    return h.client.post("/webhooks/generic", content=body, headers={"content-type": "application/json"})


#: How each source's deliveries are sent: signed or authenticated as that CRM does, over the mangled body.
SENDERS: dict[str, Callable[[Harness, bytes], Any]] = {
    "generic": generic,
    "pipedrive": pipedrive,
    "hubspot": hubspot_v1,
    "amocrm": amocrm,
    "bitrix24": bitrix24,
}


def send_mangled(h: Harness, seed: str, body: bytes) -> Any:
    """POST a body mangled from `seed` to the seed's adapter, authenticated as its CRM would."""
    return SENDERS[seed.partition("/")[0]](h, body)


def lenient_harness(tmp_path: Path) -> Harness:
    """A harness whose client hands back a 500 as a response, as a CRM would see it, instead of raising."""
    harness = start_harness(make_settings(tmp_path, **CREDENTIALS))
    harness.client = TestClient(harness.client.app, raise_server_exceptions=False)
    return harness


@pytest.fixture(scope="module")
def lenient(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    harness = lenient_harness(tmp_path_factory.mktemp("mangled"))
    yield harness
    harness.stop()


@settings(max_examples=150, deadline=None, database=None, derandomize=True)
@given(case=mangled_bodies(SEEDS))
def test_a_mangled_body_to_any_adapter_gets_a_4xx_never_a_5xx(
    lenient: Harness, case: tuple[str, bytes]
) -> None:
    seed, body = case
    response = send_mangled(lenient, seed, body)

    assert response.status_code < 300 or 400 <= response.status_code < 500, (seed, body[:300], response.text)
    if response.status_code >= 400:
        assert response.json()["error"]["message"]


@settings(max_examples=500, deadline=None)
@given(
    path=st.text(alphabet=st.sampled_from("/ab?#\\\t\r\n%é~"), max_size=12).map(lambda p: "/webhooks/x" + p),
    query=st.text(alphabet=st.sampled_from("a=&?#%+é\t\r\n "), max_size=12).map(str.encode),
)
def test_a_webhooks_path_and_query_are_read_as_the_request_url_has_them(path: str, query: bytes) -> None:
    """Signatures cover the URL a CRM called: the path and query are read from the request without
    building its URL, and come out as Starlette's `request.url` gives them."""
    scope = {"type": "http", "method": "POST", "path": path, "query_string": query, "headers": [],
             "server": ("127.0.0.1", 8000), "scheme": "http"}  # fmt: skip
    url = Request(scope).url
    expected = url.path + (f"?{url.query}" if url.query else "")
    assert path_and_query(scope) == expected
    # A query that is not UTF-8 (Starlette's URL cannot be built from it) is read, not refused with an error.
    assert path_and_query({**scope, "query_string": b"a=\xff"}).endswith("?a=\ufffd")
