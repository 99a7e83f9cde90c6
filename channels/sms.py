"""SMS: short text messages; the outbox provider appends one JSON line per touch."""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import phonenumbers

from channels import Channel, Message, Receipt

_MOBILE = (phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE_OR_MOBILE)


def mobile_number(contact: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(the contact's mobile number in E.164, None) or (None, why there is none).

    The CRM's `mobile` field comes first, then `phone`; a number without a country code is read in the
    contact's `country`.
    """
    raw = contact.get("mobile") or contact.get("phone")
    if not raw:
        return None, "contact has no mobile number"
    region = str(contact.get("country") or "").upper() or None
    try:
        number = phonenumbers.parse(str(raw), region)
    except phonenumbers.NumberParseException:
        return None, f"contact's phone {raw!r} is not a phone number"
    if not phonenumbers.is_valid_number(number):
        return None, f"contact's phone {raw!r} is not a valid number"
    if phonenumbers.number_type(number) not in _MOBILE:
        return None, f"contact's phone {raw!r} is not a mobile number"
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164), None


class SmsOutbox(Channel):
    """Appends to `<outbox>/sms.jsonl`. An append cannot be taken back, so a lost send is not retried."""

    name: ClassVar[str] = "sms"
    requires: ClassVar[str | None] = "phone"
    idempotent: ClassVar[bool] = False

    _lock = threading.Lock()

    def __init__(self, outbox: Path) -> None:
        self.path = outbox / "sms.jsonl"

    def missing(self, contact: Mapping[str, Any]) -> str | None:
        return mobile_number(contact)[1]

    def send(self, message: Message) -> Receipt:
        line = json.dumps(
            {
                "key": message.key,
                "to": mobile_number(message.contact)[0] or message.contact["phone"],
                "from": message.sender.get("phone") or message.sender.get("name"),
                "text": message.parts["text"].strip(),
                "reason": message.reason,
                "at": message.due_at.isoformat(),
            },
            ensure_ascii=False,
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, self.path.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")
        return Receipt("outbox", f"{self.path}#{message.key}")
