"""The one typed settings object: environment variables (prefix-free) with the embedded defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Seconds one send may take, by default, before the worker gives up on it.
SEND_TIME_LIMIT_SECONDS = 120
#: Seconds a lease must outlast the send time limit: the worker's own give-back after the limit strikes, and
#: clocks on different hosts that disagree a little.
LEASE_MARGIN_SECONDS = 10


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
    scheduler_batch_size: int = 500
    #: Seconds one send may take before the worker gives up on it (and gives the touch back).
    send_time_limit_seconds: int = Field(default=SEND_TIME_LIMIT_SECONDS, ge=1)
    #: Seconds a touch may sit in queued or sending before the scheduler's sweep takes it back; longer
    #: than a send may take, or the sweep would take back sends still under way.
    lease_seconds: int = 300
    #: Worker threads in `cadence serve` (embedded) or per `cadence worker` process.
    worker_threads: int = 4
    #: Batches of touches from the scheduler one such process sends at a time; its other threads wait for a
    #: turn, or send the touches that go alone. A batch is work for the processor, not a wait on the network:
    #: more batches at once than the process has a core for only take turns at it, each holding its
    #: transaction open longer.
    worker_batches: int = Field(default=2, ge=1)
    #: Zone used when neither the contact nor the cadence names one.
    default_timezone: str = "UTC"
    sender_name: str = "Cadence"
    sender_company: str = "Cadence"
    sender_email: str = "sales@example.com"
    sender_phone: str = ""
    sender_address: str = ""
    #: The service's public base URL, for links people click (one-click unsubscribe), e.g.
    #: https://cadence.example.com; links are signed with SECRET_KEY.
    public_url: str = "http://127.0.0.1:8000"
    #: Key that signs links and callbacks; unset, one is made and kept in var/secret.key.
    secret_key: str | None = None

    # --- channels: which provider each one uses (the outbox is the embedded default) -----------------------
    email_provider: Literal["outbox", "smtp"] = "outbox"
    smtp_host: str = "localhost"
    smtp_port: int = 587
    #: starttls (port 587), tls (implicit TLS, port 465) or none (a relay on a trusted network).
    smtp_security: Literal["starttls", "tls", "none"] = "starttls"
    smtp_username: str | None = None
    smtp_password: str | None = None
    smtp_timeout_seconds: float = 30.0
    #: Emails one sender may send per day, and per minute (a rolling window); unset means no limit.
    email_daily_limit: int | None = Field(default=None, ge=1)
    email_per_minute: int | None = Field(default=None, ge=1)

    sms_provider: Literal["outbox", "gateway"] = "outbox"
    #: The gateway's Messages endpoint, Twilio's shape, e.g.
    #: https://api.twilio.com/2010-04-01/Accounts/<sid>/Messages.json
    sms_gateway_url: str | None = None
    sms_account_sid: str | None = None
    sms_auth_token: str | None = None
    #: The number (E.164) or sender id messages come from.
    sms_from: str | None = None
    sms_per_second: int | None = Field(default=None, ge=1)
    sms_timeout_seconds: float = 15.0

    letter_provider: Literal["outbox", "print-api", "batch"] = "outbox"
    #: A print-and-mail API in Lob's shape: POST <url>/letters with basic auth (the key as user name).
    print_api_url: str | None = None
    print_api_key: str | None = None
    print_timeout_seconds: float = 30.0

    # --- CRMs: the credential each one's webhooks carry (unset: that CRM's webhooks are refused) ----------
    #: Pipedrive: the HTTP Basic user and password set on the webhook.
    pipedrive_user: str | None = None
    pipedrive_password: str | None = None
    #: HubSpot: the app's client secret (signatures v1 and v3).
    hubspot_client_secret: str | None = None
    #: amoCRM / Kommo: a secret in the webhook URL, `?secret=…`.
    amocrm_secret: str | None = None
    #: Bitrix24: the application token, sent as auth[application_token].
    bitrix24_application_token: str | None = None
    #: Seconds a HubSpot v3 signature's timestamp may be old.
    hubspot_tolerance_seconds: int = 300

    # --- outbound: touches and outcomes posted back to a CRM (or anything else) -------------------------
    #: Where each sent touch and each outcome is posted as JSON; unset posts nothing.
    outbound_url: str | None = None
    #: Signs them: X-Cadence-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of "t." + body>.
    outbound_secret: str | None = None
    outbound_timeout_seconds: float = 10.0

    #: The team: managers' emails and time zones, for the morning digest; absent, no digests.
    team_file: Path = Path("team.yaml")

    log_level: str = "INFO"
    log_json: bool = True

    @model_validator(mode="after")
    def _lease_outlasts_a_send(self) -> Self:
        shortest = self.send_time_limit_seconds + LEASE_MARGIN_SECONDS
        if self.lease_seconds < shortest:
            raise ValueError(
                f"lease_seconds ({self.lease_seconds}) must be at least send_time_limit_seconds "
                f"({self.send_time_limit_seconds}) + {LEASE_MARGIN_SECONDS}, i.e. {shortest}, or the sweep "
                "would take back sends still under way"
            )
        return self

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
