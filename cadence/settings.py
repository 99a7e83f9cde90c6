"""The one typed settings object: environment variables (prefix-free) with the embedded defaults."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Seconds one send may take before the worker gives up on it.
SEND_TIME_LIMIT_SECONDS = 120


class Settings(BaseSettings):
    """Nothing set means the embedded default: SQLite file, in-process broker, file outbox."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    database_url: str = Field(default="sqlite:///var/cadence.db", description="SQLAlchemy URL")
    redis_url: str | None = Field(default=None, description="Redis broker; unset means in-process broker")
    rules_dir: Path = Path("rules")
    templates_dir: Path = Path("templates")
    outbox_dir: Path = Path("var/outbox")
    host: str = "127.0.0.1"
    port: int = 8000
    #: Shared secret for HMAC-SHA256 signatures on /webhooks/generic; unset accepts unsigned bodies.
    webhook_secret: str | None = None
    #: Seconds a signed webhook's timestamp may differ from now.
    webhook_tolerance_seconds: int = 300
    #: Bearer token for the admin endpoints (POST /rules/reload); unset allows them from loopback only.
    admin_token: str | None = None
    #: Seconds between scheduler ticks.
    scheduler_interval_seconds: float = 5.0
    #: Touches claimed per scheduler transaction.
    scheduler_batch_size: int = 100
    #: Seconds a touch may sit in queued or sending before the scheduler's sweep takes it back; longer
    #: than a send may take, or the sweep would take back sends still under way.
    lease_seconds: int = Field(default=300, ge=SEND_TIME_LIMIT_SECONDS + 30)
    #: Worker threads in `cadence serve` (embedded) or per `cadence worker` process.
    worker_threads: int = 4
    #: Zone used when neither the contact nor the cadence names one.
    default_timezone: str = "UTC"
    sender_name: str = "Cadence"
    sender_company: str = "Cadence"
    sender_email: str = "sales@example.com"
    sender_phone: str = ""
    sender_address: str = ""
    log_level: str = "INFO"
    log_json: bool = True

    @property
    def embedded_broker(self) -> bool:
        return not self.redis_url

    def sender(self) -> dict[str, str]:
        return {
            "name": self.sender_name,
            "company": self.sender_company,
            "email": self.sender_email,
            "phone": self.sender_phone,
            "address": self.sender_address,
        }
