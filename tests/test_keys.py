"""`aiagentchat keys export | import` and `aiagentchat trust` without a homeserver: the export file, its recovery
key, and what a damaged or foreign file or a mistyped key gives."""

import json
import stat

import pytest

from aiagentchat.crypto import key_file
from aiagentchat.identity import CrossSigningKeys, IdentityError
from aiagentchat.keys import EXPORT_FORMAT, accept_identity, export_keys, import_keys
from aiagentchat.secret_storage import SecretStorageError, encode_recovery_key, new_recovery_key
from aiagentchat.settings import Settings
from aiagentchat.trust import Pins

BOT = "@bot:localhost"


def settings_in(path) -> Settings:
    return Settings(paths={"data_dir": path / "data"})


def test_export_then_import_on_a_rebuilt_host_keeps_the_identity(tmp_path):
    old = settings_in(tmp_path / "old")
    with pytest.raises(IdentityError, match="no cross-signing keys yet"):
        export_keys(old, tmp_path / "keys.json")
    keys = CrossSigningKeys.generate(BOT)
    key_file(old).save(keys)
    exported, recovery_key = export_keys(old, tmp_path / "keys.json")
    assert exported.master_key == keys.master_key
    text = (tmp_path / "keys.json").read_text()
    assert stat.S_IMODE((tmp_path / "keys.json").stat().st_mode) == 0o600
    assert recovery_key not in text and keys.seeds()["master"] not in text

    new = settings_in(tmp_path / "new")
    imported = import_keys(new, tmp_path / "keys.json", recovery_key)
    assert imported.seeds() == keys.seeds()
    assert key_file(new).load(BOT).master_key == keys.master_key


def test_a_wrong_key_or_a_foreign_file_is_refused_and_nothing_is_kept(tmp_path):
    keys = CrossSigningKeys.generate(BOT)
    key_file(settings_in(tmp_path / "old")).save(keys)
    export = tmp_path / "keys.json"
    _, recovery_key = export_keys(settings_in(tmp_path / "old"), export)
    new = settings_in(tmp_path / "new")
    with pytest.raises((SecretStorageError, IdentityError), match="recovery key"):  # its check byte catches most
        import_keys(new, export, recovery_key[:-1] + ("A" if recovery_key[-1] != "A" else "B"))
    with pytest.raises(IdentityError, match="this recovery key does not open"):
        import_keys(new, export, encode_recovery_key(new_recovery_key()))
    (tmp_path / "other.json").write_text(json.dumps({"format": "something else", "secrets": {}}))
    with pytest.raises(IdentityError, match="not a file written by `aiagentchat keys export`"):
        import_keys(new, tmp_path / "other.json", recovery_key)
    with pytest.raises(IdentityError, match="cannot read"):
        import_keys(new, tmp_path / "missing.json", recovery_key)
    body = json.loads(export.read_text())
    body["master_key"] = CrossSigningKeys.generate(BOT).master_key  # the keys inside are not the named identity
    (tmp_path / "swapped.json").write_text(json.dumps(body))
    with pytest.raises(IdentityError, match="do not match the master key it names"):
        import_keys(new, tmp_path / "swapped.json", recovery_key)
    del body["secrets"]["m.cross_signing.user_signing"]
    (tmp_path / "short.json").write_text(json.dumps(body | {"format": EXPORT_FORMAT}))
    with pytest.raises(IdentityError, match="has no m.cross_signing.user_signing"):
        import_keys(new, tmp_path / "short.json", recovery_key)
    assert key_file(new).load(BOT) is None


def test_trust_accepts_only_an_identity_the_daemon_saw_change(tmp_path):
    settings = settings_in(tmp_path)
    assert accept_identity(settings, "@alice:localhost").startswith("Nothing to accept")
    pins = Pins(tmp_path / "data" / "crypto" / "identities.json")
    assert pins.see("@alice:localhost", "OLDKEY") and not pins.see("@alice:localhost", "NEWKEY")
    assert "Accepted @alice:localhost's new identity" in accept_identity(settings, "@alice:localhost")
    assert pins.get("@alice:localhost") == {"pinned": "NEWKEY", "seen": "NEWKEY"}
