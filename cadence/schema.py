"""The JSON Schema of cadence files, so editors complete and check them as a marketer types."""

from __future__ import annotations

import json
from typing import Any

from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from cadence import language

#: Where `cadence schema --write` puts the schema, and where rule files point to it (from the repo root).
SCHEMA_FILE = "cadence.schema.json"

#: Patterns for the strings the language checks in code, so editors flag them too.
_PATTERNS = {
    language._cadence_name: language._NAME.pattern,
    language._template: language._TEMPLATE.pattern,
    language._reason: r"\S",
}


def _function(schema: Any) -> Any:
    return schema["function"]["function"]


def _takes_one_item(schema: Any) -> bool:
    """Whether a field's core schema is a list that also takes one bare item (language._one_or_many)."""
    while schema["type"] in ("default", "nullable", "function-after"):
        schema = schema["schema"]
    return bool(schema["type"] == "function-before" and _function(schema) is language._one_or_many)


class _EditorSchema(GenerateJsonSchema):
    """Pydantic's schema, plus what the language's own validators accept."""

    def function_after_schema(self, schema: core_schema.AfterValidatorFunctionSchema) -> JsonSchemaValue:
        json_schema = super().function_after_schema(schema)
        pattern = _PATTERNS.get(_function(schema))
        return {**json_schema, "pattern": pattern} if pattern else json_schema

    def model_field_schema(self, schema: core_schema.ModelField) -> JsonSchemaValue:
        json_schema = super().model_field_schema(schema)
        if _takes_one_item(schema["schema"]):
            items = json_schema.pop("items")
            array = {"type": json_schema.pop("type"), "items": items}
            # pydantic words a tuple's length bound behind a validator as minLength, a string's bound.
            for bound in ("minItems", "minLength"):
                if bound in json_schema:
                    array["minItems"] = json_schema.pop(bound)
            json_schema["anyOf"] = [items, array]
        return json_schema


def cadence_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one cadence file."""
    schema = language.CadenceSpec.model_json_schema(mode="validation", schema_generator=_EditorSchema)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"urn:cadence:{SCHEMA_FILE}",
        **schema,
        "title": "Cadence",
        "description": "A cadence: who is touched, on which channel, when, and why. "
        "One file in rules/; `cadence lint` checks what the schema cannot.",
    }


def render() -> str:
    """The schema as the shipped file holds it: sorted keys, so regenerating changes only what changed."""
    return json.dumps(cadence_schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
