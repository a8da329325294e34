"""The smart-home tools against a fake Home Assistant that speaks its REST API over real HTTP
on 127.0.0.1: states, lights, thermostats, scenes, and every failure as a clear ToolError
(401 bad token, 404 unknown device, unreachable, not configured) that never shows the token."""
from __future__ import annotations

import json

import pytest

from assistant.backends import closed_port, make_ctx, tool
from assistant.fake_home_assistant import FakeHomeAssistant
from voicemesh.assistant.toolkit import ToolError, call
from voicemesh.assistant.tools import home

TOKEN = "test-long-lived-token"


async def run(tools, name, **arguments):
    return json.loads(await call(tool(tools, name), arguments))


def home_tools(tmp_path, url, token=TOKEN):
    return home.tools(make_ctx(tmp_path, home_assistant_url=url, home_assistant_token=token))


async def test_devices_and_their_states(tmp_path):
    async with FakeHomeAssistant(TOKEN) as ha:
        tools = home_tools(tmp_path, ha.url)
        lights = (await run(tools, "home_list_devices", kind="light"))["devices"]
        assert lights == [
            {"id": "light.kitchen", "name": "Kitchen", "state": "off"},
            {"id": "light.living_room", "name": "Living Room", "state": "on", "brightness_pct": 100},
            {"id": "light.living_room_lamp", "name": "Living Room Lamp", "state": "off"}]
        everything = (await run(tools, "home_list_devices"))["devices"]
        assert {device["id"] for device in everything} == set(ha.states)
        by_name = await run(tools, "home_device_status", device="hallway")  # any kind of device, when none is given
        assert by_name == await run(tools, "home_device_status", device="climate.hallway")
        thermostat = await run(tools, "home_device_status", device="hallway", kind="climate")
        assert thermostat == {"id": "climate.hallway", "name": "Hallway Thermostat", "state": "heat", "temperature": 19.0,
                              "current_temperature": 18.5, "unit_of_measurement": "°C"}
        assert ha.authorizations and set(ha.authorizations) == {f"Bearer {TOKEN}"}


async def test_lights_by_name_or_id(tmp_path):
    async with FakeHomeAssistant(TOKEN) as ha:
        tools = home_tools(tmp_path, ha.url)
        shown = await run(tools, "home_light", device="kitchen", brightness_pct=40)
        assert shown == {"id": "light.kitchen", "name": "Kitchen", "state": "on", "brightness_pct": 40}
        assert ha.calls[-1] == ("light", "turn_on", {"entity_id": "light.kitchen", "brightness_pct": 40})
        assert ha.states["light.kitchen"]["attributes"]["brightness"] == 102

        # "living room" is exactly one light's name, though two names contain it
        shown = await run(tools, "home_light", device="Living Room", on=False)
        assert shown == {"id": "light.living_room", "name": "Living Room", "state": "off"}
        assert ha.states["light.living_room"]["state"] == "off"
        # turning on a light already on changes nothing: the answer is then asked for
        await run(tools, "home_light", device="light.kitchen")
        assert (await run(tools, "home_light", device="light.kitchen"))["state"] == "on"


async def test_thermostat_and_scene(tmp_path):
    async with FakeHomeAssistant(TOKEN) as ha:
        tools = home_tools(tmp_path, ha.url)
        shown = await run(tools, "home_set_temperature", device="hallway", temperature=21.5)
        assert shown["temperature"] == 21.5 and ha.states["climate.hallway"]["attributes"]["temperature"] == 21.5
        assert ha.calls[-1] == ("climate", "set_temperature", {"entity_id": "climate.hallway", "temperature": 21.5})
        assert await run(tools, "home_activate_scene", scene="movie night") == {"activated": "Movie Night"}
        assert ha.calls[-1] == ("scene", "turn_on", {"entity_id": "scene.movie_night"})


