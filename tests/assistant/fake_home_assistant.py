"""A fake Home Assistant speaking the real REST API (the part the assistant uses) over real HTTP.

Home Assistant itself cannot run here; this aiohttp server on 127.0.0.1 answers as its `api`
integration does: Bearer-token auth (401 "401: Unauthorized" otherwise), GET /api/,
GET /api/states, GET /api/states/<entity_id> (404 {"message": "Entity not found."}) and
POST /api/services/<domain>/<service> with a JSON body naming entity_id, which changes the
held states and answers the list of states it changed. State objects are shaped as Home
Assistant's: entity_id, state, attributes, last_changed, last_updated, context.
"""
from __future__ import annotations

import asyncio
import copy
import json
import uuid
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

DEFAULT_STATES = {
    "light.kitchen": ("off", {"friendly_name": "Kitchen", "supported_color_modes": ["brightness"]}),
    "light.living_room": ("on", {"friendly_name": "Living Room", "brightness": 255, "supported_color_modes": ["brightness"]}),
    "light.living_room_lamp": ("off", {"friendly_name": "Living Room Lamp"}),
    "climate.hallway": ("heat", {"friendly_name": "Hallway Thermostat", "temperature": 19.0, "current_temperature": 18.5,
                                 "min_temp": 7, "max_temp": 35, "hvac_modes": ["off", "heat"], "unit_of_measurement": "°C"}),
    "scene.movie_night": ("unknown", {"friendly_name": "Movie Night"}),
    "sensor.outside_temperature": ("3.5", {"friendly_name": "Outside Temperature", "unit_of_measurement": "°C"}),
}


class FakeHomeAssistant:
    def __init__(self, token: str = "test-long-lived-token") -> None:
        self.token = token
        self.calls: list[tuple[str, str, dict[str, Any]]] = []  # (domain, service, data) of each service call
        self.authorizations: list[str] = []  # every Authorization header seen
        self.states: dict[str, dict[str, Any]] = {}
        for entity_id, (state, attributes) in DEFAULT_STATES.items():
            self._set(entity_id, state, dict(attributes))
        self.url = ""
        self.stalled = False  # if set, requests wait (for a client's timeout) until the server stops
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> FakeHomeAssistant:
        app = web.Application(middlewares=[self._auth])
        app.add_routes([web.get("/api/", self._running), web.get("/api/states", self._all),
                        web.get("/api/states/{entity_id}", self._one),
                        web.post("/api/services/{domain}/{service}", self._service)])
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._release.set()
        await self._runner.cleanup()

    # -- HTTP -----------------------------------------------------------------------------------

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        header = request.headers.get("Authorization", "")
        self.authorizations.append(header)
        if self.stalled:
            await self._release.wait()
        if header != f"Bearer {self.token}":
            return web.Response(status=401, text="401: Unauthorized")
        return await handler(request)

    async def _running(self, request: web.Request) -> web.Response:
        return web.json_response({"message": "API running."})

    async def _all(self, request: web.Request) -> web.Response:
        return web.json_response(list(self.states.values()))

    async def _one(self, request: web.Request) -> web.Response:
        state = self.states.get(request.match_info["entity_id"])
        if state is None:
            return web.json_response({"message": "Entity not found."}, status=404)
        return web.json_response(state)

    async def _service(self, request: web.Request) -> web.Response:
        domain, service = request.match_info["domain"], request.match_info["service"]
        try:
            data = json.loads(await request.text() or "{}")
        except ValueError:
            return web.json_response({"message": "Data should be valid JSON."}, status=400)
        action = SERVICES.get((domain, service))
        if action is None:
            return web.json_response({"message": f"Service {domain}.{service} not found."}, status=400)
        self.calls.append((domain, service, data))
        entity_ids = data.get("entity_id", [])
        changed = []
        for entity_id in [entity_ids] if isinstance(entity_ids, str) else entity_ids:
            if entity_id.split(".", 1)[0] != domain or entity_id not in self.states:
                continue  # as Home Assistant: an entity the service does not know changes nothing
            before = copy.deepcopy(self.states[entity_id])
            state, attributes = action(before["state"], dict(before["attributes"]), data)
            if (state, attributes) != (before["state"], before["attributes"]):
                changed.append(self._set(entity_id, state, attributes))
        return web.json_response(changed)

    def _set(self, entity_id: str, state: str, attributes: dict[str, Any]) -> dict[str, Any]:
        now = datetime.now(UTC).isoformat()
        old = self.states.get(entity_id)
        self.states[entity_id] = {
            "entity_id": entity_id, "state": state, "attributes": attributes,
            "last_changed": now if old is None or old["state"] != state else old["last_changed"],
            "last_updated": now, "context": {"id": uuid.uuid4().hex, "parent_id": None, "user_id": None}}
        return self.states[entity_id]


def _light_on(state: str, attributes: dict[str, Any], data: dict[str, Any]):
    if "brightness_pct" in data:
        attributes["brightness"] = round(float(data["brightness_pct"]) * 255 / 100)
    else:
        attributes.setdefault("brightness", 255)
    return "on", attributes


def _light_off(state: str, attributes: dict[str, Any], data: dict[str, Any]):
    attributes["brightness"] = None  # Home Assistant reports no brightness for a light that is off
    return "off", attributes


def _set_temperature(state: str, attributes: dict[str, Any], data: dict[str, Any]):
    attributes["temperature"] = float(data["temperature"])
    return state, attributes


def _scene_on(state: str, attributes: dict[str, Any], data: dict[str, Any]):
    return datetime.now(UTC).isoformat(), attributes  # a scene's state is when it was last activated


SERVICES = {("light", "turn_on"): _light_on, ("light", "turn_off"): _light_off,
            ("climate", "set_temperature"): _set_temperature, ("scene", "turn_on"): _scene_on}
