"""API keys: who calls the API, in which role. Only a secret's sha256 is stored; the secret is shown once."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, get_args

import sqlalchemy as sa
from sqlmodel import Session, col, select

from cadence import store
from cadence.models import ApiKey

Role = Literal["admin", "integration", "manager"]
ROLES: tuple[str, ...] = get_args(Role)
#: What every secret starts with, so a leaked one is recognisable in logs and scanners.
SECRET_PREFIX = "cad_"
#: Random bytes in a secret (URL-safe base64 in the secret itself).
SECRET_BYTES = 32


@dataclass(frozen=True)
class Principal:
    """The caller a request was made by: a role and, for a manager, the deal owner it acts as."""

    role: str
    owner: str | None = None
    key_id: int | None = None

    def may(self, *roles: str) -> bool:
        return self.role in roles


#: The caller when no key exists at all (the embedded default): everything is allowed, as before keys.
OPEN = Principal("admin")


class BadKey(ValueError):
    """A key that cannot be created as asked; `field` names the option at fault."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def create(db: sa.Engine, name: str, role: str, owner: str | None, now: datetime) -> tuple[ApiKey, str]:
    """A new key and its secret; the secret is not kept anywhere, so this is the one time it is seen."""
    if role not in ROLES:
        raise BadKey(f"role is one of {', '.join(ROLES)}", "role")
    if role == "manager" and not owner:
        raise BadKey("a manager's key needs --owner: the name deals carry in `owner`", "owner")
    if not name.strip():
        raise BadKey('give the key a name, e.g. "Ivan\'s phone"', "name")
    secret = SECRET_PREFIX + secrets.token_urlsafe(SECRET_BYTES)
    with store.session(db) as s:
        key = ApiKey(name=name, role=role, owner=owner, secret_hash=hash_secret(secret), created_at=now)
        s.add(key)
    return key, secret


def listing(db: sa.Engine) -> list[ApiKey]:
    with store.session(db) as s:
        return list(s.exec(select(ApiKey).order_by(col(ApiKey.id))).all())


def revoke(db: sa.Engine, key_id: int, now: datetime) -> ApiKey | None:
    """Revoke key `key_id` (a revoked key stays revoked); None when there is no such key."""
    with store.session(db) as s:
        key = s.get(ApiKey, key_id)
        if key is not None and key.revoked_at is None:
            key.revoked_at = now
        return key


def configured(s: Session, admin_token: str | None) -> bool:
    """Whether the API asks for keys: ADMIN_TOKEN is set or a key was ever made (revoked ones count)."""
    return bool(admin_token) or s.exec(select(ApiKey.id).limit(1)).first() is not None


def identify(s: Session, admin_token: str | None, secret: str) -> Principal | str:
    """The caller a bearer secret stands for, or why it is refused."""
    if admin_token and hmac.compare_digest(secret.encode("utf-8", "surrogatepass"), admin_token.encode()):
        return Principal("admin")
    key = s.exec(select(ApiKey).where(ApiKey.secret_hash == hash_secret(secret))).first()
    if key is None:
        return "unknown API key"
    if key.revoked_at is not None:
        return f"API key {key.id} was revoked on {key.revoked_at.date().isoformat()}"
    return Principal(key.role, key.owner, key.id)


#: Why a call without a usable key is refused.
NO_KEY = "send Authorization: Bearer <API key>"


def _basic_password(credentials: str) -> str:
    """The password of HTTP Basic credentials: a browser's sign-in box carries the API key there."""
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return ""
    return decoded.partition(":")[2].strip()


def authenticate(
    s: Session, admin_token: str | None, header: str | None, basic: bool = False
) -> Principal | str:
    """The caller an Authorization header names, or why it is refused; anyone while no key exists.

    With `basic`, HTTP Basic credentials count too, the key as the password (a browser's sign-in box).
    """
    if header is None:
        if configured(s, admin_token):
            return f"{NO_KEY} (`cadence keys create` makes one)"
        return OPEN
    scheme, _, secret = header.partition(" ")
    scheme = scheme.lower()
    if scheme == "basic" and basic:
        secret = _basic_password(secret)
    elif scheme == "bearer":
        secret = secret.strip()
    else:
        secret = ""
    if not secret:
        return NO_KEY
    return identify(s, admin_token, secret)
