"""Email: multipart text + HTML messages; the outbox provider writes one .eml file per touch."""

from __future__ import annotations

from collections.abc import Mapping
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from typing import Any, ClassVar

import jinja2

from cadence.sandbox import TemplateError
from channels import Channel, Message, Receipt, write_atomically


def split_subject(text: str, template: str) -> tuple[str, str]:
    """The text part starts with `Subject: …` and a blank line; the rest is the body."""
    first, _, body = text.partition("\n")
    if not first.lower().startswith("subject:"):
        raise TemplateError(f"{template}.txt: the first line must be 'Subject: …'")
    return first.split(":", 1)[1].strip(), body.lstrip("\n")


def build_message(message: Message, domain: str, headers: Mapping[str, str] | None = None) -> EmailMessage:
    """The multipart text + HTML message; `headers` are added after the standard ones."""
    email = EmailMessage()
    sender = message.sender
    # Address quotes the display name: by hand, a name like "X <other@host>" could pick the recipient.
    email["From"] = Address(display_name=sender.get("name") or "", addr_spec=sender.get("email") or "")
    email["To"] = Address(display_name=message.contact.get("name") or "", addr_spec=message.contact["email"])
    email["Subject"] = message.parts["subject"]
    email["Date"] = format_datetime(message.due_at)
    email["Message-ID"] = f"<touch-{message.key}@{domain}>"
    for name, value in (headers or {}).items():
        email[name] = value
    email.set_content(message.parts["text"])
    email.add_alternative(message.parts["html"], subtype="html")
    return email


class EmailOutbox(Channel):
    """Writes `<outbox>/email/<touch key>.eml`; the same key rewrites the same file."""

    name: ClassVar[str] = "email"
    requires: ClassVar[str | None] = "email"
    idempotent: ClassVar[bool] = True
    batchable: ClassVar[bool] = True

    def __init__(self, outbox: Path) -> None:
        self.folder = outbox / "email"

    def render(self, env: jinja2.Environment, template: str, context: Mapping[str, Any]) -> dict[str, str]:
        parts = super().render(env, template, context)
        parts["subject"], parts["text"] = split_subject(parts["text"], template)
        return parts

    def send(self, message: Message) -> Receipt:
        domain = (message.sender.get("email") or "cadence.local").rpartition("@")[2]
        path = self.folder / f"{message.key}.eml"
        write_atomically(path, bytes(build_message(message, domain)))
        return Receipt("outbox", str(path))
