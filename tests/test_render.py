"""Splitting Markdown under the event size limit, and rendering it to Matrix-safe HTML."""

import json
import unicodedata

import pytest

from aiagentchat.render import (
    MAX_CHUNK_BYTES,
    MAX_CONTENT_BYTES,
    content_size,
    fence_left_open,
    markdown_html,
    message_contents,
    sanitize,
    split_markdown,
    to_html,
)


def size(text: str) -> int:
    return len(text.encode("utf-8"))


def unsplit(chunks: list[str], opening: str, closing: str) -> str:
    """Join chunks, dropping the fence lines split_markdown added where it cut a code block."""
    text = chunks[0]
    for chunk in chunks[1:]:
        assert chunk.startswith(opening) and text.endswith(closing)
        text = text.removesuffix(closing) + chunk.removeprefix(opening)
    return text


@pytest.mark.parametrize(
    ("text", "limit"),
    [
        ("no newline at all", 16),
        ("one line\n", 16),
        ("short\nlines\nthat\ngroup\ninto\nchunks\n", 16),
        ("blank\n\n\nlines\n\n", 16),
        ("a line far longer than the limit, cut between characters\nthen more", 16),
        ("😀 emoji 😀😀😀 and more emoji 😀😀😀😀😀😀😀😀\n" * 3, 17),
        ("漢字かな混じり文の長い行がここに続きます。" * 4, 20),
        ("x" * 50_000 + "\n" + "y\n" * 9_000, MAX_CHUNK_BYTES),
    ],
)
def test_chunks_fit_and_join_back_into_the_text(text: str, limit: int) -> None:
    chunks = split_markdown(text, limit)
    assert len(chunks) > 1 or size(text) <= limit
    assert all(0 < size(chunk) <= limit for chunk in chunks)
    assert "".join(chunks) == text


def test_empty_text_has_no_chunks() -> None:
    assert split_markdown("") == []


def test_text_under_the_limit_is_one_chunk() -> None:
    assert split_markdown("# Title\n\nSome *text*.") == ["# Title\n\nSome *text*."]


def test_splits_fall_on_line_boundaries() -> None:
    assert split_markdown("aaaa\nbbbb\ncccc\ndddd\n", 16) == ["aaaa\nbbbb\ncccc\n", "dddd\n"]


def test_a_long_line_is_cut_between_characters_never_inside_one() -> None:
    assert split_markdown("😀" * 10, 18) == ["😀" * 4, "😀" * 4, "😀" * 2]
    assert split_markdown("字" * 12, 16) == ["字" * 5, "字" * 5, "字" * 2]


def test_a_cut_keeps_combining_marks_with_their_character() -> None:
    text = "e\u0301" * 12  # 3 bytes per accented e: a 16-byte cut would land between "e" and its accent
    chunks = split_markdown(text, 16)
    assert chunks == ["e\u0301" * 5, "e\u0301" * 5, "e\u0301" * 2]
    assert not any(unicodedata.combining(chunk[0]) for chunk in chunks)


@pytest.mark.parametrize(
    "emoji",
    [
        "👩\u200d👩\u200d👧",  # joined by zero-width joiners
        "👍🏽",  # with a skin tone modifier
        "❤\ufe0f",  # with a variation selector
    ],
)
def test_a_cut_keeps_an_emoji_and_its_modifiers_together(emoji: str) -> None:
    head = "x" * (20 - size(emoji) + 2)  # the cut at 20 bytes would land inside the emoji
    assert split_markdown(head + emoji, 20) == [head, emoji]


def test_an_emoji_that_does_not_fit_what_is_left_of_a_chunk_starts_the_next() -> None:
    family = "👩\u200d👩\u200d👧"
    chunks = split_markdown("abcdefghij\n" + family + "x" * 20, 24)
    assert chunks == ["abcdefghij\n", family + "x" * 6, "x" * 14]


def test_a_character_with_more_marks_than_fit_in_a_chunk_is_cut_anyway() -> None:
    text = "e" + "\u0301" * 20
    chunks = split_markdown(text, 16)
    assert all(size(chunk) <= 16 for chunk in chunks)
    assert "".join(chunks) == text


