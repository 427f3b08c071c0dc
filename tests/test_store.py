import asyncio

import aiosqlite
import pytest

from aiagentchat import store as store_module
from aiagentchat.store import MIGRATIONS, OutboxRow, Prompt, Store

pytestmark = pytest.mark.anyio
ROOM = "!a:x"


def prompt(event_id: str, room_id: str = ROOM) -> Prompt:
    return Prompt(room_id, event_id, "@u:x", f"text of {event_id}", hops=1)


async def test_state_survives_reopening(tmp_path):
    path = tmp_path / "db.sqlite"
    store = await Store.open(path)
    assert await store.sync_token() is None
    await store.set_sync_token("s1")
    await store.set_sync_token("s2")
    await store.set_session_id(ROOM, "sess-a")
    assert await store.add_prompt(prompt("$1"))
    assert await store.mark_room_seen(ROOM)
    await store.close()

    store = await Store.open(path)
    assert await store.sync_token() == "s2"
    assert await store.session_id(ROOM) == "sess-a"
    assert await store.session_id("!b:x") is None
    assert not await store.add_prompt(prompt("$1"))
    assert await store.add_prompt(prompt("$2"))
    assert not await store.mark_room_seen(ROOM)
    await store.close()


async def test_session_can_be_forgotten(tmp_path):
    store = await Store.open(tmp_path / "db.sqlite")
    await store.set_session_id(ROOM, "one")
    await store.set_session_id(ROOM, "two")
    assert await store.session_id(ROOM) == "two"
    await store.add_tool_rule(ROOM, "Bash:git status", "@u:x")
    await store.add_tool_rule("!other:x", "Write", "@u:x")
    assert await store.tool_rules(ROOM) == ["Bash:git status"]
    await store.new_conversation(ROOM)
    assert await store.session_id(ROOM) is None
    assert await store.tool_rules(ROOM) == []
    assert await store.tool_rules("!other:x") == ["Write"]
    await store.close()


async def test_approvals_are_recorded_newest_first(tmp_path):
    store = await Store.open(tmp_path / "s.db")
    for n in range(7):
        await store.add_approval(ROOM, "$p", f"Bash `touch {n}`", "deny" if n % 2 else "allow", "@u:x", f"r{n}")
    await store.add_approval("!other:x", "$q", "Write", "always", "@v:x", "")
    latest = await store.approvals(ROOM, limit=5)
    assert [a.what for a in latest] == [f"Bash `touch {n}`" for n in (6, 5, 4, 3, 2)]
    assert (latest[1].verdict, latest[1].by, latest[1].reason) == ("deny", "@u:x", "r5")
    assert [a.verdict for a in await store.approvals("!other:x")] == ["always"]
    await store.close()


async def test_prompts_keep_their_order_and_state_per_room(tmp_path):
    store = await Store.open(tmp_path / "db.sqlite")
    for event_id in ("$1", "$2", "$3"):
        assert await store.add_prompt(prompt(event_id))
    assert await store.add_prompt(prompt("$other", "!b:x"))
    assert await store.add_prompt(prompt("$busy"), "refused")
    await store.set_prompt_state("$1", "running")
    assert await store.prompts(ROOM, "queued") == [prompt("$2"), prompt("$3")]
    assert await store.prompts(ROOM, "running") == [prompt("$1")]
    assert await store.prompt_state("$busy") == "refused"
    assert await store.prompt_state("$nothing") is None
    await store.close()


async def test_the_outbox_survives_a_restart_with_its_transaction_ids(tmp_path):
    path = tmp_path / "db.sqlite"
    store = await Store.open(path)
    await store.add_prompt(prompt("$1"))
    await store.set_prompt_state("$1", "running")
    first, second, last = (OutboxRow(f"txn{i}", {"body": f"part {i}"}, "$1") for i in range(3))
    await store.queue_outbox(ROOM, [first, second])
    await store.queue_outbox(ROOM, [last], ended=("$1", "done"))
    await store.queue_outbox("!b:x", [OutboxRow("txn-b", {"body": "b"}, None)])
    assert await store.prompt_state("$1") == "done"
    await store.delivered(first)
    await store.close()

    store = await Store.open(path)
    assert await store.outbox(ROOM) == [second, last]
    assert await store.output_events("$1") == 3
    notice = OutboxRow("txn-notice", {"body": "refused"}, "$1")
    await store.replace_outbox(second, notice)
    assert await store.outbox(ROOM) == [notice, last]
    await store.dropped(notice)
    await store.delivered(last)
    assert await store.outbox(ROOM) == []
    assert await store.output_events("$1") == 2
    assert await store.outbox("!b:x") == [OutboxRow("txn-b", {"body": "b"}, None)]
    await store.close()


