"""Letters printed in-house: each letter waits in the day's print folder; once a day the mailroom gets one PDF
of them all and a CSV manifest to check the envelopes against.

`<outbox>/print/<local date>/<touch key>.html` is the letter's page and `<touch key>.json` what the manifest
needs; `build_batch` writes `<outbox>/print/<local date>.pdf` and `.csv` beside the folder.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from channels import Channel, Message, Receipt, write_atomically
from channels.letter_pdf import address_lines, join_pdf, page, render

if TYPE_CHECKING:
    from cadence.settings import Settings

#: The manifest's columns, one row per letter in the PDF's order; UTF-8 with a BOM, so spreadsheets read it.
MANIFEST_COLUMNS = ("touch_key", "name", "company", "address", "pages", "first_page", "reason")
#: A cell starting with one of these is a formula to a spreadsheet; such cells get a leading apostrophe.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


class NoLetters(LookupError):
    """No letter waits for the day asked about."""


def print_folder(outbox: Path) -> Path:
    return outbox / "print"


class BatchLetters(Channel):
    """Puts each letter in the day's print folder; the same touch key rewrites the same letter."""

    name: ClassVar[str] = "letter"
    requires: ClassVar[str | None] = "address"
    idempotent: ClassVar[bool] = True

    def __init__(self, settings: Settings) -> None:
        self.folder = print_folder(settings.outbox_dir)

    def send(self, message: Message) -> Receipt:
        day = self.folder / message.local_date.isoformat()
        contact = message.contact
        about = {
            "touch_key": message.key,
            "name": contact.get("name") or "",
            "company": contact.get("company") or "",
            "address": ", ".join(address_lines(contact)),
            "reason": message.reason,
        }
        # The details first: a page on disk always has its details beside it.
        write_atomically(day / f"{message.key}.json", json.dumps(about, ensure_ascii=False).encode("utf-8"))
        path = day / f"{message.key}.html"
        write_atomically(path, page(message).encode("utf-8"))
        return Receipt("print-batch", str(path))


def _by_key(path: Path) -> tuple[str, ...]:
    """Touch keys (enrollment-step-iteration) in numeric order: 9-0-0 before 10-0-0."""
    return tuple(part.zfill(20) for part in path.stem.split("-"))


def _cell(value: Any) -> str:
    text = str(value)
    return f"'{text}" if text.startswith(_FORMULA_STARTS) else text


def build_batch(outbox: Path, day: date) -> tuple[Path, Path, int]:
    """Join the day's letters into one PDF, each on its own pages in touch-key order, and write the
    manifest. Returns (pdf, csv, letters); raises NoLetters when none waits. Building again replaces both."""
    folder = print_folder(outbox) / day.isoformat()
    pages = sorted(folder.glob("*.html"), key=_by_key) if folder.is_dir() else []
    if not pages:
        raise NoLetters(f"no letters to print for {day.isoformat()} in {folder}")
    documents, rows, first_page = [], [], 1
    for path in pages:
        document = render(path.read_text(encoding="utf-8"))
        details = path.with_suffix(".json")
        about = json.loads(details.read_text(encoding="utf-8")) if details.exists() else {}
        count = len(document.pages)
        rows.append({**about, "touch_key": path.stem, "pages": count, "first_page": first_page})
        documents.append(document)
        first_page += count
    out = io.StringIO()
    writer = csv.DictWriter(out, MANIFEST_COLUMNS, extrasaction="ignore", restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)
    pdf_path = folder.with_suffix(".pdf")
    csv_path = folder.with_suffix(".csv")
    write_atomically(pdf_path, join_pdf(documents))
    write_atomically(csv_path, out.getvalue().encode("utf-8-sig"))
    return pdf_path, csv_path, len(rows)
