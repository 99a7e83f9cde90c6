"""Pages for people: the daily call list (HTML, JSON, CSV), where calls are logged, snoozed, reassigned."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.routing import Route

from cadence.openapi import Operation

if TYPE_CHECKING:
    from cadence.service import Service


#: What these routes are, for the OpenAPI document (every route of the app must be in it).
OPERATIONS: list[Operation] = []


def routes(service: Service) -> list[Route]:
    return []
