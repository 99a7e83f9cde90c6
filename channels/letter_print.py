"""Letters through a print-and-mail API in Lob's shape: POST <url>/letters with the whole page as `file`.

The provider keeps each Idempotency-Key (the touch key), so a send repeated after a lost answer leaves one
letter.

Addresses are passed as written, not parsed: a CRM's free-text address has no reliable city or postcode
to cut out. The first line is `address_line1`, the others `address_line2` joined with ", "; a contact's own
`address_city`, `address_state`, `address_zip` and `address_country` CRM fields are passed when present, and
`country` stands in for `address_country`. Lob accepts this for addresses outside the US; US addresses need
those structured fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import httpx

from cadence import signing
from channels import Channel, DeliveryError, Message, RateLimited, Receipt, TransientError
from channels.letter_pdf import lines, page
from channels.limits import Limits

if TYPE_CHECKING:
    from cadence.settings import Settings

#: Requests to the print API in any window of WINDOW_SECONDS, across every worker (Lob allows 150 per 5 s).
REQUESTS_PER_WINDOW = 150
WINDOW_SECONDS = 5
#: Seconds to wait after a 429 that gives no Retry-After in seconds.
DEFAULT_RETRY_AFTER_SECONDS = 60.0
#: Characters of a description the API keeps.
DESCRIPTION_LIMIT = 255
#: Structured address fields a contact may carry from the CRM, passed through as they are.
_ADDRESS_FIELDS = ("address_city", "address_state", "address_zip", "address_country")


def address(
    name: str | None, company: str | None, text: str | None, fields: Mapping[str, Any]
) -> dict[str, str]:
    """One side of a letter in Lob's fields: the name, the company, the address lines as written."""
    written = lines(text)
    found = {
        "name": name or "",
        "company": company or "",
        "address_line1": written[0] if written else "",
        "address_line2": ", ".join(written[1:]),
        **{k: str(fields[k]) for k in _ADDRESS_FIELDS if fields.get(k)},
    }
    if "address_country" not in found and fields.get("country"):
        found["address_country"] = str(fields["country"])
    return {k: v for k, v in found.items() if v}


def _error_message(response: httpx.Response) -> str:
    """What the API said was wrong: Lob's `error.message`, else the start of the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    if isinstance(error, str):
        return error
    return response.text[:200]


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(float(response.headers.get("Retry-After", "")), 1.0)
    except ValueError:
        return DEFAULT_RETRY_AFTER_SECONDS


class PrintApiLetters(Channel):
    """Sends each letter to the print API, which prints, posts and dedupes it by the touch key."""

    name: ClassVar[str] = "letter"
    requires: ClassVar[str | None] = "address"
    idempotent: ClassVar[bool] = True

    def __init__(self, settings: Settings, limits: Limits) -> None:
        if not settings.print_api_url or not settings.print_api_key:
            raise ValueError("LETTER_PROVIDER=print-api needs PRINT_API_URL and PRINT_API_KEY")
        self.url = f"{settings.print_api_url.rstrip('/')}/letters"
        self.key = settings.print_api_key
        self.timeout = settings.print_timeout_seconds
        self.sender = address(settings.sender_name, settings.sender_company, settings.sender_address, {})
        self.limit = limits.per_window("print-api", REQUESTS_PER_WINDOW, WINDOW_SECONDS)
        self.signing_key = signing.secret_key(settings)

    def payload(self, message: Message) -> dict[str, Any]:
        contact = message.contact
        return {
            "description": f"{message.key}: {message.reason}"[:DESCRIPTION_LIMIT],
            "to": address(contact.get("name"), contact.get("company"), contact.get("address"), contact),
            "from": self.sender,
            "file": page(message),
            "send_date": message.local_date.isoformat(),
            "color": False,
            "use_type": "marketing",
            "metadata": {"touch_key": message.key},
        }

    def send(self, message: Message) -> Receipt:
        self.limit.check("print API")
        try:
            response = httpx.post(
                self.url,
                json=self.payload(message),
                auth=(self.key, ""),
                headers={"Idempotency-Key": signing.idempotency_key(self.signing_key, message.key)},
                timeout=self.timeout,
            )
        except httpx.TransportError as exc:  # refused, reset, timed out: the key makes a retry safe
            raise TransientError(f"print API unreachable: {exc!r}") from exc
        status = response.status_code
        if status == 429:
            raise RateLimited(
                f"print API: too many requests: {_error_message(response)}", _retry_after(response)
            )
        if status >= 500:
            raise TransientError(f"print API answered {status}: {_error_message(response)}")
        if status >= 400:
            raise DeliveryError(f"print API refused the letter ({status}): {_error_message(response)}")
        if status not in (200, 201):
            raise DeliveryError(f"print API answered {status}, not a letter: {_error_message(response)}")
        try:
            body = response.json()
            reference = str(body["id"])
        except (ValueError, KeyError, TypeError) as exc:
            # It may have made the letter: trying again under the same key finds it rather than makes another.
            raise TransientError(f"print API answered {status} without a letter id") from exc
        details = (
            {"expected_delivery_date": body["expected_delivery_date"]}
            if body.get("expected_delivery_date")
            else {}
        )
        return Receipt("print-api", reference, details=details)
