"""SMS: short text messages; the outbox provider appends one JSON line per touch."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import ClassVar

from channels import Channel, Message, Receipt


class SmsOutbox(Channel):
    """Appends to `<outbox>/sms.jsonl`. An append cannot be taken back, so a lost send is not retried."""

    name: ClassVar[str] = "sms"
    requires: ClassVar[str | None] = "phone"
    idempotent: ClassVar[bool] = False

    _lock = threading.Lock()

    def __init__(self, outbox: Path) -> None:
        self.path = outbox / "sms.jsonl"

    def send(self, message: Message) -> Receipt:
        line = json.dumps(
            {
                "key": message.key,
                "to": message.contact["phone"],
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
