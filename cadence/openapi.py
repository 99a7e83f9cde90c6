"""The API described: an OpenAPI 3.1 document built from the operations the API declares, and a docs page
that shows it without fetching anything."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

#: Statuses every operation may answer with the one error shape, besides its own.
COMMON_ERRORS = (413,)
_REASONS = {
    200: "OK",
    201: "Created",
    202: "Accepted",
    204: "No content",
    400: "The body is not readable",
    401: "No API key, or one that is unknown or revoked",
    403: "The key's role may not do this, or the record is another manager's",
    404: "Not found",
    409: "Conflicts with the record's state",
    413: "The body is too large",
    422: "Invalid input; `field` names it",
    501: "Not built yet",
    503: "A check failed",
}
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "field"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "field": {"type": ["string", "null"], "description": "the input at fault"},
                "problems": {"type": "array", "items": {"type": "object"}},
            },
        }
    },
}


@dataclass(frozen=True)
class Param:
    """A query or path parameter."""

    name: str
    schema: dict[str, Any]
    description: str
    where: str = "query"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "in": self.where,
            "required": self.where == "path",
            "description": self.description,
            "schema": self.schema,
        }


@dataclass(frozen=True)
class Operation:
    """One method on one path: what it takes, who may call it, what it answers."""

    method: str
    path: str
    summary: str
    #: Roles of the API keys that may call it; empty: anyone, no key needed.
    roles: tuple[str, ...]
    params: tuple[Param, ...] = ()
    body: type[BaseModel] | None = None
    #: A body that is not a JSON model: (media type, schema).
    raw_body: tuple[str, dict[str, Any]] | None = None
    status: int = 200
    answer: dict[str, Any] | None = None
    answer_type: str = "application/json"
    errors: tuple[int, ...] = ()
    notes: str = ""

    @property
    def key(self) -> str:
        words = self.path.strip("/").replace("{", "").replace("}", "").replace("/", "_")
        return f"{self.method.lower()}_{words}"


def ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def page_of(item: dict[str, Any]) -> dict[str, Any]:
    """A page of a list: its items and the cursor of the next page (null on the last)."""
    return {
        "type": "object",
        "required": ["items", "next_cursor"],
        "properties": {
            "items": {"type": "array", "items": item},
            "next_cursor": {"type": ["string", "null"]},
        },
    }


def model_schema(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    """A model's JSON Schema as a component; its nested definitions become components too."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(schema.pop("$defs", {}))
    components[model.__name__] = schema
    return ref(model.__name__)


def document(
    operations: list[Operation], title: str, version: str, schemas: dict[str, Any]
) -> dict[str, Any]:
    components: dict[str, Any] = {"Error": ERROR_SCHEMA, **schemas}
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        entry: dict[str, Any] = {
            "operationId": op.key,
            "summary": op.summary,
            "description": _description(op),
            "parameters": [p.as_dict() for p in op.params],
            "responses": _responses(op),
        }
        entry["security"] = [{"bearer": []}] if op.roles else []
        if op.body is not None:
            body_schema = model_schema(op.body, components)
            entry["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": body_schema}},
            }
        elif op.raw_body is not None:
            media, schema = op.raw_body
            entry["requestBody"] = {"required": True, "content": {media: {"schema": schema}}}
        paths.setdefault(op.path, {})[op.method.lower()] = entry
    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": version,
            "description": 'Every error answers {"error": {"code", "message", "field"}}. Lists take '
            "`limit` and `cursor` and answer `next_cursor` (null on the last page). Send "
            "`Authorization: Bearer <API key>` once any key or ADMIN_TOKEN exists; webhooks never need one.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _description(op: Operation) -> str:
    who = f"Roles: {', '.join(op.roles)}." if op.roles else "No API key needed."
    return f"{op.notes} {who}".strip()


def _responses(op: Operation) -> dict[str, Any]:
    ok: dict[str, Any] = {"description": _REASONS.get(op.status, "OK")}
    if op.status != 204:
        ok["content"] = {op.answer_type: {"schema": op.answer or {"type": "object"}}}
    responses: dict[str, Any] = {str(op.status): ok}
    auth = (401, 403) if op.roles else ()
    for status in sorted({*op.errors, *auth, *COMMON_ERRORS}):
        responses[str(status)] = {
            "description": _REASONS[status],
            "content": {"application/json": {"schema": ref("Error")}},
        }
    return responses


# --- the docs page ------------------------------------------------------------------------------------------


def page(doc: dict[str, Any]) -> str:
    """A self-contained HTML page listing every operation, its parameters, body and answers."""
    parts: list[str] = []
    add = parts.append
    e = html.escape
    info = doc["info"]
    add(
        "<!doctype html><html lang=en><meta charset=utf-8>"
        f"<title>{e(info['title'])} API</title>"
        "<style>body{font:15px/1.45 system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem}"
        "h2{font-size:1.05rem;margin-top:2rem}code,pre{font:13px ui-monospace,monospace}"
        "pre{background:#f5f5f5;padding:.6rem;overflow:auto;max-height:20rem}"
        ".m{display:inline-block;min-width:4.2rem;font-weight:700}"
        "table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:.2rem .5rem}</style>"
        f"<h1>{e(info['title'])} API <small>{e(info['version'])}</small></h1><p>{e(info['description'])}</p>"
        '<p>The document itself: <a href="/openapi.json">/openapi.json</a>.</p>'
    )
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            add(f'<h2 id="{e(op["operationId"])}"><span class=m>{e(method.upper())}</span>')
            add(f"<code>{e(path)}</code></h2><p>{e(op['summary'])} {e(op['description'])}</p>")
            if op["parameters"]:
                add("<table><tr><th>parameter<th>in<th>schema<th>description")
                for p in op["parameters"]:
                    schema = e(json.dumps(p["schema"]))
                    add(f"<tr><td><code>{e(p['name'])}</code><td>{e(p['in'])}<td><code>{schema}</code>")
                    add(f"<td>{e(p['description'])}")
                add("</table>")
            if "requestBody" in op:
                for media, content in op["requestBody"]["content"].items():
                    body = e(json.dumps(_resolve(content["schema"], doc), indent=2))
                    add(f"<p>Body ({e(media)}):</p><pre>{body}</pre>")
            answers = ", ".join(f"{e(code)} {e(r['description'])}" for code, r in op["responses"].items())
            add(f"<p>Answers: {answers}</p>")
    return "".join(parts)


def _resolve(schema: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
    name = schema.get("$ref", "").rpartition("/")[2]
    found: dict[str, Any] = doc["components"]["schemas"].get(name, schema)
    return found
