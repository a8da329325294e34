"""The smart home: a Home Assistant client over its REST API (GET /api/states[/<entity_id>],
POST /api/services/<domain>/<service>), authenticated by a long-lived access token.

The URL is settings["home_assistant_url"]; the token settings["home_assistant_token"] or the
environment's HOME_ASSISTANT_TOKEN. The token goes into the Authorization header and nowhere
else: never into a result, an error message or a log line.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

import aiohttp

from voicemesh.assistant.toolkit import Context, Tool, ToolError
from voicemesh.assistant.tools.when import as_json, required

TIMEOUT_S = 10  # Home Assistant answers a service call within 10 s (it stops waiting for the device then)
ENTITY_ID = re.compile(r"[a-z0-9_]+\.[a-z0-9_]+")
DOMAINS = ("light", "switch", "climate", "scene", "cover", "fan", "media_player", "sensor", "binary_sensor", "lock")


class HomeAssistant:
    def __init__(self, url: str, token: str, timeout_s: float = TIMEOUT_S) -> None:
        if not url:
            raise ToolError("the smart home is not set up: home_assistant_url is missing from the settings")
        if not token:
            raise ToolError("the smart home is not set up: no Home Assistant token "
                            "(home_assistant_token or HOME_ASSISTANT_TOKEN)")
        self.url, self._token, self.timeout_s = url.rstrip("/"), token, timeout_s

    def __repr__(self) -> str:  # no token in tracebacks or logs
        return f"HomeAssistant({self.url!r})"

    # -- the REST API ---------------------------------------------------------------------------

    async def states(self) -> list[dict[str, Any]]:
        return await self._request("GET", "/api/states")

    async def state(self, entity_id: str) -> dict[str, Any]:
        return await self._request("GET", f"/api/states/{entity_id}", entity_id=entity_id)

    async def call_service(self, domain: str, service: str, data: dict[str, Any]) -> list[dict[str, Any]]:
        """The states changed by the call, as Home Assistant returns them."""
        return await self._request("POST", f"/api/services/{domain}/{service}", data)

    async def _request(self, method: str, path: str, body: Any = None, entity_id: str | None = None) -> Any:
        headers = {"Authorization": f"Bearer {self._token}", "Content-Type": "application/json"}
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as session:
                async with session.request(method, self.url + path, json=body, headers=headers) as response:
                    if response.status == 401:
                        raise ToolError("Home Assistant refused the access token (401 Unauthorized): check home_assistant_token")
                    if response.status == 404:
                        raise ToolError(f"Home Assistant has no device '{entity_id}'" if entity_id
                                        else f"Home Assistant does not know {path} (404)")
                    if response.status >= 400:
                        message = await _message(response)
                        raise ToolError(f"Home Assistant answered {response.status} to {method} {path}: {message}")
                    return await response.json(content_type=None)
        except aiohttp.InvalidURL:
            raise ToolError(f"home_assistant_url '{self.url}' is not a valid http(s) address") from None
        except TimeoutError:  # before ClientConnectionError: aiohttp's own timeouts are both
            raise ToolError(f"Home Assistant at {self.url} did not answer within {self.timeout_s:g} s") from None
        except aiohttp.ClientConnectionError:
            raise ToolError(f"Home Assistant at {self.url} cannot be reached") from None
        except ValueError:  # not JSON
            raise ToolError(f"Home Assistant at {self.url} sent an answer that is not JSON") from None

    # -- what the tools do ----------------------------------------------------------------------

    async def find(self, device: str, domain: str | None = None) -> dict[str, Any]:
        """The state of the one entity named by its id ('light.kitchen') or friendly name ('kitchen'),
        of `domain` if given, else of any kind the tools know."""
        if "." in device:
            if not ENTITY_ID.fullmatch(device):
                raise ToolError(f"'{device}' is not a device id (like light.kitchen)")
            if domain and device.split(".", 1)[0] != domain:
                raise ToolError(f"'{device}' is not a {domain}")
            return await self.state(device)
        kinds = (domain,) if domain else DOMAINS
        candidates = [state for state in await self.states() if state["entity_id"].split(".", 1)[0] in kinds]
        wanted = device.lower().strip()
        named = [state for state in candidates if _name(state).lower() == wanted]
        matches = named or [state for state in candidates if wanted in _name(state).lower() or wanted in state["entity_id"]]
        if len(matches) == 1:
            return matches[0]
        known = ", ".join(_name(state) for state in (matches or candidates)[:10]) or "none"
        kind = domain or "device"
        if not matches:
            raise ToolError(f"no {kind} matches '{device}'; the {kind}s are: {known}")
        raise ToolError(f"several {kind}s match '{device}': {known}. Say which.")

    async def devices(self, domain: str | None = None) -> list[dict[str, Any]]:
        if domain and domain not in DOMAINS:
            raise ToolError(f"unknown kind of device '{domain}': use one of {', '.join(DOMAINS)}")
        return [_summary(state) for state in await self.states()
                if state["entity_id"].split(".", 1)[0] in ((domain,) if domain else DOMAINS)]

    async def light(self, device: str, on: bool, brightness_pct: float | None = None) -> dict[str, Any]:
        entity = await self.find(device, "light")
        data: dict[str, Any] = {"entity_id": entity["entity_id"]}
        if brightness_pct is not None:
            if not on:
                raise ToolError("a brightness only applies when turning a light on")
            if not isinstance(brightness_pct, int | float) or isinstance(brightness_pct, bool) or not 0 <= brightness_pct <= 100:
                raise ToolError("brightness is a percentage from 0 to 100")
            data["brightness_pct"] = brightness_pct
        return await self._after(entity, await self.call_service("light", "turn_on" if on else "turn_off", data))

    async def set_temperature(self, device: str, temperature: float) -> dict[str, Any]:
        if not isinstance(temperature, int | float) or isinstance(temperature, bool):
            raise ToolError("temperature must be a number")
        entity = await self.find(device, "climate")
        low, high = entity["attributes"].get("min_temp"), entity["attributes"].get("max_temp")
        if low is not None and high is not None and not low <= temperature <= high:
            raise ToolError(f"{_name(entity)} can be set from {low} to {high} degrees, not {temperature}")
        data = {"entity_id": entity["entity_id"], "temperature": temperature}
        changed = await self.call_service("climate", "set_temperature", data)
        return await self._after(entity, changed)

    async def scene(self, device: str) -> dict[str, Any]:
        entity = await self.find(device, "scene")
        await self.call_service("scene", "turn_on", {"entity_id": entity["entity_id"]})
        return {"activated": _name(entity)}

    async def _after(self, entity: dict[str, Any], changed: list[dict[str, Any]]) -> dict[str, Any]:
        """The entity's state after a call: from the call's answer, else asked for."""
        for state in changed if isinstance(changed, list) else []:
            if state.get("entity_id") == entity["entity_id"]:
                return _summary(state)
        return _summary(await self.state(entity["entity_id"]))


def _name(state: dict[str, Any]) -> str:
    return str(state.get("attributes", {}).get("friendly_name") or state["entity_id"])


def _summary(state: dict[str, Any]) -> dict[str, Any]:
    """What the model needs to say a device's state: not every attribute Home Assistant keeps."""
    attributes = state.get("attributes", {})
    shown = {"id": state["entity_id"], "name": _name(state), "state": state.get("state")}
    if attributes.get("brightness") is not None:  # 0-255 in Home Assistant
        shown["brightness_pct"] = round(attributes["brightness"] * 100 / 255)
    for key in ("temperature", "current_temperature", "hvac_action", "unit_of_measurement"):
        if attributes.get(key) is not None:
            shown[key] = attributes[key]
    return shown


