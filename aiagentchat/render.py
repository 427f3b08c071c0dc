"""Markdown to Matrix message contents: split under the event size limit, render to sanitised HTML."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import comrak
import msgspec
import nh3

from aiagentchat.wire import MARKER_KEY

MAX_CHUNK_BYTES = 12_000
MAX_CONTENT_BYTES = 45_000
MAX_FINAL_BYTES = 16_000  # a run's final summary in its last event's marker
# The smallest split_markdown limit: a re-opened fence and its closing line then leave room for any character.
MIN_CHUNK_BYTES = 16

ALLOWED_TAGS = {
    "del", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "p", "a", "ul", "ol", "sup", "sub", "li", "b",
    "i", "u", "strong", "em", "s", "code", "hr", "br", "div", "table", "thead", "tbody", "tr", "th", "td",
    "caption", "pre", "span", "img", "details", "summary",
}  # fmt: skip
ALLOWED_ATTRIBUTES = {
    "a": {"href"},
    "img": {"src", "alt", "title", "width", "height"},
    "ol": {"start"},
    "code": {"class"},
}
LINK_SCHEMES = {"http", "https", "ftp", "mailto", "magnet"}
IMAGE_PREFIX = "mxc://"

_ZERO_WIDTH_JOINER = "\u200d"
_OPENING_FENCE = re.compile(r"( {0,3})(`{3,}|~{3,})(.*)")
_CLOSING_FENCE = re.compile(r" {0,3}(`{3,}|~{3,})[ \t]*")
_LANGUAGE_CLASS = re.compile(r"language-\S+")
# an image as comrak writes it (the only `<img` in its output: raw HTML comes out escaped); the values are escaped
_IMAGE = re.compile(r'<img src="([^"]*)" alt="([^"]*)"(?: title="[^"]*")? />')


def utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def content_size(content: dict[str, Any]) -> int:
    """UTF-8 bytes of `content` as compact JSON, the way it travels inside an event (msgspec writes the same
    bytes as `json.dumps(content, ensure_ascii=False, separators=(",", ":"))`, ten times faster)."""
    return len(msgspec.json.encode(content))


@dataclass(frozen=True)
class _Fence:
    opening: str
    closing: str
    marker: str

    def closed_by(self, line: str) -> bool:
        match = _CLOSING_FENCE.fullmatch(line.rstrip("\r\n"))
        return bool(match) and match[1][0] == self.marker[0] and len(match[1]) >= len(self.marker)


def _fence_after(fence: _Fence | None, line: str, limit: int) -> _Fence | None:
    """The fenced code block open after `line`, given the one open before it."""
    if fence is not None:
        return None if fence.closed_by(line) else fence
    match = _OPENING_FENCE.fullmatch(line.rstrip("\r\n"))
    if match is None or (match[2][0] == "`" and "`" in match[3]):
        return None
    opening = match[0] + "\n"
    if utf8_size(opening) > limit // 4:
        return None
    return _Fence(opening, match[1] + match[2] + "\n", match[2])


def _lines(text: str) -> list[str]:
    lines = [line + "\n" for line in text.split("\n")]
    lines[-1] = lines[-1][:-1]
    return lines if lines[-1] else lines[:-1]


def _clings(before: str, char: str) -> bool:
    """Whether a cut between these two characters would split what a reader sees as one character."""
    return (
        unicodedata.combining(char) != 0
        or char == _ZERO_WIDTH_JOINER
        or before == _ZERO_WIDTH_JOINER
        or "\ufe00" <= char <= "\ufe0f"
        or "\U0001f3fb" <= char <= "\U0001f3ff"
    )


def _cut(line: str, budget: int, *, forced: bool) -> int:
    """Length of the longest prefix of `line` within `budget` UTF-8 bytes that ends between characters a
    reader sees as separate; 0 if there is none, unless `forced`: then any character boundary will do."""
    end = len(line[:budget].encode("utf-8")[:budget].decode("utf-8", "ignore"))
    for cut in range(end, 0, -1):
        if not _clings(line[cut - 1], line[cut]):
            return cut
    return end if forced else 0


class _Splitter:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.chunks: list[str] = []
        self.parts: list[str] = []
        self.used = 0
        self.has_text = False
        self.fence: _Fence | None = None

    def add(self, line: str) -> None:
        after = _fence_after(self.fence, line, self.limit)
        if not self._fits(line, after):
            if self.has_text and self._fits_fresh(line, after):
                self._break()
            while not self._fits(line, after):
                closing = 1 + utf8_size(self.fence.closing) if self.fence else 0
                cut = _cut(line, self.limit - self.used - closing, forced=not self.has_text)
                if cut:
                    self._append(line[:cut], self.fence)
                    line = line[cut:]
                self._break()
        self._append(line, after)

    def finish(self) -> list[str]:
        if self.has_text:
            self.chunks.append("".join(self.parts))
        return self.chunks

    def _fits(self, line: str, after: _Fence | None) -> bool:
        closing = utf8_size(after.closing) if after else 0
        return self.used + utf8_size(line) + closing <= self.limit

    def _fits_fresh(self, line: str, after: _Fence | None) -> bool:
        opening = utf8_size(self.fence.opening) if self.fence else 0
        closing = utf8_size(after.closing) if after else 0
        return opening + utf8_size(line) + closing <= self.limit

    def _append(self, text: str, after: _Fence | None) -> None:
        self.parts.append(text)
        self.used += utf8_size(text)
        self.has_text = True
        self.fence = after

    def _break(self) -> None:
        if self.fence is not None:
            newline = "" if self.parts[-1].endswith("\n") else "\n"
            self.parts.append(newline + self.fence.closing)
        self.chunks.append("".join(self.parts))
        self.parts = [self.fence.opening] if self.fence else []
        self.used = utf8_size(self.parts[0]) if self.parts else 0
        self.has_text = False


def split_markdown(text: str, limit: int = MAX_CHUNK_BYTES) -> list[str]:
    """Split `text` into chunks of at most `limit` UTF-8 bytes, on line boundaries where possible.

    A line longer than the limit is cut between characters (never between a character and the marks that
    combine with it). A fenced code block that a split cuts is closed at the end of the chunk and re-opened,
    with the same fence and info string, at the start of the next; without those added lines (and the
    newline added before a closing fence when a line was cut) the chunks join back into `text`.
    """
    if limit < MIN_CHUNK_BYTES:
        raise ValueError(f"limit must be at least {MIN_CHUNK_BYTES} bytes, not {limit}")
    splitter = _Splitter(limit)
    for line in _lines(text):
        splitter.add(line)
    return splitter.finish()


def fence_left_open(markdown: str) -> tuple[str, str] | None:
    """The opening and closing lines of the fenced code block still open at the end of `markdown`, if any."""
    fence = None
    for line in _lines(markdown):
        fence = _fence_after(fence, line, MAX_CHUNK_BYTES)
    return (fence.opening, fence.closing) if fence else None


def _image_or_alt(image: re.Match[str]) -> str:
    """Images only from the homeserver's media repository; any other image shows as its alt text."""
    return image[0] if image[1].startswith(IMAGE_PREFIX) else image[2]


