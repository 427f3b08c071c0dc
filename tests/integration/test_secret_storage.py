"""Secret storage through a real Synapse's account data: what write_secret stores, read_secret reads back in
another session of the same account; another recovery key, an account without secret storage and a secret not
stored are each refused with the message a person acts on."""

from __future__ import annotations

import secrets

import pytest

from aiagentchat.secret_storage import (
    ALGORITHM,
    DEFAULT_KEY,
    KEY_PREFIX,
    SecretStorageError,
    decode_recovery_key,
    encode_recovery_key,
    new_recovery_key,
    read_secret,
    write_secret,
)
from tests.harness.matrix_user import MatrixUser

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

SELF_SIGNING = "m.cross_signing.self_signing"


async def test_a_secret_written_to_account_data_reads_back_only_with_its_recovery_key(synapse) -> None:
    name, password = f"ssss{secrets.token_hex(3)}", secrets.token_urlsafe(12)
    user_id = await synapse.register(name, password)
    writer, reader = MatrixUser(), MatrixUser()
    try:
        await writer.login(synapse.base_url, user_id, password)
        with pytest.raises(SecretStorageError, match="no secret storage set up on this account"):
            await read_secret(writer.client, SELF_SIGNING, new_recovery_key())

        recovery_key = encode_recovery_key(new_recovery_key())
        key = decode_recovery_key(recovery_key)
        key_id = await write_secret(writer.client, SELF_SIGNING, "the self-signing seed", key)

        # another session of the account (another device) reads it from Synapse with the recovery key as typed
        await reader.login(synapse.base_url, user_id, password)
        typed = decode_recovery_key(f"  {recovery_key.replace(' ', '  ')}\n")
        assert await read_secret(reader.client, SELF_SIGNING, typed) == "the self-signing seed"
        assert await account_data(reader, DEFAULT_KEY) == {"key": key_id}
        assert (await account_data(reader, KEY_PREFIX + key_id))["algorithm"] == ALGORITHM
        assert set((await account_data(reader, SELF_SIGNING))["encrypted"][key_id]) == {"iv", "ciphertext", "mac"}

        with pytest.raises(
            SecretStorageError, match="this recovery key is not the one of the account's secret storage"
        ):
            await read_secret(reader.client, SELF_SIGNING, new_recovery_key())
        with pytest.raises(SecretStorageError, match="secret storage has no m.cross_signing.master"):
            await read_secret(reader.client, "m.cross_signing.master", key)
    finally:
        await writer.close()
        await reader.close()


async def account_data(user: MatrixUser, kind: str) -> dict:
    """The account data as Synapse returns it, fetched without secret_storage."""
    client = user.client
    url = f"/_matrix/client/v3/user/{client.user_id}/account_data/{kind}"
    async with await client.send("GET", url, headers={"Authorization": f"Bearer {client.access_token}"}) as response:
        assert response.status == 200, await response.text()
        return await response.json()
