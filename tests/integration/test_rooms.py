"""Rooms made from the chat, end to end (real Synapse, real CLI, scripted model): an admin invites the bot to a
room that is in no settings file, the bot serves it in a working directory of its own, keeps serving it after a
restart, and takes the admin's commands there; anyone else's invite is ignored."""

import json
from typing import Any

import pytest

from tests.integration.conftest import joined, room_dir, run_ended
from tests.integration.test_cchat import Cchat
from tests.integration.test_conversation import reply_to
from tests.integration.test_doctor import doctor

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


def left(events: list[dict[str, Any]], user_id: str) -> bool:
    return any(
        e.get("type") == "m.room.member" and e.get("state_key") == user_id and e["content"].get("membership") == "leave"
        for e in events
    )


async def command(world, room: str, text: str, sender=None) -> str:
    """Send a command (as `sender`, default the world's user) and return the bot's answer to it."""
    event_id = await (sender or world.user).send_text(room, text)
    return (await reply_to(world, room, event_id))["content"]["body"]


def admin_daemon(world, defaults: dict[str, Any] | None = None, **daemon: Any):
    """A daemon that serves no room from its file, with the world's user as its admin."""
    settings = {"daemon": {"admins": [world.user.user_id]} | daemon, "room_defaults": defaults or {"timeout_s": 45}}
    return world.daemon([], settings=settings)


async def test_an_admins_invite_makes_a_room_served_in_its_own_directory_across_a_restart(world):
    daemon = admin_daemon(world)
    await daemon.start()

    room = await world.user.create_room(invite=[world.bot_id], name="made from the chat")
    await daemon.wait_for_log("invite_accepted", room_id=room, made_from_chat=True)
    await world.user.wait_for(lambda events: joined(events, world.bot_id), room_id=room)
    workdir = room_dir(world, "rooms", room)
    assert f"tool said: {workdir}" in await world.ask(room, "bash pwd")

    stranger = await world.another_user()
    elsewhere = await stranger.create_room(invite=[world.bot_id])
    await daemon.wait_for_log("invite_ignored", room_id=elsewhere, inviter=stranger.user_id)
    assert not daemon.logged("invite_accepted", room_id=elsewhere)

    await daemon.stop()
    await daemon.start()
    assert "it still is" in await world.ask(room, "say it still is")
    status = await command(world, room, "!status")
    assert "`allowed_users` = `" + world.user.user_id + "` (chat)" in status
    assert "`timeout_s` = `45.0` (room_defaults)" in status
    assert "`workdir` = `" + str(workdir) + "` (built-in default)" in status

    await world.user._client().room_invite(room, stranger.user_id)
    await stranger.join(room)
    for text in ("say too early", f"!allow {stranger.user_id}"):  # neither a prompt nor a command from them
        early = await stranger.send_text(room, text)
        await daemon.wait_for_log("prompt_ignored", event_id=early, reason="sender not in allowed_users")
    assert "is not a Matrix user id" in await command(world, room, "!allow stranger")
    assert f"{stranger.user_id} may now prompt" in await command(world, room, f"!allow {stranger.user_id}")
    asked = await stranger.send_text(room, "say welcome in")
    await world.user.wait_for(run_ended(asked), timeout=60, room_id=room)
    assert not daemon.logged("agent_closing", reason="settings changed")  # `!allow` keeps the agent running
    refused = await command(world, room, f"!deny {world.user.user_id}", sender=stranger)
    assert "is for the daemon's admins" in refused and "you are not one" in refused

    goodbye = await command(world, room, "!leave")
    assert f"Its working directory `{workdir}` stays" in goodbye
    await world.user.wait_for(lambda events: left(events, world.bot_id), room_id=room)
    await daemon.wait_for_log("room_left", room_id=room, ok=True)
    assert workdir.is_dir()
    await daemon.stop()
    await daemon.start()  # forgotten: not joined again
    assert not daemon.logged("room_join_failed") and daemon.logged("ready")[-1]["rooms"] == 0


