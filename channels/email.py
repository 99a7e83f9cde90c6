"""Email: multipart text + HTML messages; the outbox provider writes one .eml file per touch."""

from __future__ import annotations

from collections.abc import Mapping
from email.utils import format_datetime
from pathlib import Path
from typing import Any, ClassVar

import jinja2

from cadence.sandbox import TemplateError
from channels import Channel, Message, Receipt, mime, write_atomically


def split_subject(text: str, template: str) -> tuple[str, str]:
    """The text part starts with `Subject: …` and a blank line; the rest is the body."""
    first, _, body = text.partition("\n")
    if not first.lower().startswith("subject:"):
        raise TemplateError(f"{template}.txt: the first line must be 'Subject: …'")
    return first.split(":", 1)[1].strip(), body.lstrip("\n")


def sender_domain(message: Message) -> str:
    """The domain of the sender's address: the message ids' right-hand side."""
    return (message.sender.get("email") or "cadence.local").rpartition("@")[2]


def message_id(message: Message, domain: str) -> str:
    return f"<touch-{message.key}@{domain}>"


def build_message(
    message: Message, domain: str, headers: Mapping[str, str] | None = None, linesep: str = "\n"
) -> bytes:
    """The multipart text + HTML message; `headers` are added after the standard ones."""
    sender = message.sender
    # Names are quoted or encoded whole: by hand, a name like "X <other@host>" could pick the recipient.
    from_ = mime.address(sender.get("name") or "", sender.get("email") or "", "sender")
    to = mime.address(message.contact.get("name") or "", message.contact.get("email") or "", "contact")
    lines = [
        mime.structured("From", from_, linesep),
        mime.structured("To", to, linesep),
        mime.header("Subject", message.parts["subject"], linesep),
        f"Date: {format_datetime(message.due_at)}",
        f"Message-ID: {message_id(message, domain)}",
        *(mime.structured(name, value, linesep) for name, value in (headers or {}).items()),
    ]
    text, html = message.parts["text"], message.parts["html"]
    return mime.message(lines, text, html, boundary_seed=message.key, linesep=linesep)


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
        domain = sender_domain(message)
        path = self.folder / f"{message.key}.eml"
        write_atomically(path, build_message(message, domain))
        return Receipt("outbox", str(path))
