"""Signed tokens for links and callbacks: HMAC-SHA256 under the service's secret key."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from cadence.settings import Settings

#: Where a key made on first use is kept, when SECRET_KEY is not set.
KEY_FILE = Path("var/secret.key")


def secret_key(settings: Settings) -> bytes:
    """SECRET_KEY, or a random key made once and kept in var/secret.key (readable by its owner only)."""
    if settings.secret_key:
        return settings.secret_key.encode()
    path = KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            pass
        else:
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(32))
    return path.read_text().strip().encode()


def sign(key: bytes, value: str) -> str:
    """`value` and its signature, safe in a URL path or query."""
    mac = hmac.new(key, value.encode(), hashlib.sha256).digest()[:16]
    return f"{value}.{base64.urlsafe_b64encode(mac).decode().rstrip('=')}"


def verify(key: bytes, token: str) -> str | None:
    """The value a token signed, or None when it was not signed with this key."""
    value, _, _ = token.rpartition(".")
    if not value or not token.isascii():
        return None
    return value if hmac.compare_digest(sign(key, value), token) else None


def idempotency_key(key: bytes, touch_key: str) -> str:
    """A provider's idempotency key for a touch: the touch key, prefixed by this installation's own mark so
    two installations (or a database started afresh) on one provider account cannot collide."""
    mark = hmac.new(key, b"idempotency", hashlib.sha256).hexdigest()[:12]
    return f"cadence-{mark}-{touch_key}"