async def test_an_admin_chooses_the_rooms_project_and_tools_within_the_roots(world):
    roots = world.tmp_path / "code"
    site = roots / "site"
    site.mkdir(parents=True)
    outside = world.tmp_path / "elsewhere"
    outside.mkdir()
    (roots / "escape").symlink_to(outside)
    daemon = admin_daemon(world, {"unlisted_tools": "deny"}, project_roots=[str(roots)])
    await daemon.start()
    room = await world.user.create_room(invite=[world.bot_id])
    await world.user.wait_for(lambda events: joined(events, world.bot_id), room_id=room)

    assert "outside the project roots" in await command(world, room, f"!project {outside}")
    assert "outside the project roots" in await command(world, room, f"!project {site}/../../elsewhere")
    escaped = await command(world, room, f"!project {roots}/escape")
    assert f"(it leads to `{outside}`) is outside the project roots" in escaped
    assert "does not exist" in await command(world, room, f"!project {roots}/missing")
    assert f"Working directory: `{site}`" in await command(world, room, f"!project {site}")
    await daemon.wait_for_log("room_changed", room_id=room, command="project", detail=str(site))
    assert f"tool said: {site}" in await world.ask(room, "bash pwd")

    assert "Bash denied" in await world.ask(room, "bash touch touched.txt")  # room_defaults: unlisted_tools deny
    assert not (site / "touched.txt").exists()
    tools = await command(world, room, "!tools allow Bash(touch:*), Read")
    assert "**Run without asking:** `Bash(touch:*)`, `Read`" in tools
    assert "is not a tool name" in await command(world, room, "!tools deny rm -rf")
    await world.ask(room, "bash touch touched.txt")
    assert (site / "touched.txt").exists()
    status = await command(world, room, "!status")
    assert f"`workdir` = `{site}` (chat)" in status and "`unlisted_tools` = `deny` (room_defaults)" in status


async def test_cchat_new_makes_a_room_the_bot_serves_in_the_project_given(world):
    cli = Cchat(world.tmp_path / "cchat")
    cli.env["CCHAT_BOT"] = world.bot_id
    await cli.login(world.synapse.base_url, world.user.user_id, world.user_password)
    roots = world.tmp_path / "code"
    site = roots / "site"
    site.mkdir(parents=True)
    # cchat's own device is not cross-signed: this room's bot shares its keys with every device
    daemon = admin_daemon(world, {"trust": "all"}, project_roots=[str(roots)])
    await daemon.start()
    other = await world.another_user()

    made = await cli("new", "site work", "--workdir", str(site), "--invite", other.user_id)
    assert made.code == 0, made.stderr
    room = made.stdout.strip()
    assert room.startswith("!") and f"Working directory: `{site}`" in made.stderr
    await daemon.wait_for_log("room_changed", room_id=room, command="project", detail=str(site))
    await other.wait_for(lambda _: room in other.invites, room_id=room)

    listed = await cli("rooms", "--config", str(daemon.config))
    assert listed.code == 0, listed.stderr
    assert f"site work\t{room}\t{world.user.user_id}\tstored" in listed.stdout.splitlines()
    config = str(daemon.config)  # names no room: cchat finds this one by its name in the running daemon's database
    sent = await cli(
        "send", "site work", "bash pwd", "--wait", "--json", "--config", config, "--timeout", "240", timeout=300
    )
    assert sent.code == 0, sent.stderr
    assert f"tool said: {site}" in "\n".join(json.loads(sent.stdout)["events"])

    _, output = await doctor(daemon)  # while the daemon runs: the database read through its -wal file
    stored = [line for line in output.splitlines() if f"stored room site work ({room})" in line]
    assert f"✅ stored room site work ({room}): {world.bot_id} is in the room" in stored, output
    assert f"✅ stored room site work ({room}): allowed users: {world.user.user_id}" in stored
    assert f"✅ stored room site work ({room}): its working directory, chosen with `!project`, is under" in output
    warned = f"⚠️ stored room site work ({room}): encrypted; trust all: every device of an allowed user may prompt"
    assert [line.split(" → ")[0] for line in stored if not line.startswith("✅")] == [warned], output

    refused = await cli("new", "elsewhere", "--workdir", str(world.tmp_path))
    assert refused.code == 1 and "is outside the project roots" in refused.stderr
    bad = await cli("new", "x", "--invite", "bob")
    assert bad.code == 2 and "is not a full Matrix ID" in bad.stderr
