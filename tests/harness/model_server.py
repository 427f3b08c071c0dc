"""A scripted Anthropic Messages API that the real Claude Code CLI talks to (`ANTHROPIC_BASE_URL`).

Run it with `python -m tests.harness.model_server --port 0`: the first stdout line is `PORT <n>`, then it
serves on 127.0.0.1 until killed. From tests, use `start_model_server()` / `model_server()`.

Script language, decided by the *latest user text* of a request: the text of the last user message that has
text, with `<system-reminder>...</system-reminder>` parts removed; all its text blocks are searched and the last
non-empty one wins (`[Request interrupted by user]` markers are skipped). A request whose last user message
holds only tool_result blocks continues the script of the turn that started it.

- `say <words...>`  -> text `<words...>`, streamed one word per delta.
- `recall`          -> text `I remember: ` + the earlier user prompts of this conversation (the typed text
                       blocks of the user messages in `messages`, oldest first), joined by ` | `.
- `bash <command>`  -> a `tool_use` block for `Bash` with input
                       `{"command": "<command>", "description": "run it"}`, stop_reason `tool_use`; the
                       continuation (tool_result) answers `tool said: ` + the tool_result text (first 500
                       characters).
- `write <absolute path> <text...>` -> a `tool_use` block for `Write` with input
                       `{"file_path": "<path>", "content": "<text...>"}`; continuation as for `bash`.
- `ask <question>`   -> a `tool_use` block for `AskUserQuestion` with one question and the options `red`,
                       `blue`; continuation as for `bash`.
- `slow <n>`        -> text `w1 w2 ... wn`, one word per delta every 0.2 s.
- `hang`            -> sends nothing (not even headers) and holds the request until the client disconnects.
- `fail400`         -> HTTP 400 with an Anthropic-style error JSON.
- `overloaded <n> <words...>` -> HTTP 529 `overloaded_error` for the first n requests with this text (the CLI
                       retries them, each time writing a `system/api_retry` line), then text `<words...>`.
- `big <n>`         -> n lines `line 000001 xxxx...` of 100 characters each (99 + newline).
- `drip <n> <ms>`   -> the same n lines, one line per delta every `ms` milliseconds (a steady stream).
- anything else     -> text `ok`.

Requests without a `tools` list are the CLI's side queries (titles, Bash command-prefix detection, ...): they
never run the script; they get a harmless text answer (see `side_answer`).

Every request is recorded: `GET /_test/requests` returns a JSON list of
`{"path", "latest_user_text", "has_tools", "messages_count", "continuation", "stream", "disconnected"}`
(`disconnected` becomes true when the client went away before the answer was complete, e.g. `hang` + an
interrupt). `GET /_test/requests?full=1` adds the request `body`. `GET /_test/hits` counts every request by
"METHOD /path" (HEAD / included). `DELETE /_test/requests` clears both.

Observed CLI behaviour (Claude Code 2.1.197, checked against this server):
- Per process: one `HEAD /`, then one streaming `POST /v1/messages` per model call (`stream: true`, `tools`
  present, `thinking: {"type": "adaptive"}`, `max_tokens: 64000`). No `count_tokens`, no non-streaming call and
  no tool-less side query was seen (one-shot or bidirectional; say, recall, Bash, Write, interrupts). The LLM
  Bash prefix detector (system prompt with `<policy_spec>`, user `Command: <cmd>`, expects a prefix, `none`
  or `command_injection_detected`) is in the binary but not on the default path; `side_answer` says `none`.
- `messages[0]` is the user message: a `<system-reminder>` text block, then the prompt as its own text block;
  `messages[1]` is a `role: "system"` message (agent types). A first turn therefore has `messages_count` 2.
- Bidirectional mode: every turn starts with a `system/init` line and ends with one `result`; `recall` in the
  second turn sees the first prompt. With `--include-partial-messages`, `slow` deltas arrive live as
  `stream_event` lines; the `assistant` line comes at the block's end.
- Permissions in `default` mode with `--permission-prompt-tool stdio`: no request for `echo hi` or `sleep 30`;
  a `can_use_tool` control_request for `touch`/`rm` in the cwd (with `blocked_path`), `ls /etc | head -3`
  (`decision_reason_type: subcommandResults`), `curl ...` ("This command requires approval") and `Write`
  (`permission_suggestions: [setMode acceptEdits]`). Answering allow + `updatedInput` runs the tool; deny +
  message makes the tool_result `is_error: true` with that message, and the turn goes on (`subtype` success).
- A Bash request's `permission_suggestions` (besides `tool_name`, `display_name`, `description`, `input`,
  `tool_use_id`, `decision_reason`, `decision_reason_type`, `blocked_path`) starts with
  `{"type": "addRules", "rules": [{"toolName": "Bash", "ruleContent": R}], "behavior": "allow",
  "destination": "localSettings"}`, R a prefix rule `git commit *`, `npm run *`, `npx cowsay *`, `make build *`
  or the exact command (`touch a.txt`, `python3 -c 'print(1)'`, `bash -c 'touch b'`, `env FOO=1 touch c`,
  `ls /etc | head -3`); then maybe `addDirectories` (`destination: session`), `setMode acceptEdits`, or
  `addRules` for `Read` `//etc/**`. For `find . -exec …` the list is empty and `decision_reason` says "find
  with '-exec' executes commands or modifies files — cannot be auto-allowed by a Bash(find:*) prefix rule".
- Interrupt (`control_request` subtype `interrupt`) during `hang`: within ~10-30 ms a `control_response`
  success, a `user` line `[Request interrupted by user]`, then `result` with `subtype: error_during_execution`,
  `is_error: true`, `terminal_reason: aborted_streaming`, `errors: [...]`, no `result` key; the request is dropped
  (`disconnected`). During a running Bash tool (`sleep 30`): same, with a tool_result "The user doesn't want to
  proceed..." (is_error), a `[Request interrupted by user for tool use]` line, and the `sleep` is killed.
  During `slow`: the partial `assistant` text (`w1 w2 w3`) is emitted before the error result. The process
  stays alive and takes the next turn; the interrupted prompt stays in the history (merged into the next user
  message). An interrupt while idle only gets a `control_response` success, no `result`.
- The Bash tool runs `/bin/bash -c ...` in a new session (its own pgid/sid, child of the CLI): killing the CLI's
  process group with SIGTERM (CLI exits 143 in ~20 ms) or SIGKILL leaves the running command alive. An
  interrupt does end it. Sweep the CLI's descendants (found before killing it) after an interrupt timeout.
- `hang` in one-shot mode: nothing after `system/init` for 70 s (no retry, no timeout) until killed.
- Exit code after stdin is closed is 1 when the last turn's result had `is_error: true`, else 0. `fail400`
  gives `subtype: success`, `is_error: true`, `api_error_status: 400`, result `API Error: 400 scripted
  failure (fail400)`, exit code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

_REMINDER = re.compile(r"<system-reminder>.*?</system-reminder>", re.DOTALL)


# --- reading a request -------------------------------------------------------------------------------------


def _blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [b for b in content or [] if isinstance(b, dict)]


def _visible(text: str) -> str:
    """The text a person typed: everything outside `<system-reminder>` blocks."""
    text = _REMINDER.sub("", text)
    if "</system-reminder>" in text:  # an unbalanced reminder: keep what follows the last end tag
        text = text.rsplit("</system-reminder>", 1)[1]
    return text.strip()


def user_texts(message: dict[str, Any]) -> list[str]:
    """The typed texts of one user message: its non-empty text blocks outside system reminders, without the
    CLI's `[Request interrupted by user...]` markers (after an interrupt the CLI merges the interrupted prompt,
    the marker and the next prompt into one user message) and without the `[Image: source: PATH]` block that
    CLI 2.1.332 adds after a prompt with an image."""
    texts = [_visible(b.get("text", "")) for b in _blocks(message) if b.get("type") == "text"]
    return [t for t in texts if t and not t.startswith(("[Request interrupted", "[Image: source: "))]


def user_text(message: dict[str, Any]) -> str:
    """The latest user text of one user message ("" if it has none): its last typed text block."""
    texts = user_texts(message)
    return texts[-1] if texts else ""


def _is_tool_result_only(message: dict[str, Any]) -> bool:
    blocks = _blocks(message)
    return any(b.get("type") == "tool_result" for b in blocks) and not user_text(message)


def _tool_result_text(message: dict[str, Any]) -> str:
    parts: list[str] = []
    for block in _blocks(message):
        if block.get("type") != "tool_result":
            continue
        content = block.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(c.get("text", "") for c in content if isinstance(c, dict) and c.get("type") == "text")
    return "\n".join(parts)


@dataclass
class Parsed:
    latest_user_text: str = ""
    earlier_user_texts: list[str] = field(default_factory=list)
    continuation: bool = False
    tool_result: str = ""


def parse_messages(messages: list[dict[str, Any]]) -> Parsed:
    user_messages = [m for m in messages if m.get("role") == "user"]
    parsed = Parsed()
    if user_messages and _is_tool_result_only(user_messages[-1]):
        parsed.continuation = True
        parsed.tool_result = _tool_result_text(user_messages[-1])
    texts = [t for m in user_messages for t in user_texts(m)]
    if texts:
        parsed.latest_user_text = texts[-1]
        parsed.earlier_user_texts = texts[:-1]
    return parsed


# --- answers -----------------------------------------------------------------------------------------------


@dataclass
class Text:
    chunks: list[str]
    delay: float = 0.0  # seconds before every chunk after the first


@dataclass
class ToolUse:
    name: str
    input: dict[str, Any]


@dataclass
class Answer:
    blocks: list[Text | ToolUse]
    stop_reason: str = "end_turn"
    hang: bool = False
    error_status: int = 0


def _words(text: str) -> list[str]:
    words = text.split(" ")
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


def text_answer(text: str, delay: float = 0.0) -> Answer:
    return Answer([Text(_words(text), delay)])


def side_answer(body: dict[str, Any]) -> Answer:
    """A harmless answer for the CLI's side queries (no `tools` in the request)."""
    system = json.dumps(body.get("system", ""))
    if "prefix" in system.lower() and "command" in system.lower():
        return text_answer("none")
    return text_answer("ok")


