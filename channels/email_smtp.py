"""Email over SMTP: multipart text + HTML, with a signed one-click unsubscribe link (RFC 8058).

A server's 4xx reply or a lost connection is worth another try (TransientError); a 5xx reply is final
(DeliveryError, with the server's words). Once the server has the message body, a failure that leaves
the delivery unknown is final too: the channel is not idempotent, and a retry could send it twice.
"""

from __future__ import annotations

import contextlib
import smtplib
import ssl
from collections.abc import Mapping
from typing import Any, ClassVar

import jinja2

from cadence import signing
from cadence.settings import Settings
from channels import Channel, DeliveryError, Message, Receipt, TransientError
from channels.email import build_message, message_id, sender_domain, split_subject
from channels.limits import Limits

#: Seconds a limit's window lasts for EMAIL_PER_MINUTE.
MINUTE = 60


def unsubscribe_token(key: bytes, touch_id: int) -> str:
    """The signed token in a touch's unsubscribe link; `verify` gives back the touch id."""
    return signing.sign(key, str(touch_id))


def _said(code: int, reply: bytes | str) -> str:
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
    return f"{code} {text}".strip()


def _by_code(code: int, said: str) -> DeliveryError:
    """A 5xx reply is final; a 4xx (or anything odd) may work on another try."""
    if 500 <= code < 600:
        return DeliveryError(f"SMTP server refused: {said}")
    return TransientError(f"SMTP server deferred: {said}")


def _dot_stuffed(payload: bytes) -> bytes:
    """The body as DATA sends it (RFC 5321 4.5.2): CRLF line ends, a leading dot doubled, a final CRLF."""
    lines = payload.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)


class SmtpEmail(Channel):
    name: ClassVar[str] = "email"
    requires: ClassVar[str | None] = "email"
    #: A message the server accepted cannot be taken back: a lost send is never repeated.
    idempotent: ClassVar[bool] = False

    def __init__(self, settings: Settings, limits: Limits) -> None:
        self.settings = settings
        self.limits = limits
        self.key = signing.secret_key(settings)

    def render(self, env: jinja2.Environment, template: str, context: Mapping[str, Any]) -> dict[str, str]:
        parts = super().render(env, template, context)
        parts["subject"], parts["text"] = split_subject(parts["text"], template)
        return parts

    def unsubscribe_url(self, touch_id: int) -> str:
        return f"{self.settings.public_url.rstrip('/')}/unsubscribe/{unsubscribe_token(self.key, touch_id)}"

    def compose(self, message: Message, domain: str) -> bytes:
        """The message as sent on the wire (CRLF line ends), with the one-click unsubscribe headers."""
        headers = {
            "List-Unsubscribe": f"<{self.unsubscribe_url(message.touch_id)}>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        }
        return build_message(message, domain, headers, linesep="\r\n")

    def send(self, message: Message) -> Receipt:
        sender = message.sender.get("email") or self.settings.sender_email
        self._check_limits(sender)
        domain = sender_domain(message)
        payload = self.compose(message, domain)
        recipient = str(message.contact["email"])
        international = not (sender.isascii() and recipient.isascii())
        reply = self._deliver(sender, recipient, payload, international)
        return Receipt("smtp", message_id(message, domain), details={"smtp_response": reply})

    def _check_limits(self, sender: str) -> None:
        if self.settings.email_per_minute:
            limit = self.limits.per_window(f"email:{sender}", self.settings.email_per_minute, MINUTE)
            limit.check(f"email from {sender}")
        if self.settings.email_daily_limit:
            limit = self.limits.per_day(f"email-day:{sender}", self.settings.email_daily_limit)
            limit.check(f"email from {sender}")

    def _connect(self) -> smtplib.SMTP:
        s = self.settings
        smtp: smtplib.SMTP
        if s.smtp_security == "tls":
            context = ssl.create_default_context()
            smtp = smtplib.SMTP_SSL(s.smtp_host, s.smtp_port, timeout=s.smtp_timeout_seconds, context=context)
        else:
            smtp = smtplib.SMTP(s.smtp_host, s.smtp_port, timeout=s.smtp_timeout_seconds)
        try:
            if s.smtp_security == "starttls":
                smtp.starttls(context=ssl.create_default_context())
            if s.smtp_username:
                smtp.login(s.smtp_username, s.smtp_password or "")
        except BaseException:
            smtp.close()
            raise
        return smtp

    def _deliver(self, sender: str, recipient: str, payload: bytes, international: bool) -> str:
        """One SMTP transaction; the server's reply to the message body."""
        body_sent = False
        try:
            smtp = self._connect()
            try:
                smtp.ehlo_or_helo_if_needed()
                options: list[str] = []
                if international:
                    if not smtp.has_extn("smtputf8"):
                        raise DeliveryError("SMTP server does not accept non-ASCII addresses (no SMTPUTF8)")
                    options = ["SMTPUTF8", "BODY=8BITMIME"]
                code, reply = smtp.mail(sender, options)
                if code != 250:
                    raise _by_code(code, _said(code, reply))
                code, reply = smtp.rcpt(recipient)
                if code not in (250, 251):
                    raise _by_code(code, _said(code, reply))
                code, reply = smtp.docmd("DATA")
                if code != 354:
                    raise _by_code(code, _said(code, reply))
                body_sent = True
                smtp.send(_dot_stuffed(payload) + b".\r\n")
                code, reply = smtp.getreply()
                if code != 250:
                    # A reply to the body is the server's decision: nothing was delivered.
                    raise _by_code(code, _said(code, reply))
                return _said(code, reply)
            finally:
                with contextlib.suppress(smtplib.SMTPException, OSError):
                    smtp.quit()
                smtp.close()
        except DeliveryError:
            raise
        except smtplib.SMTPResponseException as exc:
            # A reply before the body: the greeting, STARTTLS or login.
            raise _by_code(exc.smtp_code, _said(exc.smtp_code, exc.smtp_error)) from exc
        except (smtplib.SMTPException, OSError) as exc:
            if body_sent:
                raise DeliveryError(
                    f"SMTP connection lost while sending the message ({exc!r}); it may have been "
                    "delivered, so it is not sent again"
                ) from exc
            raise TransientError(f"SMTP server unreachable: {exc!r}") from exc
