"""The printed letter: one A4 page (or more) with the address in a window envelope's window, and its PDF.

The layout follows DIN 5008 form B for a DL or C5/6 window envelope: the window is 85 x 45 mm, 20 mm from
the left edge and 45 mm from the top; the sender's return line sits at the top of the window, the
recipient's address under it. Everything but the rendered template body is escaped here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from channels import Message

#: Millimetres from the page's top and left edges to the envelope window (DIN 5008 form B).
WINDOW_TOP_MM = 45
WINDOW_LEFT_MM = 20
#: Millimetres of the window itself (DL and C5/6 envelopes).
WINDOW_WIDTH_MM = 85
WINDOW_HEIGHT_MM = 45
#: Millimetres from the top and left edges to the block with the sender's details and the date.
INFO_TOP_MM = 50
INFO_LEFT_MM = 125
#: Millimetres from the top to the fold marks in the left margin (a DL envelope takes the page in thirds).
FOLD_MARKS_MM = (105, 210)
#: Millimetres of the page margins: top, right, bottom, left.
MARGINS_MM = (20, 20, 20, 25)
#: Millimetres from the top where the body starts on the first page: below the window, with a gap.
BODY_TOP_MM = 105
#: What rendering may fetch: inline data only, so a template can reach neither local files nor the network.
ALLOWED_URL_SCHEMES = frozenset({"data"})

_TOP, _RIGHT, _BOTTOM, _LEFT = MARGINS_MM
_STYLE = f"""
@page {{ size: A4; margin: {_TOP}mm {_RIGHT}mm {_BOTTOM}mm {_LEFT}mm; }}
body {{ font-family: serif; font-size: 11pt; line-height: 1.4; margin: 0; }}
.head {{ position: relative; height: {BODY_TOP_MM - _TOP}mm; }}
.window {{ position: absolute; top: {WINDOW_TOP_MM - _TOP}mm; left: {WINDOW_LEFT_MM - _LEFT}mm;
  width: {WINDOW_WIDTH_MM}mm; height: {WINDOW_HEIGHT_MM}mm; padding: 0 5mm; box-sizing: border-box;
  overflow: hidden; }}
.return {{ font-size: 7pt; line-height: 1.2; height: 12mm; padding-top: 3mm; box-sizing: border-box;
  white-space: nowrap; overflow: hidden; text-decoration: underline; }}
.address {{ font-size: 10pt; line-height: 1.25; white-space: pre-line; }}
.info {{ position: absolute; top: {INFO_TOP_MM - _TOP}mm; left: {INFO_LEFT_MM - _LEFT}mm; width: 65mm;
  font-size: 8pt; white-space: pre-line; }}
.date {{ margin-top: 3mm; }}
.fold {{ position: absolute; left: {5 - _LEFT}mm; width: 5mm; border-top: 0.2mm solid #888; }}
.fold.first {{ top: {FOLD_MARKS_MM[0] - _TOP}mm; }}
.fold.second {{ top: {FOLD_MARKS_MM[1] - _TOP}mm; }}
"""
_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>{style}</style></head>
<body>
<div class="head">
<div class="fold first"></div>
<div class="fold second"></div>
<div class="window">
<div class="return">{sender}</div>
<div class="address">{address}</div>
</div>
<div class="info">{info}
<div class="date">{date}</div>
</div>
</div>
{body}
</body></html>
"""


def lines(text: str | None) -> list[str]:
    """An address as written, one line each, blank lines left out."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def address_lines(contact: Mapping[str, Any]) -> list[str]:
    return lines(contact.get("address"))


def recipient_lines(contact: Mapping[str, Any]) -> list[str]:
    """What goes in the window: the name, the company, then the address lines."""
    head = [str(contact[k]).strip() for k in ("name", "company") if contact.get(k)]
    return [line for line in head if line] + address_lines(contact)


def return_line(sender: Mapping[str, str]) -> str:
    """The sender on one line, for the top of the window: the post returns an undeliverable letter there."""
    address = ", ".join(lines(sender.get("address")))
    return " · ".join(x for x in (sender.get("company"), address) if x)


def page(message: Message) -> str:
    """The whole letter as an A4 HTML page: window address block, sender's details, date, then the body."""
    sender = message.sender
    info = [sender.get("name"), sender.get("company"), sender.get("phone"), sender.get("email")]
    return _PAGE.format(
        title=escape(f"Letter {message.key}"),
        style=_STYLE,
        sender=escape(return_line(sender)),
        address=escape("\n".join(recipient_lines(message.contact))),
        info=escape("\n".join(x for x in info if x)),
        date=escape(message.local_date.isoformat()),
        body=message.parts["html"],
    )


def render(html: str) -> Any:
    """The page laid out by WeasyPrint: a Document whose `pages` can be counted and joined with others."""
    # Imported here: WeasyPrint loads Pango when imported, and only printing needs it.
    from weasyprint import HTML
    from weasyprint.urls import URLFetcher

    fetcher = URLFetcher(allowed_protocols=ALLOWED_URL_SCHEMES)
    return HTML(string=html, url_fetcher=fetcher).render()


def to_pdf(html: str) -> bytes:
    pdf: bytes = render(html).write_pdf()
    return pdf


def join_pdf(documents: Sequence[Any]) -> bytes:
    """Several rendered letters as one PDF, each starting on a new page, in the order given."""
    pages = [p for document in documents for p in document.pages]
    pdf: bytes = documents[0].copy(pages).write_pdf()
    return pdf