def numbered_lines(n: int) -> list[str]:
    """`line 000001 xxxx...`: n lines of 100 characters each (99 + newline), as `big` and `drip` send them."""
    return [f"line {i:06d} ".ljust(99, "x") + "\n" for i in range(1, n + 1)]


def script_answer(parsed: Parsed) -> Answer:
    text = parsed.latest_user_text
    word, _, rest = text.partition(" ")
    word = word.lower()
    rest = rest.strip()
    if parsed.continuation:
        if word in ("bash", "write", "ask"):
            return text_answer("tool said: " + parsed.tool_result[:500])
        return text_answer("ok")
    if word == "say":
        return text_answer(rest or "ok")
    if word == "recall":
        return text_answer("I remember: " + " | ".join(parsed.earlier_user_texts))
    if word == "bash" and rest:
        return Answer([ToolUse("Bash", {"command": rest, "description": "run it"})], stop_reason="tool_use")
    if word == "write" and len(rest.split(maxsplit=1)) == 2:
        path, content = rest.split(maxsplit=1)
        return Answer([ToolUse("Write", {"file_path": path, "content": content})], stop_reason="tool_use")
    if word == "ask" and rest:
        options = [{"label": label, "description": f"answer {label}"} for label in ("red", "blue")]
        question = {"question": rest, "header": "Question", "options": options, "multiSelect": False}
        return Answer([ToolUse("AskUserQuestion", {"questions": [question]})], stop_reason="tool_use")
    if word == "slow":
        n = int(rest) if rest.isdigit() else 5
        return text_answer(" ".join(f"w{i}" for i in range(1, n + 1)), delay=0.2)
    if word == "hang":
        return Answer([], hang=True)
    if word == "fail400":
        return Answer([], error_status=400)
    if word == "overloaded" and len(rest.split(maxsplit=1)) == 2 and rest.split()[0].isdigit():
        return text_answer(rest.split(maxsplit=1)[1])
    if word == "big":
        n = int(rest) if rest.isdigit() else 100
        lines = numbered_lines(n)
        return Answer([Text(["".join(lines[i : i + 50]) for i in range(0, len(lines), 50)])])
    if word == "drip" and len(rest.split()) == 2 and rest.replace(" ", "").isdigit():
        n, ms = (int(part) for part in rest.split())
        return Answer([Text(numbered_lines(n), delay=ms / 1000)])
    return text_answer("ok")


