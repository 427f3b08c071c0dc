import pytest

from aiagentchat.store import Store


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def store(tmp_path):
    store = await Store.open(tmp_path / "db.sqlite")
    yield store
    await store.close()
