"""Email's callbacks: the one-click unsubscribe link (RFC 8058) and bounce reports."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.routing import Route

if TYPE_CHECKING:
    from cadence.service import Service


def routes(service: Service) -> list[Route]:
    return []
