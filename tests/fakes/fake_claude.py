#!/usr/bin/env python3
"""A tiny stand-in for the Claude Code CLI's bidirectional stream-json mode, for unit tests of the runner.

The prompt decides what it does: `say WORDS` streams WORDS; `env` answers with the sorted names of its
environment; `argv` answers with its arguments as JSON; `tool NAME` asks permission for tool NAME and
answers with the decision it got; `hang` never answers; `crash` exits with code 3; `bigline N` writes
one non-JSON line of N bytes, then answers `survived`; `drip N MS` streams N lines `line 000001 xxx...` (100
characters each), one every MS milliseconds; `flood PATH` copies the stream-json lines in PATH to stdout as fast
as it can, then ends the turn. Like the real CLI (2.1.197): `--resume bad` (a conversation it does not have)
writes one error result and exits 1; `--settings` naming a missing file exits 1 with only an error on stderr;
`--version` prints one line. `--refuse-hooks`: the handshake (initialize) is answered with an error.
"""

import json
import os
import shutil
import sys
import time
import uuid



def emit(event):
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


session = str(uuid.uuid4())
if sys.argv[1:] == ["--version"]:
    print("0.0.0 (fake)")
    sys.exit(0)
if "--settings" in sys.argv and not os.path.exists(settings := sys.argv[sys.argv.index("--settings") + 1]):
    print(f"Error: Settings file not found: {settings}", file=sys.stderr)
    sys.exit(1)
if "--resume" in sys.argv:
    resumed = sys.argv[sys.argv.index("--resume") + 1]
    if resumed == "bad":
        gone = f"No conversation found with session ID: {resumed}"
        print(gone, file=sys.stderr)
        emit({"type": "result", "subtype": "error_during_execution", "duration_ms": 0, "is_error": True,
              "num_turns": 0, "session_id": resumed, "total_cost_usd": 0, "errors": [gone]})
        sys.exit(1)
    session = resumed


def answer(text, turns=1, chunks=None, delay_s=0.0):
    emit({"type": "stream_event", "event": {"type": "message_start", "message": {"id": "m1"}}, "session_id": session})
    for n, chunk in enumerate(chunks if chunks is not None else [word + " " for word in text.split(" ")]):
        if n and delay_s:
            time.sleep(delay_s)
        emit({"type": "stream_event", "event": {"type": "content_block_delta", "delta": {"type": "text_delta", "text": chunk}}})
    emit({"type": "assistant", "message": {"id": "m1", "content": [{"type": "text", "text": text}]}, "session_id": session})
    finish(text, turns)


def finish(text, turns=1):
    emit({"type": "result", "subtype": "success", "is_error": False, "result": text, "session_id": session,
          "duration_ms": 1234, "num_turns": turns, "total_cost_usd": 0.0012})


def read():
    line = sys.stdin.readline()
    if not line:
        sys.exit(0)
    return json.loads(line)


while True:
    message = read()
    if message["type"] == "control_request":
        if message["request"]["subtype"] == "initialize" and "--refuse-hooks" in sys.argv:
            refusal = {"subtype": "error", "request_id": message["request_id"], "error": "hooks are not supported"}
            emit({"type": "control_response", "response": refusal})
        elif message["request"]["subtype"] == "initialize":
            emit({"type": "control_response", "response": {"subtype": "success", "request_id": message["request_id"]}})
        continue
    prompt = message["message"]["content"]
    emit({"type": "system", "subtype": "init", "session_id": session, "cwd": os.getcwd()})
    if prompt.startswith("say "):
        answer(prompt[4:])
    elif prompt == "env":
        answer(" ".join(sorted(os.environ)))
    elif prompt == "argv":
        answer(json.dumps(sys.argv[1:]))
    elif prompt.startswith("tool "):
        emit({"type": "control_request", "request_id": "r1",
              "request": {"subtype": "can_use_tool", "tool_name": prompt[5:], "input": {"file_path": "/x"}}})
        response = read()
        while response["type"] != "control_response":
            response = read()
        decision = response["response"]["response"]
        answer(f"decision {decision['behavior']} {decision.get('message', '')}".strip())
    elif prompt == "hang":
        while True:
            request = read()
            if request.get("request", {}).get("subtype") == "interrupt" and os.environ.get("FAKE_OBEYS_INTERRUPT"):
                emit({"type": "result", "subtype": "error_during_execution", "is_error": True, "result": "",
                      "session_id": session})
                break
    elif prompt == "crash":
        print("boom: something broke", file=sys.stderr)
        sys.exit(3)
    elif prompt.startswith("drip "):
        count, ms = (int(part) for part in prompt.split()[1:3])
        lines = [f"line {i:06d} ".ljust(99, "x") + "\n" for i in range(1, count + 1)]
        answer("".join(lines), chunks=lines, delay_s=ms / 1000)
    elif prompt.startswith("flood "):
        with open(prompt[6:], "rb") as stream:
            shutil.copyfileobj(stream, sys.stdout.buffer, 1024 * 1024)
        finish("flooded")
    elif prompt.startswith("bigline "):
        sys.stdout.write("x" * int(prompt[8:]) + "\n")
        answer("survived")
    else:
        answer(f"you said {prompt}")