def test_a_split_inside_a_code_fence_closes_and_reopens_it() -> None:
    text = "intro\n```python\n" + "line\n" * 10 + "```\nafter\n"
    chunks = split_markdown(text, 40)
    assert chunks == [
        "intro\n```python\nline\nline\nline\nline\n```\n",
        "```python\nline\nline\nline\nline\nline\n```\n",
        "```python\nline\n```\nafter\n",
    ]
    assert all(size(chunk) <= 40 for chunk in chunks)
    assert unsplit(chunks, "```python\n", "```\n") == text


def test_a_reopened_fence_keeps_its_marker_info_string_and_indent() -> None:
    text = "  ~~~~ js title\n" + "x = 1\n" * 10 + "  ~~~~\n"
    chunks = split_markdown(text, 64)
    assert chunks == [
        "  ~~~~ js title\n" + "x = 1\n" * 6 + "  ~~~~\n",
        "  ~~~~ js title\n" + "x = 1\n" * 4 + "  ~~~~\n",
    ]
    assert unsplit(chunks, "  ~~~~ js title\n", "  ~~~~\n") == text


def test_a_fence_is_closed_only_by_a_fence_as_long_of_the_same_kind() -> None:
    text = "````\n```\n~~~~\n" + "code\n" * 4 + "````\nplain\n" * 3
    chunks = split_markdown(text, 32)
    assert chunks[0] == "````\n```\n~~~~\ncode\ncode\n````\n"
    assert chunks[1].startswith("````\ncode\ncode\n````\n")
    assert all(size(chunk) <= 32 for chunk in chunks)


def test_a_long_line_cut_inside_a_fence_ends_its_chunk_with_a_closing_line() -> None:
    assert split_markdown("```\n" + "x" * 30 + "\n```\n", 24) == [
        "```\n" + "x" * 15 + "\n```\n",
        "```\n" + "x" * 15 + "\n```\n",
    ]


def test_a_fence_line_too_long_to_repeat_in_every_chunk_is_not_reopened() -> None:
    text = "~~~ an info string longer than a quarter of the limit\n" + "code\n" * 40 + "~~~\n"
    chunks = split_markdown(text, 80)
    assert len(chunks) > 2
    assert "".join(chunks) == text


def test_a_fence_left_open_at_the_end_is_left_as_written() -> None:
    assert split_markdown("```sh\nls\n", 16) == ["```sh\nls\n"]


def test_a_limit_too_small_for_fence_lines_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 16"):
        split_markdown("text", 15)


def test_the_fence_left_open_is_found() -> None:
    assert fence_left_open("text\n ~~~~ sh\nls\n") == (" ~~~~ sh\n", " ~~~~\n")
    assert fence_left_open("```py\nx\n```\n") is None
    assert fence_left_open("no code\n") is None


