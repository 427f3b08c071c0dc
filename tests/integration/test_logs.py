"""The daemon's log stream: JSON lines end to end, libraries' records included, no secret in any of them."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


async def test_at_debug_every_line_is_json_the_libraries_included_and_the_token_never_shows(world):
    room = await world.room()
    daemon = world.daemon([{"id": room}], settings={"daemon": {"log_level": "DEBUG"}})
    await daemon.start()
    assert "hello" in await world.ask(room, "say hello")
    assert await daemon.stop() == 0

    assert [entry["text"] for entry in daemon.logs if entry["event"] == "raw"] == []
    loggers = {entry.get("logger", "") for entry in daemon.logs}
    assert {"asyncio", "nio.responses", "aiagentchat.bot"} <= loggers, loggers
    token = json.loads((world.tmp_path / "data" / "credentials.json").read_text())["access_token"]
    assert any("[redacted]" in entry["event"] for entry in daemon.logs if entry["logger"] == "nio.responses")
    assert token not in "\n".join(daemon.raw)
