"""The OpenAPI document describes every successful body: each operation's 2xx response has a schema that says
what is in it (a model, a typed array or a string/binary body), not an empty one or a free-form ``dict``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from api.app import create_app
from db.settings import Settings


def describes(schema: dict[str, Any]) -> bool:
    if not schema:
        return False
    if "$ref" in schema or schema.get("properties"):
        return True
    if "anyOf" in schema or "oneOf" in schema:
        return all(describes(option) for option in schema.get("anyOf", schema.get("oneOf", [])))
    if schema.get("type") == "array":
        return describes(schema.get("items") or {})
    return schema.get("type") in {"string", "integer", "number", "boolean"}


def undescribed_2xx(document: dict[str, Any]) -> list[str]:
    """`METHOD path status` for each 2xx response with no content schema, or an empty one."""
    missing = []
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, response in operation.get("responses", {}).items():
                if not status.startswith("2"):
                    continue
                contents = response.get("content") or {}
                if status == "204":
                    continue  # No Content has no body to describe
                if not contents or any(not describes(media.get("schema") or {}) for media in contents.values()):
                    missing.append(f"{method.upper()} {path} {status}")
    return missing


def test_the_check_sees_an_undescribed_body() -> None:
    document = {
        "paths": {
            "/a": {"get": {"responses": {"200": {"content": {"application/json": {"schema": {}}}}}}},
            "/b": {"post": {"responses": {"201": {"description": "ok"}}}},
            "/d": {
                "get": {
                    "responses": {
                        "200": {
                            "content": {
                                "application/json": {"schema": {"type": "object", "additionalProperties": True}}
                            }
                        }
                    }
                }
            },
            "/c": {"get": {"responses": {"200": {"content": {"application/json": {"schema": {"type": "string"}}}}}}},
        }
    }
    assert undescribed_2xx(document) == ["GET /a 200", "POST /b 201", "GET /d 200"]


def test_every_operation_describes_its_2xx_body(tmp_path: Path) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'openapi.db'}", var_dir=tmp_path)
    document = create_app(settings).openapi()
    assert len(document["paths"]) > 20  # every router was mounted
    assert undescribed_2xx(document) == []