def test_markdown_is_rendered_with_tables_and_strikethrough() -> None:
    html = to_html("# Title\n\n**bold** ~~gone~~\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    assert "<h1>Title</h1>" in html
    assert "<strong>bold</strong> <del>gone</del>" in html
    assert "<table>" in html and "<td>2</td>" in html


def test_lists_quotes_and_code_spans_are_rendered() -> None:
    html = to_html("- one\n  - nested\n\n3. three\n\n> said `a < b`\n")
    assert html == (
        "<ul>\n<li>one\n<ul>\n<li>nested</li>\n</ul>\n</li>\n</ul>\n"
        '<ol start="3">\n<li>three</li>\n</ol>\n<blockquote>\n<p>said <code>a &lt; b</code></p>\n</blockquote>\n'
    )


@pytest.mark.parametrize(
    "markdown",
    [
        "<script>alert(1)</script> <b onclick=x>hi</b>",
        "text <script>alert(1)</script> and <b onclick=x>hi</b>",
        "<div>\n<script>alert(1)</script>\n</div>\n",
        "<!-- <script>alert(1)</script> -->",
        "<img src=x onerror=alert(1)>",
        "> <iframe src=https://x></iframe>\n",
    ],
)
def test_raw_html_in_markdown_is_escaped_by_the_renderer_itself(markdown: str) -> None:
    for html in (markdown_html(markdown), to_html(markdown)):
        assert "<script" not in html and "<b " not in html and "<iframe" not in html and "<img" not in html
        assert "&lt;" in html


def test_links_keep_only_safe_schemes_and_get_no_rel() -> None:
    html = to_html(
        "[a](https://example.org) [b](mailto:me@example.org) [c](javascript:alert(1)) [d](tel:123)"
    )
    assert '<a href="https://example.org">a</a>' in html
    assert '<a href="mailto:me@example.org">b</a>' in html
    assert "<a>c</a>" in html and "<a>d</a>" in html  # their targets dropped
    assert "rel=" not in html


def test_the_renderer_itself_drops_a_dangerous_link_target() -> None:
    html = markdown_html("[c](javascript:alert(1)) [d](data:text/html,x) [e](vbscript:x)")
    assert "javascript" not in html and "data:" not in html and "vbscript" not in html


def test_images_only_from_the_media_repository() -> None:
    html = to_html("![outside](https://evil/x.png) ![inside](mxc://example.org/abc)")
    assert "evil" not in html
    assert html == '<p>outside <img src="mxc://example.org/abc" alt="inside"></p>\n'


def test_the_renderer_itself_shows_any_other_image_as_its_alt_text() -> None:
    html = markdown_html(
        '![a *b* &lt;](https://evil/x.png "t") [![c](data:image/png,x)](https://ok) ![d](mxc://h/m "t")'
    )
    assert html == '<p>a b &lt; <a href="https://ok">c</a> <img src="mxc://h/m" alt="d" title="t" /></p>\n'


def test_a_fenced_code_block_names_its_language() -> None:
    assert to_html("```python\nx < 1\n```") == '<pre><code class="language-python">x &lt; 1\n</code></pre>\n'


def test_the_sanitiser_applies_the_matrix_allowlist() -> None:
    html = sanitize(
        '<script>alert(1)</script><a href="javascript:alert(1)">a</a><a href="mxc://h/m">b</a>'
        '<img src="https://evil/x.png"><img src="mxc://h/m"><code class="evil">c</code>'
        '<code class="language-rust">d</code><table><tr><td style="color:red">e</td></tr></table>'
        '<iframe src="https://x">f</iframe>'
    )
    assert html == (
        '<a>a</a><a>b</a><img><img src="mxc://h/m"><code>c</code>'
        '<code class="language-rust">d</code><table><tbody><tr><td>e</td></tr></tbody></table>f'
    )


def test_each_chunk_becomes_a_message_content() -> None:
    assert message_contents("**hi**", {"prompt": "$p"}) == [
        {
            "msgtype": "m.text",
            "body": "**hi**",
            "format": "org.matrix.custom.html",
            "formatted_body": "<p><strong>hi</strong></p>\n",
            "m.mentions": {},
            "org.aiagentchat": {"prompt": "$p"},
        }
    ]


def test_long_markdown_becomes_several_contents() -> None:
    text = "".join(f"line {i}: some words here\n" for i in range(2_000))
    contents = message_contents(text, {"prompt": "$p"})
    assert len(contents) > 1
    assert all(size(content["body"]) <= MAX_CHUNK_BYTES for content in contents)
    assert "".join(content["body"] for content in contents) == text


def test_a_chunk_whose_html_escapes_too_large_is_split_again() -> None:
    text = "<<<<" * 3_000
    contents = message_contents(text, {"prompt": "$p"})
    assert len(contents) > 1
    assert all(content_size(content) <= MAX_CONTENT_BYTES for content in contents)
    assert "".join(content["body"] for content in contents) == text


def test_content_size_counts_utf8_bytes_of_compact_json() -> None:
    assert content_size({"body": "é"}) == len('{"body":"é"}'.encode())


def test_content_size_is_that_of_the_json_module() -> None:
    content = {"body": "".join(map(chr, range(256))) + '\u2028 😀 "q" \\', "n": [1, -2, 10**30, True, None, {}]}
    assert content_size(content) == len(json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode())
