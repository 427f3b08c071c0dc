"""Command parsing, help text, and the file rules of uploads and `!get`."""

import base64
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from aiagentchat import commands
from aiagentchat.commands import Command, help_text, parse, usd
from aiagentchat.settings import RoomSettings
from aiagentchat.uploads import (
    MAX_IMAGE_BYTES,
    FileRefused,
    copy_for_sending,
    image_block,
    image_type,
    safe_name,
    save_upload,
)


@pytest.mark.parametrize(
    ("body", "prefix", "expected"),
    [
        ("!stop", "!", Command("stop", "")),
        ("  !Model  claude-x  ", "!", Command("model", "claude-x")),
        ("!get src/a b.py", "!", Command("get", "src/a b.py")),
        ("!t now\nplease", "!", Command("t", "now\nplease")),
        ("!! urgent", "!", None),
        ("! stop", "!", None),
        ("!123", "!", None),
        ("fix it!", "!", None),
        ("/stop", "!", None),
        ("//stop", "//", Command("stop", "")),
    ],
)
def test_parse(body: str, prefix: str, expected: Command | None) -> None:
    assert parse(body, prefix) == expected


def test_help_lists_every_command_and_the_rooms_aliases_with_its_prefix() -> None:
    room = RoomSettings(id="!r:x", command_prefix="/", aliases={"t": "run the tests"})
    text = help_text(room)
    for word in ("help", "stop", "new", "status", "cost", "model NAME", "get PATH"):
        assert f"`/{word}`" in text
    assert "`/t` → run the tests" in text and "`!" not in text


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("report.pdf", "report.pdf"),
        ("../../etc/passwd", "passwd"),
        ("C:\\temp\\x.txt", "x.txt"),
        (".bashrc", "bashrc"),
        ("a;rm -rf $HOME`.sh", "a_rm -rf _HOME_.sh"),
        ("", "upload"),
        ("..", "upload"),
        ("x" * 300 + ".tar.gz", "x" * 97 + ".gz"),
    ],
)
def test_safe_name(name: str, expected: str) -> None:
    assert safe_name(name) == expected


def test_uploads_never_overwrite_and_never_follow_a_planted_symlink(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    assert save_upload(workdir, "notes.txt", b"one") == "uploads/notes.txt"
    assert save_upload(workdir, "notes.txt", b"two") == "uploads/notes-1.txt"
    assert save_upload(workdir, "../notes.txt", b"three") == "uploads/notes-2.txt"
    assert [(workdir / "uploads" / n).read_bytes() for n in ("notes.txt", "notes-1.txt", "notes-2.txt")] == [
        b"one",
        b"two",
        b"three",
    ]
    outside = tmp_path / "outside"
    outside.mkdir()
    (workdir / "uploads" / "evil.txt").symlink_to(outside / "evil.txt")
    assert save_upload(workdir, "evil.txt", b"x") == "uploads/evil-1.txt"
    assert not (outside / "evil.txt").exists()

    other = tmp_path / "other"
    other.mkdir()
    (other / "uploads").symlink_to(outside)
    with pytest.raises(OSError):
        save_upload(other, "a.txt", b"x")
    assert list(outside.iterdir()) == []


def test_get_sends_a_copy_of_files_inside_the_working_directory_only(tmp_path: Path) -> None:
    workdir, scratch = tmp_path / "work", tmp_path / "scratch"
    (workdir / "src").mkdir(parents=True)
    (workdir / "src" / "a.py").write_text("print(1)\n")
    secret = tmp_path / "secret.txt"
    secret.write_text("token")
    (workdir / "link.txt").symlink_to(secret)

    copy, name = copy_for_sending(workdir, "src/a.py", 1000, scratch)
    assert (copy.read_text(), name) == ("print(1)\n", "a.py")
    assert copy.parent == scratch and oct(os.stat(scratch).st_mode & 0o777) == "0o700"

    for requested, reason in [
        ("../../etc/passwd", "outside the working directory"),
        ("/etc/passwd", "outside the working directory"),
        ("link.txt", "outside the working directory"),
        ("src", "not a file"),
        ("missing.txt", "not a file"),
    ]:
        with pytest.raises(FileRefused, match=reason):
            copy_for_sending(workdir, requested, 1000, scratch)
    with pytest.raises(FileRefused, match="the limit is 4"):
        copy_for_sending(workdir, "src/a.py", 4, scratch)


@pytest.mark.parametrize(
    ("amount", "shown"), [(0, "$0.0000"), (0.000075, "$0.000075"), (0.1234, "$0.1234"), (12.345, "$12.35")]
)
def test_usd(amount: float, shown: str) -> None:
    assert usd(amount) == shown


def test_an_uploaded_image_is_an_image_block_while_it_is_a_small_image_in_the_workdir(tmp_path: Path) -> None:
    (tmp_path / "uploads").mkdir()
    (tmp_path / "uploads" / "dot.png").write_bytes(b"\x89PNG pixels")
    block = image_block(tmp_path, "uploads/dot.png")
    source = {"type": "base64", "media_type": "image/png", "data": base64.b64encode(b"\x89PNG pixels").decode()}
    assert block == {"type": "image", "source": source}
    assert image_type("uploads/notes.txt", 10) is None and image_type("a.webp", MAX_IMAGE_BYTES + 1) is None
    assert image_block(tmp_path, "uploads/gone.png") is None
    os.symlink("/etc/hostname", tmp_path / "uploads" / "link.png")
    assert image_block(tmp_path, "uploads/link.png") is None


@pytest.mark.anyio
async def test_get_of_a_file_that_cannot_be_read_is_answered_with_the_reason(tmp_path: Path, monkeypatch) -> None:
    def unreadable(*args: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(commands, "copy_for_sending", unreadable)
    answer = await commands.Commands(None, tmp_path / "scratch")._get(
        "!r:x", RoomSettings(id="!r:x"), SimpleNamespace(workdir=tmp_path), "@u:x", "secret.txt"
    )
    assert answer.markdown == "⛔ `secret.txt` could not be read: Permission denied."
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(FileRefused, match="not a file"):
        copy_for_sending(tmp_path, "pipe", 1000, tmp_path / "scratch")
