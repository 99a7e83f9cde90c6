"""CRM adapters: each reads one CRM's webhook deliveries into Cadence's events and checks its credential.

An adapter is one small module with a `verify` (is the delivery really from that CRM?) and a `read` (what
happened: the delivery's id, its kind, the events in it, or why it cannot be read). The inbox stores every
delivery raw before `read` acts on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from cadence.inbox import Reading, read_generic
from cadence.settings import Settings

if TYPE_CHECKING:
    from cadence.rules import RuleSet


@dataclass(frozen=True)
class Delivery:
    """One webhook request as it arrived."""

    source: str
    method: str
    #: The URL the CRM called, as it knows it: PUBLIC_URL and the request's path and query.
    url: str
    #: Header names in lower case.
    headers: Mapping[str, str]
    query: Mapping[str, str]
    body: bytes


class Adapter(Protocol):
    name: str
    #: Where the credential goes: a header or form field, named in the 401 answer.
    credential: str

    def verify(self, delivery: Delivery, settings: Settings, now: float) -> str | None:
        """None when the delivery carries the CRM's credential, else why not (the answer is 401)."""

    def read(self, body: bytes, rules: RuleSet) -> Reading:
        """The delivery's events; called again on the stored body when a crash cut processing short."""


class Generic:
    """Cadence's own event shape, signed with WEBHOOK_SECRET when it is set."""

    name = "generic"
    credential = "X-Cadence-Signature"

    def verify(self, delivery: Delivery, settings: Settings, now: float) -> str | None:
        from cadence.api import SIGNATURE_HEADER, verify_signature

        if not settings.webhook_secret:
            return None
        header = delivery.headers.get(SIGNATURE_HEADER.lower())
        return verify_signature(
            settings.webhook_secret, header, delivery.body, now, settings.webhook_tolerance_seconds
        )

    def read(self, body: bytes, rules: RuleSet) -> Reading:
        return read_generic(body)


def adapters() -> dict[str, Adapter]:
    """Every source `POST /webhooks/{source}` accepts."""
    from cadence.crm.amocrm import AmoCrm
    from cadence.crm.bitrix24 import Bitrix24
    from cadence.crm.hubspot import HubSpot
    from cadence.crm.pipedrive import Pipedrive

    found: list[Adapter] = [Generic(), Pipedrive(), HubSpot(), AmoCrm(), Bitrix24()]
    return {adapter.name: adapter for adapter in found}
