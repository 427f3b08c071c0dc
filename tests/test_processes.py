import asyncio
import os

import pytest

from aiagentchat.processes import descendants, kill_leftover, start_time, terminate_tree

pytestmark = pytest.mark.anyio


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_children_that_left_the_group_are_ended_too(tmp_path):
    pids = tmp_path / "pids"
    proc = await asyncio.create_subprocess_exec(
        "sh", "-c", f"setsid sleep 300 & echo $! > {pids}; sleep 300 & wait",
        start_new_session=True,
    )

    def escaped_pid() -> int | None:
        """The setsid'd child once it has left the group (`$!` is written before setsid(2) has run in it)."""
        text = pids.read_text().strip() if pids.exists() else ""
        if not text.isdigit() or len(descendants(proc.pid)) < 2:
            return None
        return int(text) if os.getpgid(int(text)) != os.getpgid(proc.pid) else None

    async with asyncio.timeout(10):
        while (escaped := escaped_pid()) is None:
            await asyncio.sleep(0.02)
    assert escaped in descendants(proc.pid)

    await terminate_tree(proc, wait_s=2)

    assert proc.returncode is not None
    async with asyncio.timeout(5):
        while alive(escaped):
            await asyncio.sleep(0.02)


async def test_a_process_that_already_exited_is_fine():
    proc = await asyncio.create_subprocess_exec("true", start_new_session=True)
    await proc.wait()
    await terminate_tree(proc, wait_s=1)
    assert proc.returncode == 0


async def test_a_cancellation_that_lands_as_the_process_exits_is_not_lost():
    proc = await asyncio.create_subprocess_exec("sleep", "300", start_new_session=True)
    reap = proc.wait
    exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    proc.wait = lambda: exited  # the test decides when the exit is seen
    ending = asyncio.create_task(terminate_tree(proc, wait_s=5))
    for _ in range(5):  # let it signal the process and wait for its exit
        await asyncio.sleep(0)
    exited.set_result(0)
    ending.cancel()  # in the same step: asyncio.wait_for (Python 3.11) returned the exit and lost this
    async with asyncio.timeout(5):
        await asyncio.gather(ending, return_exceptions=True)
        assert await reap() == -15  # the SIGTERM it got before the wait
    assert ending.cancelled()


async def test_a_leftover_agent_is_killed_only_while_its_pid_names_the_same_process(tmp_path):
    pids = tmp_path / "pids"
    proc = await asyncio.create_subprocess_exec(
        "sh", "-c", f"setsid sleep 300 & echo $! > {pids}; wait", start_new_session=True
    )
    async with asyncio.timeout(10):
        while not pids.exists() or not pids.read_text().strip():
            await asyncio.sleep(0.02)
    escaped = int(pids.read_text())
    started = start_time(proc.pid)
    assert isinstance(started, int) and started > 0

    assert not kill_leftover(proc.pid, started + 1)  # another process that got the same pid: left alone
    assert alive(proc.pid) and alive(escaped)
    assert kill_leftover(proc.pid, started)
    async with asyncio.timeout(5):
        await proc.wait()
        while alive(escaped):
            await asyncio.sleep(0.02)
    assert start_time(proc.pid) is None
