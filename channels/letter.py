"""Letters on paper, kept in the outbox: the template is the body; the page adds sender and address."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from channels import Channel, Message, Receipt, write_atomically
from channels.letter_pdf import page


class LetterOutbox(Channel):
    """Writes `<outbox>/letters/<touch key>.html`, one printable page per letter."""

    name: ClassVar[str] = "letter"
    requires: ClassVar[str | None] = "address"
    idempotent: ClassVar[bool] = True
    batchable: ClassVar[bool] = True

    def __init__(self, outbox: Path) -> None:
        self.folder = outbox / "letters"

    def send(self, message: Message) -> Receipt:
        path = self.folder / f"{message.key}.html"
        write_atomically(path, page(message).encode("utf-8"))
        return Receipt("outbox", str(path))
