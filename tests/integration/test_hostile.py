"""Hostile room members against the running daemon: malformed events never stop it, and are never read twice."""

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


async def test_malformed_events_from_a_member_are_skipped_and_the_daemon_answers_before_and_after_a_restart(world):
    stranger = await world.another_user()
    room = await world.user.create_room(invite=[world.bot_id, stranger.user_id])
    await stranger.join(room)
    daemon = world.daemon([{"id": room}])
    await daemon.start()

    text = {"msgtype": "m.text", "body": "hello"}
    poison = [
        (stranger, "m.room.message", text | {"m.relates_to": "x"}),  # the event that once stopped the daemon
        (stranger, "m.room.message", text | {"m.relates_to": {"m.in_reply_to": ["$a"]}}),
        (stranger, "m.room.message", text | {"org.aiagentchat.hops": "0"}),
        (stranger, "m.room.message", {"msgtype": "m.file", "body": "f", "url": "mxc://x/y", "info": "big"}),
        (stranger, "m.room.encrypted", {"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "", "sender_key": "k",
                                        "session_id": "", "device_id": "D"}),
        (world.user, "m.room.message", text | {"m.relates_to": {"rel_type": 12}}),
    ]  # fmt: skip
    sent = [await sender.send(room, kind, content) for sender, kind, content in poison]
    for event_id in sent:
        await daemon.wait_for_log("event_malformed", event_id=event_id)

    assert "answered after the poison" in await world.ask(room, "say answered after the poison")
    assert daemon.logged("event_failed") == [] and daemon.logged("sync_batch_skipped") == []

    assert await daemon.stop() == 0
    await daemon.start()
    assert "answered after a restart" in await world.ask(room, "say answered after a restart")
    assert daemon.logged("event_malformed") == []  # the sync position moved past them: never read again
    assert daemon.proc is not None and daemon.proc.returncode is None
