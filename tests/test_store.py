import pytest

from aiagentchat.store import Store

pytestmark = pytest.mark.anyio


async def test_state_survives_reopening(tmp_path):
    path = tmp_path / "db.sqlite"
    store = await Store.open(path)
    assert await store.sync_token() is None
    await store.set_sync_token("s1")
    await store.set_sync_token("s2")
    await store.set_session_id("!a:x", "sess-a")
    assert await store.claim_event("!a:x", "$1")
    assert await store.mark_room_seen("!a:x")
    await store.close()

    store = await Store.open(path)
    assert await store.sync_token() == "s2"
    assert await store.session_id("!a:x") == "sess-a"
    assert await store.session_id("!b:x") is None
    assert not await store.claim_event("!a:x", "$1")
    assert await store.claim_event("!a:x", "$2")
    assert not await store.mark_room_seen("!a:x")
    await store.close()


async def test_session_can_be_forgotten(tmp_path):
    store = await Store.open(tmp_path / "db.sqlite")
    await store.set_session_id("!a:x", "one")
    await store.set_session_id("!a:x", "two")
    assert await store.session_id("!a:x") == "two"
    await store.set_session_id("!a:x", None)
    assert await store.session_id("!a:x") is None
    await store.close()
