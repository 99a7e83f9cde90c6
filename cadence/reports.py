"""Reports for the head of sales: per cadence and step, touches to a win, base decay; JSON, CSV, SVG."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.routing import Route

if TYPE_CHECKING:
    from cadence.service import Service


def routes(service: Service) -> list[Route]:
    return []
