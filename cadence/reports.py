"""Reports for the head of sales: per cadence and step, touches to a win, base decay; JSON, CSV, SVG."""

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