async def test_unknown_devices_and_bad_values_are_explained(tmp_path):
    async with FakeHomeAssistant(TOKEN) as ha:
        tools = home_tools(tmp_path, ha.url)
        for name, arguments, message in [
            ("home_light", {"device": "light.garage"}, "Home Assistant has no device 'light.garage'"),
            ("home_device_status", {"device": "sensor.nothing"}, "Home Assistant has no device 'sensor.nothing'"),
            ("home_light", {"device": "garage"},
             "no light matches 'garage'; the lights are: Kitchen, Living Room, Living Room Lamp"),
            ("home_light", {"device": "living"}, "several lights match 'living': Living Room, Living Room Lamp"),
            ("home_light", {"device": "climate.hallway"}, "'climate.hallway' is not a light"),
            ("home_device_status", {"device": "light.x/../../config"}, "is not a device id"),
            ("home_light", {"device": "kitchen", "brightness_pct": 150}, "brightness is a percentage from 0 to 100"),
            ("home_light", {"device": "kitchen", "on": "yes"}, "'on' must be true or false"),
            ("home_set_temperature", {"device": "hallway", "temperature": 80}, "can be set from 7 to 35 degrees, not 80"),
            ("home_activate_scene", {"scene": "party"}, "no scene matches 'party'; the scenes are: Movie Night"),
            ("home_list_devices", {"kind": "toaster"}, "unknown kind of device 'toaster'"),
            ("home_device_status", {"device": "toaster"}, "no device matches 'toaster'; the devices are: Kitchen, "),
        ]:
            with pytest.raises(ToolError, match=message):
                await call(tool(tools, name), arguments)
        assert ha.calls == []  # nothing was switched on the way


async def test_a_bad_token_is_a_401_the_user_can_fix_and_is_never_shown(tmp_path):
    async with FakeHomeAssistant(TOKEN) as ha:
        tools = home_tools(tmp_path, ha.url, token="wrong-secret-token")
        with pytest.raises(ToolError, match=r"refused the access token \(401 Unauthorized\)") as caught:
            await call(tool(tools, "home_list_devices"), {})
        assert "wrong-secret-token" not in str(caught.value)
        assert ha.authorizations == ["Bearer wrong-secret-token"]


async def test_the_token_can_come_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME_ASSISTANT_TOKEN", TOKEN)
    async with FakeHomeAssistant(TOKEN) as ha:
        tools = home.tools(make_ctx(tmp_path, home_assistant_url=ha.url))
        assert (await run(tools, "home_device_status", device="kitchen"))["state"] == "off"


async def test_unreachable_or_unconfigured(tmp_path, monkeypatch):
    monkeypatch.delenv("HOME_ASSISTANT_TOKEN", raising=False)
    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(ToolError, match=f"Home Assistant at {url} cannot be reached"):
        await call(tool(home_tools(tmp_path, url), "home_list_devices"), {})
    with pytest.raises(ToolError, match="home_assistant_url is missing"):
        await call(tool(home.tools(make_ctx(tmp_path)), "home_list_devices"), {})
    with pytest.raises(ToolError, match="no Home Assistant token"):
        await call(tool(home.tools(make_ctx(tmp_path, home_assistant_url=url)), "home_list_devices"), {})
    with pytest.raises(ToolError, match="is not a valid http"):
        await call(tool(home_tools(tmp_path, "ftp//nowhere"), "home_list_devices"), {})


async def test_a_home_assistant_that_never_answers_times_out(tmp_path):
    async with FakeHomeAssistant(TOKEN) as ha:
        ha.stalled = True
        client = home.HomeAssistant(ha.url, TOKEN, timeout_s=0.2)
        with pytest.raises(ToolError, match=f"Home Assistant at {ha.url} did not answer within 0.2 s"):
            await client.states()


async def test_an_unknown_service_is_reported_with_home_assistants_message(tmp_path):
    async with FakeHomeAssistant(TOKEN) as ha:
        client = home.HomeAssistant(ha.url, TOKEN)
        with pytest.raises(ToolError, match="answered 400 to POST /api/services/light/explode: Service light.explode not found"):
            await client.call_service("light", "explode", {"entity_id": "light.kitchen"})
        assert "test-long-lived-token" not in repr(client)
