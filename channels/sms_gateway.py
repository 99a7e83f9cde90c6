"""SMS through an HTTP gateway speaking Twilio's Messages API: a form POST per touch, delivery reports back
on a signed status callback (see cadence/sms_api.py)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import httpx

from cadence import signing
from cadence.settings import Settings
from channels import Channel, DeliveryError, Message, RateLimited, Receipt, TransientError
from channels.limits import Limit, Limits
from channels.sms import mobile_number

#: Seconds to wait after a 429 that names no Retry-After.
DEFAULT_RETRY_AFTER_SECONDS = 10.0
#: Characters of GSM 03.38's basic set: one septet each.
GSM7_BASIC = (
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
#: Characters of GSM 03.38's extension table: an escape and the character, two septets each.
GSM7_EXTENSION = "\f^{}\\[~]|€"
#: Septets in a single GSM-7 SMS, and in each part of a concatenated one (the rest is the part header).
GSM7_SINGLE, GSM7_PART = 160, 153
#: UTF-16 code units in a single UCS-2 SMS, and in each part of a concatenated one.
UCS2_SINGLE, UCS2_PART = 70, 67

_GSM7 = frozenset(GSM7_BASIC)
_GSM7_EXTENSION = frozenset(GSM7_EXTENSION)


def segments(text: str) -> int:
    """How many SMS parts `text` takes: GSM-7 when every character has a septet, else UCS-2."""
    if all(c in _GSM7 or c in _GSM7_EXTENSION for c in text):
        units = sum(2 if c in _GSM7_EXTENSION else 1 for c in text)
        single, part = GSM7_SINGLE, GSM7_PART
    else:
        units = len(text.encode("utf-16-le")) // 2
        single, part = UCS2_SINGLE, UCS2_PART
    return 1 if units <= single else math.ceil(units / part)


def signature(auth_token: str, url: str, params: Iterable[tuple[str, str]]) -> str:
    """Twilio's X-Twilio-Signature: base64 HMAC-SHA1 of the full URL followed by each POST parameter's name
    and value, sorted by name."""
    data = url + "".join(name + value for name, value in sorted(params))
    return base64.b64encode(hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()).decode()


def status_callback_url(settings: Settings, key: bytes, touch_id: int) -> str:
    """Where the gateway reports a touch's delivery: signed, so the callback names its touch unforgeably."""
    return f"{settings.public_url.rstrip('/')}/sms/status/{signing.sign(key, str(touch_id))}"


class SmsGateway(Channel):
    """POSTs each touch to SMS_GATEWAY_URL with basic auth (account sid, auth token).

    The gateway may have sent a message whose answer was lost, so a lost send is not repeated; the touch key
    goes along as Idempotency-Key for gateways that honour one.
    """

    name: ClassVar[str] = "sms"
    requires: ClassVar[str | None] = "phone"
    idempotent: ClassVar[bool] = False

    def __init__(self, settings: Settings, limits: Limits) -> None:
        needed = {
            "SMS_GATEWAY_URL": settings.sms_gateway_url,
            "SMS_ACCOUNT_SID": settings.sms_account_sid,
            "SMS_AUTH_TOKEN": settings.sms_auth_token,
            "SMS_FROM": settings.sms_from,
        }
        unset = [name for name, value in needed.items() if not value]
        if unset:
            raise ValueError(f"SMS_PROVIDER=gateway needs {', '.join(unset)} set")
        self.settings = settings
        self.url = settings.sms_gateway_url or ""
        self.auth = (settings.sms_account_sid or "", settings.sms_auth_token or "")
        self.sender = settings.sms_from or ""
        self.key = signing.secret_key(settings)
        self.limit: Limit | None = (
            limits.per_window("sms", settings.sms_per_second, 1) if settings.sms_per_second else None
        )

    def missing(self, contact: Mapping[str, Any]) -> str | None:
        return mobile_number(contact)[1]

    def send(self, message: Message) -> Receipt:
        to, why = mobile_number(message.contact)
        if to is None:
            raise DeliveryError(why or "contact has no mobile number")
        text = message.parts["text"].strip()
        if self.limit is not None:
            self.limit.check("sms gateway")
        try:
            response = httpx.post(
                self.url,
                data={
                    "To": to,
                    "From": self.sender,
                    "Body": text,
                    "StatusCallback": status_callback_url(self.settings, self.key, message.touch_id),
                },
                auth=self.auth,
                headers={"Idempotency-Key": signing.idempotency_key(self.key, message.key)},
                timeout=self.settings.sms_timeout_seconds,
            )
        except (httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise TransientError(f"sms gateway unreachable in {self.settings.sms_timeout_seconds} s") from exc
        except httpx.TimeoutException as exc:
            # The gateway had the request and may have sent the text: sending again could send it twice.
            raise DeliveryError(
                f"sms gateway did not answer in {self.settings.sms_timeout_seconds} s; the text may have "
                "gone out, so it is not sent again"
            ) from exc
        except httpx.TransportError as exc:
            raise TransientError(f"sms gateway unreachable: {exc!r}") from exc
        if response.is_success:
            return self._receipt(response, to, text)
        said = _said(response)
        if response.status_code == 429:
            raise RateLimited(f"sms gateway: too many requests{said}", _retry_after(response))
        if response.status_code >= 500:
            raise TransientError(f"sms gateway answered {response.status_code}{said}")
        raise DeliveryError(f"sms gateway refused the message ({response.status_code}){said}")

    def _receipt(self, response: httpx.Response, to: str, text: str) -> Receipt:
        body = _json(response)
        sid = body.get("sid")
        if not sid:
            # It said yes, so the message may be out: failing for good rather than sending it again.
            raise DeliveryError(f"sms gateway answered {response.status_code} without a message sid")
        try:
            parts = int(body["num_segments"])
        except (KeyError, TypeError, ValueError):
            parts = segments(text)
        return Receipt("sms-gateway", str(sid), details={"segments": parts, "to": to})


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _said(response: httpx.Response) -> str:
    """The gateway's own words about an error, e.g. ': The 'To' number is not valid. (code 21211)'."""
    body = _json(response)
    message = body.get("message") or response.text.strip()[:200]
    code = f" (code {body['code']})" if body.get("code") else ""
    return f": {message}{code}" if message else code


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(float(response.headers.get("retry-after", "")), 0.0)
    except ValueError:
        return DEFAULT_RETRY_AFTER_SECONDS
