"""The policy every cadence obeys: who is left alone (blocks), when channels stay quiet, caps, call priority.

It lives in `rules/policy.yaml`, beside the cadences, and is loaded with them, all or nothing.
"""

from __future__ import annotations

from datetime import time, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cadence.errors import Problem, RulesError
from cadence.language import ChannelName, Duration, Expression, OutcomeName, Window, parse_duration
from cadence.validation import validate

#: The file name of the policy inside a rules folder.
POLICY_FILE = "policy.yaml"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BlockRule(_Model):
    after: OutcomeName = Field(description="The outcome that starts the block.")
    channels: tuple[ChannelName, ...] | Literal["all"] = Field(
        default="all", description="The channels blocked; `all` leaves the contact alone entirely."
    )
    for_: Duration | None = Field(
        default=None, alias="for", description="How long, e.g. '365 days'; without it, until lifted by hand."
    )

    @property
    def length(self) -> timedelta | None:
        return parse_duration(self.for_) if self.for_ else None

    def covers(self, channel: str) -> bool:
        return self.channels == "all" or channel in self.channels


class Caps(_Model):
    per_day: int | None = Field(
        default=1, ge=1, description="Touches per contact per local day, across all cadences."
    )
    per_week: int | None = Field(default=None, ge=1, description="Touches per contact in any 7 days.")


def _default_blocks() -> tuple[BlockRule, ...]:
    return (
        BlockRule(after="do_not_contact"),
        BlockRule(after="unsubscribed", channels=("email",)),
        BlockRule.model_validate({"after": "not_interested", "channels": ["call"], "for": "365 days"}),
    )


def _default_quiet_hours() -> dict[ChannelName, tuple[time, time]]:
    return {"sms": (time(9), time(20))}


def _default_consent() -> dict[ChannelName, str]:
    return {"sms": "contact.sms_consent"}


class Policy(_Model):
    """What applies to every cadence; with no policy file, these defaults."""

    blocks: tuple[BlockRule, ...] = Field(
        default_factory=_default_blocks, description="Who is left alone after which outcome."
    )
    quiet_hours: dict[ChannelName, Window] = Field(
        default_factory=_default_quiet_hours,
        description="Local hours a channel may reach a contact, per channel; outside them it stays quiet.",
    )
    caps: Caps = Field(default_factory=Caps, description="How often one contact may be touched at all.")
    consent: dict[ChannelName, Expression] = Field(
        default_factory=_default_consent,
        description="What must hold before a channel may reach a contact, per channel, e.g. "
        "sms: contact.sms_consent; a touch without it is skipped, or goes by the step's next choice.",
    )
    call_priority: Expression = Field(
        default="(deal.probability or 0) * (deal.amount or 0)",
        description="Orders the call list, highest first; an expression over contact and deal.",
    )

    def hours(self, channel: str) -> tuple[time, time] | None:
        """The local hours `channel` may reach a contact, or None for any hour."""
        return {str(name): hours for name, hours in self.quiet_hours.items()}.get(channel)

    def consent_for(self, channel: str) -> str | None:
        """What must hold before `channel` may reach a contact, or None."""
        return {str(name): rule for name, rule in self.consent.items()}.get(channel)

    def blocking(self, outcome: str) -> list[BlockRule]:
        return [rule for rule in self.blocks if rule.after == outcome]


def parse(text: str, file: str) -> Policy:
    """Validate a policy file; RulesError carries every problem with its position."""
    policy, located = validate(text, file, Policy, "a mapping of blocks, quiet_hours, caps, call_priority")
    problems = [
        Problem(
            file, *located.where(("blocks", i)), f"blocks.{i} repeats an earlier block after {rule.after!r}"
        )
        for i, rule in enumerate(policy.blocks)
        if any(other.after == rule.after and other.channels == rule.channels for other in policy.blocks[:i])
    ]
    if problems:
        raise RulesError(problems)
    return policy