async def test_events_handled_before_the_inbox_existed_are_never_run(tmp_path):
    path = tmp_path / "db.sqlite"
    async with aiosqlite.connect(path) as db:
        await MIGRATIONS[0](db)
        await db.execute("INSERT INTO handled_events VALUES ('$old', ?, 1)", (ROOM,))
        await db.execute("PRAGMA user_version = 1")
        await db.commit()
    store = await Store.open(path)
    assert not await store.add_prompt(prompt("$old"))
    assert await store.prompt_state("$old") == "done"
    assert await store.prompts(ROOM, "queued") == []
    await store.close()


async def test_a_prompt_keeps_its_thread_and_names_its_conversation(tmp_path):
    store = await Store.open(tmp_path / "db.sqlite")
    threaded = Prompt(ROOM, "$reply", "@u:x", "recall", thread="$root")
    await store.add_prompt(threaded)
    await store.add_prompt(Prompt(ROOM, "$top", "@u:x", "hi"))
    assert await store.prompts(ROOM, "queued") == [threaded, Prompt(ROOM, "$top", "@u:x", "hi")]
    await store.close()
    assert threaded.output_thread("flat") == threaded.output_thread("thread") == "$root"
    top = Prompt(ROOM, "$top", "@u:x", "hi")
    assert top.output_thread("flat") is None and top.output_thread("thread") == "$top"
    assert threaded.conversation("room") == top.conversation("room") == ROOM
    assert threaded.conversation("thread") == f"{ROOM} $root" != top.conversation("thread")


async def test_uploads_wait_for_the_next_prompt_across_a_restart_and_images_stay_with_their_prompt(tmp_path):
    store = await Store.open(tmp_path / "db.sqlite")
    await store.add_upload(ROOM, {"path": "uploads/a.txt", "bytes": 3, "image": False})
    await store.add_upload(ROOM, {"path": "uploads/b.png", "bytes": 70, "image": True})
    await store.add_prompt(Prompt(ROOM, "$p", "@u:x", "look", images=("uploads/b.png",)))
    await store.close()
    store = await Store.open(tmp_path / "db.sqlite")
    assert [upload["path"] for upload in await store.uploads(ROOM)] == ["uploads/a.txt", "uploads/b.png"]
    assert await store.uploads("!other:x") == []
    assert (await store.prompts(ROOM, "queued"))[0].images == ("uploads/b.png",)
    assert [upload["path"] for upload in await store.take_uploads(ROOM)] == ["uploads/a.txt", "uploads/b.png"]
    assert await store.uploads(ROOM) == [] and await store.take_uploads(ROOM) == []
    await store.close()


async def test_refs_are_recorded_with_the_delivery_and_survive_a_restart(tmp_path):
    path = tmp_path / "db.sqlite"
    store = await Store.open(path)
    rows = [OutboxRow(f"txn{i}", {"body": f"part {i}"}, None) for i in range(3)]
    await store.queue_outbox(ROOM, rows)
    await store.delivered(rows[0], ROOM, {"reaction:$1:👀": "$e0"})
    await store.delivered(rows[1], ROOM, {"status:$1": "$e1"})
    await store.delivered(rows[2], ROOM, {"reaction:$1:👀": None})  # taken back
    await store.close()

    store = await Store.open(path)
    assert await store.refs(ROOM) == {"status:$1": "$e1"} and await store.refs("!b:x") == {}
    assert await store.outbox(ROOM) == []
    await store.close()


async def test_a_migration_that_fails_half_way_leaves_the_old_version_and_the_next_start_migrates(
    tmp_path, monkeypatch
):
    path = tmp_path / "db.sqlite"

    async def crashing(db: aiosqlite.Connection) -> None:
        await MIGRATIONS[-1](db)
        raise RuntimeError("killed in the middle of the migration")

    monkeypatch.setattr(store_module, "MIGRATIONS", [*MIGRATIONS[:-1], crashing])
    with pytest.raises(RuntimeError, match="killed"):
        await Store.open(path)
    async with aiosqlite.connect(path) as db:
        assert list(await db.execute_fetchall("PRAGMA user_version")) == [(len(MIGRATIONS) - 1,)]
        assert list(await db.execute_fetchall("SELECT name FROM sqlite_master WHERE name = 'chat_rooms'")) == []

    monkeypatch.undo()
    store = await Store.open(path)
    try:
        await store.add_chat_room(ROOM, "@admin:x", {"allowed_users": ["@admin:x"]})
        assert [room.settings for room in await store.chat_rooms()] == [{"allowed_users": ["@admin:x"]}]
    finally:
        await store.close()
    async with aiosqlite.connect(path) as db:
        assert list(await db.execute_fetchall("PRAGMA user_version")) == [(len(MIGRATIONS),)]


