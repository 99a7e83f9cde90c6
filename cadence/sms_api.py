"""SMS callbacks from the gateway: delivery status, and inbound messages (STOP, START)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.routing import Route

if TYPE_CHECKING:
    from cadence.service import Service


def routes(service: Service) -> list[Route]:
    return []