async def _message(response: aiohttp.ClientResponse) -> str:
    text = (await response.text())[:200]
    try:
        return str(json.loads(text).get("message", text))
    except (ValueError, AttributeError):
        return text


# -- the tools ----------------------------------------------------------------------------------

def tools(ctx: Context) -> list[Tool]:
    def client() -> HomeAssistant:  # read when used: settings and environment may change between calls
        token = ctx.settings.get("home_assistant_token") or os.environ.get("HOME_ASSISTANT_TOKEN", "")
        return HomeAssistant(ctx.settings.get("home_assistant_url", ""), token)

    async def list_devices(arguments: dict[str, Any]) -> str:
        return as_json({"devices": await client().devices(arguments.get("kind") or None)})

    async def device_status(arguments: dict[str, Any]) -> str:
        kind = arguments.get("kind") or None
        if kind and kind not in DOMAINS:
            raise ToolError(f"unknown kind of device '{kind}': use one of {', '.join(DOMAINS)}")
        return as_json(_summary(await client().find(required(arguments, "device"), kind)))

    async def light(arguments: dict[str, Any]) -> str:
        on = arguments.get("on", True)
        if not isinstance(on, bool):
            raise ToolError("'on' must be true or false")
        return as_json(await client().light(required(arguments, "device"), on, arguments.get("brightness_pct")))

    async def climate(arguments: dict[str, Any]) -> str:
        return as_json(await client().set_temperature(required(arguments, "device"), required(arguments, "temperature")))

    async def scene(arguments: dict[str, Any]) -> str:
        return as_json(await client().scene(required(arguments, "scene")))

    device = {"type": "string", "description": "the device's name ('kitchen') or id ('light.kitchen')"}
    return [
        Tool("home_list_devices", "List the smart-home devices and their states, optionally of one kind.",
             {"type": "object", "properties": {"kind": {"type": "string", "enum": list(DOMAINS)}}},
             list_devices),
        Tool("home_device_status", "The state of one smart-home device.",
             {"type": "object", "required": ["device"], "properties": {
                 "device": device, "kind": {"type": "string", "enum": list(DOMAINS), "description": "to narrow the search"}}},
             device_status),
        Tool("home_light", "Turn a light on or off, or set its brightness.",
             {"type": "object", "required": ["device"], "properties": {
                 "device": device, "on": {"type": "boolean", "description": "default true"},
                 "brightness_pct": {"type": "number", "description": "0-100, when turning on"}}},
             light),
        Tool("home_set_temperature", "Set the target temperature of a thermostat.",
             {"type": "object", "required": ["device", "temperature"], "properties": {
                 "device": device, "temperature": {"type": "number", "description": "degrees"}}},
             climate),
        Tool("home_activate_scene", "Activate a smart-home scene ('movie night').",
             {"type": "object", "required": ["scene"], "properties": {"scene": {"type": "string"}}},
             scene),
    ]