async def committed_outbox(path) -> list[tuple[str, str]]:
    """The outbox as another connection sees it: only what is committed."""
    async with aiosqlite.connect(path) as db:
        return list(await db.execute_fetchall("SELECT room_id, txn_id FROM outbox ORDER BY seq"))


async def test_another_tasks_write_waits_for_an_open_transaction_and_survives_its_rollback(store, tmp_path):
    for event_id in ("$a", "$b"):
        await store.add_prompt(prompt(event_id), "running")
    a_wrote, b_done = asyncio.Event(), asyncio.Event()

    async def task_a() -> None:
        with pytest.raises(RuntimeError, match="fails"):
            async with store.transaction():
                await store.queue_outbox(ROOM, [OutboxRow("txn-a", {"body": "a"}, "$a")], ended=("$a", "done"))
                a_wrote.set()
                for _ in range(5):
                    await asyncio.sleep(0)  # task B tries its write now
                assert not b_done.is_set()
                raise RuntimeError("A fails after B tried its write")

    async def task_b() -> None:
        await a_wrote.wait()
        await store.queue_outbox("!b:x", [OutboxRow("txn-b", {"body": "b"}, "$b")], ended=("$b", "done"))
        b_done.set()

    await asyncio.gather(task_a(), task_b())
    assert await committed_outbox(tmp_path / "db.sqlite") == [("!b:x", "txn-b")]
    assert await store.prompt_state("$a") == "running" and await store.prompt_state("$b") == "done"


async def test_a_read_never_sees_another_tasks_uncommitted_rows(store):
    a_wrote = asyncio.Event()

    async def task_a() -> None:
        with pytest.raises(RuntimeError, match="rolled back"):
            async with store.transaction():
                await store.queue_outbox(ROOM, [OutboxRow("txn-a", {"body": "a"}, None)])
                a_wrote.set()
                for _ in range(5):
                    await asyncio.sleep(0)  # task B reads now
                raise RuntimeError("rolled back")

    async def task_b() -> list[OutboxRow]:
        await a_wrote.wait()
        return await store.outbox(ROOM)

    _, seen = await asyncio.gather(task_a(), task_b())
    assert seen == []


async def test_store_calls_inside_a_transaction_land_together_or_not_at_all(store):
    async with asyncio.timeout(10):  # a transaction that waited for itself would hang here
        with pytest.raises(RuntimeError, match="crash"):
            async with store.transaction():
                await store.add_prompt(prompt("$1"))
                await store.set_session_id(ROOM, "sess")
                raise RuntimeError("crash before the end")
        assert await store.prompt_state("$1") is None and await store.session_id(ROOM) is None
        async with store.transaction():
            await store.add_prompt(prompt("$1"))
            await store.set_session_id(ROOM, "sess")
    assert await store.prompt_state("$1") == "queued" and await store.session_id(ROOM) == "sess"


async def test_rooms_made_from_the_chat_survive_a_restart_with_their_changes_recorded(tmp_path):
    path = tmp_path / "db.sqlite"
    store = await Store.open(path)
    await store.add_chat_room(ROOM, "@admin:x", {"allowed_users": ["@admin:x"]})
    await store.add_chat_room("!b:x", "@admin:x", {"allowed_users": ["@admin:x"], "name": "b"})
    await store.set_chat_room(ROOM, {"allowed_users": ["@admin:x", "@u:x"]}, "@admin:x", "allow", "@u:x")
    await store.close()

    store = await Store.open(path)
    assert [(room.room_id, room.invited_by, room.settings) for room in await store.chat_rooms()] == [
        (ROOM, "@admin:x", {"allowed_users": ["@admin:x", "@u:x"]}),
        ("!b:x", "@admin:x", {"allowed_users": ["@admin:x"], "name": "b"}),
    ]
    assert (await store.chat_room("!b:x")).settings["name"] == "b" and await store.chat_room("!c:x") is None
    assert [(c.by, c.command, c.detail) for c in await store.room_changes(ROOM)] == [
        ("@admin:x", "allow", "@u:x"),
        ("@admin:x", "invite", '{"allowed_users": ["@admin:x"]}'),
    ]
    assert await store.forget_chat_room(ROOM, "@admin:x")
    assert not await store.forget_chat_room(ROOM, "@admin:x")  # forgotten already: nothing recorded twice
    assert [room.room_id for room in await store.chat_rooms()] == ["!b:x"]
    assert [c.command for c in await store.room_changes(ROOM)][:2] == ["leave", "allow"]
    await store.close()