def _allowed_attribute(tag: str, attribute: str, value: str) -> str | None:
    if tag == "a" and attribute == "href":
        scheme, colon, _ = value.partition(":")
        return value if colon and scheme.lower() in LINK_SCHEMES else None
    if tag == "img" and attribute == "src":
        return value if value.startswith(IMAGE_PREFIX) else None
    if tag == "code" and attribute == "class":
        return value if _LANGUAGE_CLASS.fullmatch(value) else None
    return value


_extensions = comrak.ExtensionOptions()
_extensions.table = True
_extensions.strikethrough = True
_rendering = comrak.RenderOptions()
_rendering.escape = True  # raw HTML in the Markdown is shown as text, whatever the sanitiser does after
_cleaner = nh3.Cleaner(
    tags=ALLOWED_TAGS,
    attributes=ALLOWED_ATTRIBUTES,
    attribute_filter=_allowed_attribute,
    url_schemes=LINK_SCHEMES | {"mxc"},
    link_rel=None,
)


def sanitize(html: str) -> str:
    """Reduce `html` to the tags and attributes Matrix clients are asked to accept."""
    return _cleaner.clean(html)


def markdown_html(markdown: str) -> str:
    """CommonMark with GFM tables and strikethrough as HTML, before sanitising: raw HTML comes out escaped,
    links with a dangerous scheme (`javascript:`, `data:`, ...) without their target, and an image not from the
    media repository (`mxc://`) as its alt text."""
    html = comrak.render_markdown(markdown, extension_options=_extensions, render_options=_rendering)
    return _IMAGE.sub(_image_or_alt, html) if "<img " in html else html


def to_html(markdown: str) -> str:
    return sanitize(markdown_html(markdown))


def without_floats(value: Any) -> Any:
    """`value` with every float turned into its exact decimal string: Matrix's canonical JSON has no
    floats, and Synapse refuses an event carrying one (400 M_BAD_JSON)."""
    if isinstance(value, float):
        return format(Decimal(repr(value)).normalize(), "f")
    if isinstance(value, dict):
        return {key: without_floats(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [without_floats(item) for item in value]
    return value


def message_contents(markdown: str, marker: dict[str, Any]) -> list[dict[str, Any]]:
    """One `m.text` content per chunk of `markdown`, each under MAX_CONTENT_BYTES as compact JSON."""
    return _contents(markdown, without_floats(marker), MAX_CHUNK_BYTES)


def bounded_final(final: dict[str, Any], limit: int = MAX_FINAL_BYTES) -> dict[str, Any]:
    """A run's `final` summary, float-free and at most `limit` bytes: a longer `result` is cut (the whole
    answer is in the run's events anyway) and `result_truncated` says so."""
    final = without_floats(final)
    result = final.get("result")
    while (size := content_size(final)) > limit and isinstance(result, str) and result:
        result = result[: int(len(result) * min(limit / size, 0.9))]
        final = {**final, "result": result, "result_truncated": True}
    return final


def with_marker(content: dict[str, Any], marker: dict[str, Any]) -> dict[str, Any]:
    """`content` marked as agent output with `marker`, ready for the wire."""
    return {**content, MARKER_KEY: without_floats(marker)}


def notice_content(body: str, marker: dict[str, Any]) -> dict[str, Any]:
    """A plain `m.notice` from the bot, marked like its other output."""
    return with_marker({"msgtype": "m.notice", "body": body, "m.mentions": {}}, marker)


def _contents(markdown: str, marker: dict[str, Any], limit: int) -> list[dict[str, Any]]:
    contents: list[dict[str, Any]] = []
    for chunk in split_markdown(markdown, limit):
        content = {
            "msgtype": "m.text",
            "body": chunk,
            "format": "org.matrix.custom.html",
            "formatted_body": to_html(chunk),
            "m.mentions": {},
            MARKER_KEY: marker,
        }
        if content_size(content) > MAX_CONTENT_BYTES:
            contents.extend(_contents(chunk, marker, limit // 2))
        else:
            contents.append(content)
    return contents
