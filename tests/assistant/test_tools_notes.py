"""Notes search on a real folder and a real FTS5 index: matches cite the file, the index follows
the folder by mtime (changed, new and removed notes), new notes are written, bad input explained."""
from __future__ import annotations

import json
import os

import pytest

from assistant.backends import make_ctx, tool
from voicemesh.assistant.toolkit import ToolError, call
from voicemesh.assistant.tools import notes
from voicemesh.assistant.tools.notes import Notes


def write(folder, name, text, mtime_ns):
    """A note with a chosen mtime, so a rewrite is seen as changed however coarse the file system's clock."""
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.utime(path, ns=(mtime_ns, mtime_ns))


@pytest.fixture
def folder(tmp_path):
    notes_dir = tmp_path / "notes"
    write(notes_dir, "garden.md", "# Garden\n\nPlant the tulip bulbs in October, 10 cm deep.\n", 1_000)
    write(notes_dir, "recipes/pancakes.txt", "Pancakes: 250 g flour, 3 eggs, half a litre of milk.\n", 1_000)
    write(notes_dir, "wifi.md", "# Home network\n\nThe guest wifi password is on the fridge.\n", 1_000)
    write(notes_dir, ".hidden/secret.md", "tulip secret\n", 1_000)
    write(notes_dir, "photo.jpg", "not a note", 1_000)
    return notes_dir


def search(ctx, query, **extra):
    return json.loads(tool(notes.tools(ctx), "notes_search").run({"query": query, **extra}))


def test_search_cites_the_file_and_a_snippet(tmp_path, folder):
    ctx = make_ctx(tmp_path)
    [match] = search(ctx, "when to plant tulips")["matches"]  # no note has every word: any of them; "tulips" stems to tulip
    assert match["file"] == "garden.md" and match["title"] == "Garden"
    assert "tulip bulbs in October" in match["snippet"]
    [match] = search(ctx, "eggs flour")["matches"]
    assert match == {"file": "recipes/pancakes.txt", "title": "pancakes",
                     "snippet": "Pancakes: 250 g flour, 3 eggs, half a litre of milk."}
    assert search(ctx, "volcano") == {"matches": [], "note": "no note mentions 'volcano'"}
    assert search(ctx, 'wifi" OR * (NEAR')["matches"][0]["file"] == "wifi.md"  # the user's words are never FTS5 syntax


def test_the_index_follows_the_folder_incrementally(tmp_path, folder):
    index = Notes(folder, tmp_path / "notes.sqlite3")
    assert index.reindex() == (3, 0)
    assert index.reindex() == (0, 0)  # nothing changed: nothing read again
    write(folder, "garden.md", "# Garden\n\nPrune the roses in March.\n", 2_000)
    (folder / "wifi.md").unlink()
    write(folder, "car.md", "Winter tyres go on in November.\n", 2_000)
    assert index.reindex() == (2, 1)
    assert [match.file for match in index.search("roses")] == ["garden.md"]
    assert index.search("tulip") == []
    assert index.search("wifi") == []
    assert [match.file for match in index.search("tyres")] == ["car.md"]


def test_a_new_note_is_written_and_found(tmp_path, folder):
    ctx = make_ctx(tmp_path)
    tools = notes.tools(ctx)
    saved = json.loads(tool(tools, "notes_add").run({"title": "Garden", "text": "Order compost."}))["saved"]
    assert saved == "garden-2.md"  # the existing garden.md is never overwritten
    assert (folder / "garden-2.md").read_text() == "# Garden\n\nOrder compost.\n"
    assert search(ctx, "compost")["matches"][0]["file"] == "garden-2.md"
    assert tool(tools, "notes_read").run({"file": "garden-2.md"}) == "# Garden\n\nOrder compost.\n"


def test_the_description_says_it_is_not_a_web_search(tmp_path):
    description = tool(notes.tools(make_ctx(tmp_path)), "notes_search").description
    assert "not a web search" in description and "notes" in description


def test_a_notes_folder_from_the_settings(tmp_path):
    elsewhere = tmp_path / "Documents" / "notes"
    write(elsewhere, "ideas.md", "A bird feeder for the balcony.\n", 1_000)
    ctx = make_ctx(tmp_path / "data", notes_dir=str(elsewhere))
    assert search(ctx, "balcony")["matches"][0]["file"] == "ideas.md"


async def test_bad_input_is_explained(tmp_path, folder):
    tools = notes.tools(make_ctx(tmp_path))
    for name, arguments, message in [
        ("notes_search", {"query": "?!"}, "give some words"),
        ("notes_search", {"query": "x", "limit": 100}, "limit must be a whole number from 1 to 20"),
        ("notes_search", {}, "missing argument 'query'"),
        ("notes_read", {"file": "../notes.sqlite3"}, "there is no note '../notes.sqlite3'"),
        ("notes_read", {"file": "photo.jpg"}, "there is no note 'photo.jpg'"),
        ("notes_read", {"file": "nothing.md"}, "there is no note 'nothing.md'"),
        ("notes_add", {"title": "x"}, "missing argument 'text'"),
    ]:
        with pytest.raises(ToolError, match=message):
            await call(tool(tools, name), arguments)
