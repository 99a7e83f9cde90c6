"""Letters on paper: the template is the body; the channel adds the page, the sender and the address block."""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import ClassVar

from channels import Channel, Message, Receipt, write_atomically

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
@page {{ size: A4; margin: 20mm 20mm 20mm 25mm; }}
body {{ font-family: serif; font-size: 11pt; line-height: 1.4; }}
.sender {{ font-size: 8pt; }}
.address {{ margin-top: 10mm; height: 40mm; white-space: pre-line; }}
.date {{ text-align: right; margin-bottom: 8mm; }}
</style></head>
<body>
<div class="sender">{sender}</div>
<div class="address">{address}</div>
<div class="date">{date}</div>
{body}
</body></html>
"""


def page(message: Message) -> str:
    contact = message.contact
    sender = message.sender
    recipient = "\n".join(x for x in (contact.get("name"), contact.get("company"), contact["address"]) if x)
    return _PAGE.format(
        title=escape(f"Letter {message.key}"),
        sender=escape(" · ".join(x for x in (sender.get("company"), sender.get("address")) if x)),
        address=escape(recipient),
        date=escape(message.local_date.isoformat()),
        body=message.parts["html"],
    )


class LetterOutbox(Channel):
    """Writes `<outbox>/letters/<touch key>.html`, one printable page per letter."""

    name: ClassVar[str] = "letter"
    requires: ClassVar[str | None] = "address"
    idempotent: ClassVar[bool] = True

    def __init__(self, outbox: Path) -> None:
        self.folder = outbox / "letters"

    def send(self, message: Message) -> Receipt:
        path = self.folder / f"{message.key}.html"
        write_atomically(path, page(message).encode("utf-8"))
        return Receipt("outbox", str(path))
