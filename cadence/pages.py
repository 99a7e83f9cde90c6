"""Pages for people: the daily call list (HTML, JSON, CSV), where calls are logged, snoozed, reassigned."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.routing import Route

if TYPE_CHECKING:
    from cadence.service import Service


def routes(service: Service) -> list[Route]:
    return []
