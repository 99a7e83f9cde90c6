"""The OpenAPI document: valid OpenAPI 3.1, covering every route, and no server error on any endpoint under
property-based requests built from it (schemathesis, in-process)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
from harness import Harness, deal_event, make_settings, start_harness
from hypothesis import HealthCheck, Phase, given, settings
from openapi_spec_validator import validate
from starlette.routing import Route

TOKEN = "openapi-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: Examples hypothesis makes for each operation.
EXAMPLES = 15


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = start_harness(make_settings(tmp_path, admin_token=TOKEN))
    assert harness.post("/webhooks/generic", deal_event()).status_code == 202
    yield harness
    harness.stop()


def test_the_document_is_valid_openapi_3_1(h: Harness) -> None:
    doc = h.client.get("/openapi.json").json()

    validate(doc)
    assert doc["openapi"].startswith("3.1")
    assert doc["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}


def test_every_route_of_the_app_is_in_the_document(h: Harness) -> None:
    paths = h.client.get("/openapi.json").json()["paths"]
    routes = [r for r in h.client.app.routes if isinstance(r, Route)]  # type: ignore[attr-defined]

    missing = [
        (method, route.path)
        for route in routes
        for method in sorted(route.methods or ())
        if method != "HEAD" and method.lower() not in paths.get(route.path, {})
    ]
    assert routes and missing == []


def test_every_operation_answers_its_errors_in_the_one_shape(h: Harness) -> None:
    doc = h.client.get("/openapi.json").json()
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            assert "413" in op["responses"], (method, path)
            for status, response in op["responses"].items():
                if int(status) >= 400:
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (method, path, status)


def test_the_docs_page_lists_every_operation_and_fetches_nothing(h: Harness) -> None:
    doc = h.client.get("/openapi.json").json()
    page = h.client.get("/docs")

    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for methods in doc["paths"].values():
        for op in methods.values():
            assert f'id="{op["operationId"]}"' in page.text
    assert "<script" not in page.text and "https://" not in page.text


@dataclass
class Probe:
    """What property-based requests to every operation of the document got back."""

    operations: int = 0
    requests: int = 0
    #: Answers by class: "2xx", "3xx", "4xx", "501" (GET /reports, documented as coming), "5xx".
    answers: Counter[str] = field(default_factory=Counter)
    #: "METHOD /path: what went wrong", for each 5xx or exception (the first few per operation).
    server_errors: list[str] = field(default_factory=list)


def _name(case: Any) -> str:
    return f"{case.method.upper()} {case.formatted_path}"


def _kind(status: int) -> str:
    return "501" if status == 501 else f"{status // 100}xx"


def probe_every_operation(app: Any, examples: int, seed: int = 0) -> Probe:
    """Requests built from the app's OpenAPI document, `examples` for each operation, through the app in
    this process (schemathesis over ASGI), each authorised as the admin."""
    api = schemathesis.openapi.from_asgi("/openapi.json", app)
    probe = Probe()
    for result in api.get_all_operations():
        operation = result.ok()

        @hypothesis.seed(seed)
        @given(case=operation.as_strategy())
        @settings(
            max_examples=examples,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
            phases=[Phase.explicit, Phase.generate],
        )
        def request(case: Any) -> None:
            probe.requests += 1
            try:
                response = case.call(headers=AUTH)
            except Exception as exc:
                probe.answers["exception"] += 1
                probe.server_errors.append(f"{_name(case)}: {type(exc).__name__}: {exc}"[:300])
                return
            kind = _kind(response.status_code)
            probe.answers[kind] += 1
            if kind == "5xx":
                probe.server_errors.append(f"{_name(case)}: {response.status_code} {response.text[:200]}")

        request()
        probe.operations += 1
    return probe


@pytest.mark.integration
def test_no_endpoint_answers_with_a_server_error(h: Harness) -> None:
    probe = probe_every_operation(h.client.app, EXAMPLES)

    assert probe.server_errors == []
    assert probe.answers["2xx"] > 0 and probe.answers["4xx"] > 0
    # Every operation but GET /openapi.json, which schemathesis leaves out as the document itself.
    operations = h.client.get("/openapi.json").json()["paths"]
    assert probe.operations == sum(len(methods) for methods in operations.values()) - 1