# --- HTTP --------------------------------------------------------------------------------------------------

RECORDS = web.AppKey("records", list)
OVERLOADED = web.AppKey("overloaded", dict)  # latest user text → 529s answered so far (`overloaded`)
HITS = web.AppKey("hits", dict)


def _usage(output_tokens: int) -> dict[str, int]:
    return {
        "input_tokens": 10,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def _message(model: str, content: list[dict[str, Any]], stop_reason: str | None, output_tokens: int) -> dict:
    return {
        "id": "msg_" + uuid.uuid4().hex[:24],
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": _usage(output_tokens),
    }


def _tool_id() -> str:
    return "toolu_" + uuid.uuid4().hex[:24]


async def _send_event(resp: web.StreamResponse, data: dict[str, Any]) -> None:
    await resp.write(f"event: {data['type']}\ndata: {json.dumps(data)}\n\n".encode())


async def _stream(request: web.Request, model: str, answer: Answer) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    await _send_event(resp, {"type": "message_start", "message": _message(model, [], None, 1)})
    await _send_event(resp, {"type": "ping"})
    tokens = 0
    for index, block in enumerate(answer.blocks):
        if isinstance(block, Text):
            await _send_event(
                resp,
                {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}},
            )
            for n, chunk in enumerate(block.chunks):
                if n and block.delay:
                    await asyncio.sleep(block.delay)  # the model's pace, not a wait for a condition
                await _send_event(
                    resp,
                    {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": chunk}},
                )
                tokens += 1
        else:
            start = {"type": "tool_use", "id": _tool_id(), "name": block.name, "input": {}}
            await _send_event(resp, {"type": "content_block_start", "index": index, "content_block": start})
            payload = json.dumps(block.input)
            for i in range(0, len(payload), 16):
                delta = {"type": "input_json_delta", "partial_json": payload[i : i + 16]}
                await _send_event(resp, {"type": "content_block_delta", "index": index, "delta": delta})
            tokens += 5
        await _send_event(resp, {"type": "content_block_stop", "index": index})
    await _send_event(
        resp,
        {
            "type": "message_delta",
            "delta": {"stop_reason": answer.stop_reason, "stop_sequence": None},
            "usage": _usage(max(tokens, 1)),
        },
    )
    await _send_event(resp, {"type": "message_stop"})
    await resp.write_eof()
    return resp


def _plain(model: str, answer: Answer) -> web.Response:
    content: list[dict[str, Any]] = []
    for block in answer.blocks:
        if isinstance(block, Text):
            content.append({"type": "text", "text": "".join(block.chunks)})
        else:
            content.append({"type": "tool_use", "id": _tool_id(), "name": block.name, "input": block.input})
    return web.json_response(_message(model, content, answer.stop_reason, max(len(content), 1)))


async def messages(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    msgs = body.get("messages") or []
    parsed = parse_messages(msgs)
    has_tools = bool(body.get("tools"))
    record = {
        "path": request.path,
        "latest_user_text": parsed.latest_user_text,
        "has_tools": has_tools,
        "messages_count": len(msgs),
        "continuation": parsed.continuation,
        "stream": bool(body.get("stream")),
        "disconnected": False,
        "body": body,
    }
    request.app[RECORDS].append(record)
    word, _, rest = parsed.latest_user_text.partition(" ")
    count = rest.split()[0] if rest.split() else ""
    if has_tools and not parsed.continuation and word.lower() == "overloaded" and count.isdigit():
        answered = request.app[OVERLOADED].get(parsed.latest_user_text, 0)
        if answered < int(count):
            request.app[OVERLOADED][parsed.latest_user_text] = answered + 1
            error = {"type": "overloaded_error", "message": "Overloaded"}
            return web.json_response({"type": "error", "error": error}, status=529)
    answer = script_answer(parsed) if has_tools else side_answer(body)
    model = body.get("model", "claude-test")
    try:
        if answer.hang:
            await asyncio.Event().wait()  # cancelled when the client disconnects (handler_cancellation)
        if answer.error_status:
            return web.json_response(
                {
                    "type": "error",
                    "error": {"type": "invalid_request_error", "message": "scripted failure (fail400)"},
                },
                status=answer.error_status,
            )
        if body.get("stream"):
            return await _stream(request, model, answer)
        return _plain(model, answer)
    except (asyncio.CancelledError, ConnectionResetError):
        record["disconnected"] = True
        raise


async def count_tokens(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"input_tokens": 10})


async def root(request: web.Request) -> web.Response:
    return web.Response(text="scripted model server")


async def list_requests(request: web.Request) -> web.Response:
    full = request.query.get("full") in ("1", "true")
    records = request.app[RECORDS]
    if not full:
        records = [{k: v for k, v in r.items() if k != "body"} for r in records]
    return web.json_response(records)


async def clear_requests(request: web.Request) -> web.Response:
    request.app[RECORDS].clear()
    request.app[HITS].clear()
    request.app[OVERLOADED].clear()
    return web.json_response([])


@web.middleware
async def count_hits(request: web.Request, handler):  # type: ignore[no-untyped-def]
    if not request.path.startswith("/_test/"):
        key = f"{request.method} {request.path}"
        request.app[HITS][key] = request.app[HITS].get(key, 0) + 1
    return await handler(request)


async def list_hits(request: web.Request) -> web.Response:
    return web.json_response(request.app[HITS])


def make_app() -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[count_hits])
    app[RECORDS] = []
    app[HITS] = {}
    app[OVERLOADED] = {}
    app.router.add_get("/", root)  # add_get also answers HEAD
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
    app.router.add_get("/_test/requests", list_requests)
    app.router.add_delete("/_test/requests", clear_requests)
    app.router.add_get("/_test/hits", list_hits)
    return app


