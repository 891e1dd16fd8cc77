"""The published verdict contract (worker/schemas/verdict.schema.json) as a test helper: every test
that makes verdicts can check that they are what integrators were promised."""
from __future__ import annotations

import json
from functools import cache

import jsonschema

from worker.verdict import SCHEMA_PATH


@cache
def verdict_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def schema_errors(verdict: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in verdict_validator().iter_errors(verdict)]


def assert_valid_verdict(verdict: dict) -> dict:
    errors = schema_errors(verdict)
    assert not errors, f"verdict for {verdict.get('source')} breaks the schema: {errors[:5]}"
    return verdict
