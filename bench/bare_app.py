"""The floor for `bench/webhooks.py`: a bare Starlette endpoint that reads and parses the same JSON body and
answers 200, with no store, no adapter and no rules.

    .venv/bin/python -m uvicorn bare_app:app --app-dir bench --port 8001
"""

from __future__ import annotations

import json

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


async def webhook(request: Request) -> Response:
    payload = json.loads(await request.body())
    return JSONResponse({"keys": len(payload)})


app = Starlette(routes=[Route("/webhooks/{source}", webhook, methods=["POST"])])
