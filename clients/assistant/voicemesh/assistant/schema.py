"""Checking a tool call's arguments against the tool's JSON schema before the tool runs.

Only what the tools' schemas use: an object, its required properties, each property's type
and enum, and additionalProperties: false. The message names the argument and says what was
expected, so the model can correct itself on the next try.
"""
from __future__ import annotations

import json
from typing import Any

from voicemesh.assistant.toolkit import ToolError

_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,), "array": (list,), "object": (dict,),
}


def parse_arguments(name: str, arguments_json: str) -> dict[str, Any]:
    """The arguments the model wrote, as a dict; ToolError when they are not a JSON object."""
    text = arguments_json.strip() or "{}"  # a call without arguments may come with none at all
    try:
        arguments = json.loads(text)
    except json.JSONDecodeError as err:
        raise ToolError(f"the arguments of {name} are not valid JSON ({err.msg} at character {err.pos}): "
                        f"send a JSON object such as {{\"text\": \"...\"}}") from None
    if not isinstance(arguments, dict):
        raise ToolError(f"the arguments of {name} must be a JSON object, not {type(arguments).__name__}")
    return arguments


def check_arguments(name: str, schema: dict[str, Any], arguments: dict[str, Any]) -> None:
    """Raise ToolError naming every argument that does not fit `schema`."""
    properties: dict[str, Any] = schema.get("properties", {})
    problems = [f"'{key}' is required" for key in schema.get("required", ()) if key not in arguments]
    for key, value in arguments.items():
        spec = properties.get(key)
        if spec is None:
            if schema.get("additionalProperties") is False:
                problems.append(f"'{key}' is not an argument of {name} (it takes {', '.join(properties) or 'none'})")
            continue
        problem = _check_value(key, spec, value)
        if problem:
            problems.append(problem)
    if problems:
        raise ToolError(f"bad arguments for {name}: " + "; ".join(problems))


def _check_value(key: str, spec: dict[str, Any], value: Any) -> str:
    wanted = spec.get("type")
    names = wanted if isinstance(wanted, list) else [wanted] if wanted else []
    if names and value is not None and not any(_is(value, kind) for kind in names):
        return f"'{key}' must be {' or '.join(names)}, not {json.dumps(value)}"
    if "enum" in spec and value not in spec["enum"]:
        return f"'{key}' must be one of {', '.join(json.dumps(option) for option in spec['enum'])}, not {json.dumps(value)}"
    return ""


def _is(value: Any, kind: str) -> bool:
    if isinstance(value, bool):  # JSON true/false is a boolean, never a number
        return kind == "boolean"
    if kind == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _TYPES.get(kind, (object,)))