async def serve(port: int) -> None:
    runner = web.AppRunner(make_app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    sockets = site._server.sockets if site._server else []  # noqa: SLF001 - the only way to learn port 0
    print(f"PORT {sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


# --- starting it from tests --------------------------------------------------------------------------------


class ModelServer:
    """A running model server subprocess: `base_url`, `requests()`, `clear()`, `stop()`."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc = proc
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"

    async def requests(self, full: bool = False) -> list[dict[str, Any]]:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            url = self.base_url + "/_test/requests" + ("?full=1" if full else "")
            async with session.get(url) as resp:
                resp.raise_for_status()
                return await resp.json()

    async def clear(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            async with session.delete(self.base_url + "/_test/requests") as resp:
                resp.raise_for_status()

    async def stop(self, timeout: float = 5.0) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()


async def start_model_server(timeout: float = 15.0) -> ModelServer:
    from tests.harness import REPO_ROOT

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.harness.model_server",
        "--port",
        "0",
        cwd=str(REPO_ROOT),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=None,  # inherit: its tracebacks show up in the test output
    )
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"model server printed no PORT line within {timeout} s") from None
    text = line.decode().strip()
    if not text.startswith("PORT "):
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"model server did not start: first line {text!r}, exit code {proc.returncode}")
    return ModelServer(proc, int(text.split()[1]))


@contextlib.asynccontextmanager
async def model_server() -> AsyncIterator[ModelServer]:
    server = await start_model_server()
    try:
        yield server
    finally:
        await server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
