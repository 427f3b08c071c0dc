"""`aiagentchat console`: the operator's terminal screen (Textual), a client of the daemon's control socket
(docs/control.md). The rooms, one line each and live; the selected room's running prompt with its tool lines,
its queue and its waiting approval, with keys to stop, drop, allow, deny, always and start a new conversation;
the daemon's log for that room; the emoji verification of the bot's device with a person's (v), whose outcome
shows in the rooms' trust column. It attaches and detaches at any time; the daemon never waits for it."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Input, Label, RichLog, Static

from aiagentchat.commands import usd
from aiagentchat.control import ControlClient, ControlError

LOG_KEPT = 500  # records kept per room
TOOLS_SHOWN = 4
STALE_S = 0.25  # the agent's streamed text is shown at most this often
UNDER_WAY = ("waiting", "comparing", "confirming")  # a verification's phases before its end
EMOJI_PER_ROW = 4
EMOJI_CELL = 16


def elapsed(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds} s" if seconds < 120 else f"{seconds // 60} min {seconds % 60:02d} s"


def state_text(room: dict[str, Any], now: float) -> str:
    """A room's state in a few words: idle, running for N s, waiting for approval, refused: why."""
    match room.get("state"):
        case "waiting":
            return "✋ waiting for approval"
        case "running":
            return f"▶ running for {elapsed(now - room['running']['since'])}"
        case "refused":
            return f"⛔ refused: {room.get('refused')}"
    return "idle"


def cost_text(room: dict[str, Any]) -> str:
    spent, budget = room.get("cost_today") or 0.0, room.get("budget")
    return usd(spent) if budget is None else f"{usd(spent)} / {usd(budget)}"


def trust_text(room: dict[str, Any]) -> str:
    """`-` for a room that is not encrypted, `✓` when its trust accepts every allowed user, else how many not."""
    trust = room.get("trust")
    if trust is None:
        return "-"
    unverified = len(trust.get("unverified") or [])
    return "✓" if unverified == 0 else f"{unverified} unverified"


def emoji_grid(emoji: list[list[str]]) -> Text:
    """The seven emoji of a verification, each above its name, in rows wide enough to compare at a glance."""
    text = Text(justify="center")
    for start in range(0, len(emoji), EMOJI_PER_ROW):
        row = emoji[start : start + EMOJI_PER_ROW]
        text.append("".join(symbol.center(EMOJI_CELL - 1) for symbol, _ in row) + "\n", style="bold")
        text.append("".join(name.center(EMOJI_CELL) for _, name in row) + "\n\n")
    return text


def verification_text(state: dict[str, Any] | None) -> Text:
    """Where a verification stands, its emoji while they are to be compared, what it said last."""
    if state is None:
        return Text("Enter USER DEVICE to verify that device (USER alone: whichever of theirs accepts first), or "
                    "nothing to wait for an allowed user to start a verification from their client.")  # fmt: skip
    text = Text()
    whom = f"{state['user']} {state['device'] or ''}".strip() if state.get("user") else "an allowed user's device"
    text.append(f"Verification with {whom}: {state['phase']}\n", style="bold")
    if state["phase"] == "comparing" and state.get("emoji"):
        text.append("\n")
        text.append_text(emoji_grid(state["emoji"]))
        text.append(f"numbers: {' '.join(str(n) for n in state.get('decimals') or [])}\n\n", style="dim")
        text.append("Do they match what the other device shows?  y they match · n they do not\n", style="bold reverse")
    for line in (state.get("lines") or [])[-4:]:
        text.append(f"{line}\n")
    return text


def room_detail(room: dict[str, Any] | None, activity: str, now: float) -> Text:
    """The selected room: its running prompt, a waiting approval, what the agent does and its latest tool lines
    (most recent first), in that order: what matters most stays in view when the screen is small."""
    if room is None:
        return Text("No room selected.", style="dim")
    text = Text(no_wrap=True, overflow="ellipsis")  # one line each: what comes first stays in view
    text.append(f"{room['name']}", style="bold")
    where = f"  {room['id']}" if room["id"] != room["name"] else ""
    text.append(f"{where}  model {room.get('model') or 'default'}, today {cost_text(room)}\n", style="dim")
    running = room.get("running")
    if running is None:
        text.append("Nothing is running.\n", style="dim")
    else:
        text.append(f"▶ {elapsed(now - running['since'])}, {running['sender']}: ")
        text.append(f"{running['text']}\n", style="bold")
    if (approval := room.get("approval")) is not None:
        text.append(f"✋ Approval needed: {approval['what']}\n", style="bold reverse")
        always = approval.get("always") or "once only: it can run any code"
        text.append(f"  a allow once · d deny · A always: {always}\n", style="bold")
        details = [line for line in str(approval.get("details", "")).splitlines() if not line.startswith("```")]
        for line in details[:2]:
            text.append(f"  {line}\n")
    if running is not None:
        if activity or running.get("activity"):
            text.append(f"  {activity or running['activity']}\n", style="italic")
        tools = running.get("tools") or []
        for line in tools[::-1][:TOOLS_SHOWN]:
            text.append(f"  {line}\n")
        if len(tools) > TOOLS_SHOWN:
            text.append(f"  … and {len(tools) - TOOLS_SHOWN} earlier tool calls\n", style="dim")
    return text


def log_line(record: dict[str, Any]) -> str:
    """A log record as one line: time, level, event and its other fields."""
    stamp = str(record.get("timestamp", ""))[11:19]
    skip = {"timestamp", "level", "event", "logger", "room_id"}
    rest = " ".join(f"{key}={value}" for key, value in record.items() if key not in skip)
    return f"{stamp} {record.get('level', '')!s:7} {record.get('event', '')} {rest}".rstrip()


class DenyScreen(ModalScreen[str | None]):
    """Asks for a denial's reason (empty: none); Escape cancels."""

    BINDINGS: ClassVar = [Binding("escape", "cancel", "Cancel")]
    DEFAULT_CSS = """
    DenyScreen { align: center middle; }
    DenyScreen > Vertical { width: 70; height: auto; border: round $error; padding: 0 1; }
    """

    def __init__(self, what: str) -> None:
        super().__init__()
        self._what = what

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(f"Deny {self._what}: the reason, for the agent (Enter; Escape cancels)")
            yield Input(placeholder="reason (optional)", id="reason")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)

    def action_cancel(self) -> None:
        self.dismiss(None)


class VerifyScreen(ModalScreen[None]):
    """The emoji verification of the bot's device: the target typed (or nothing, to wait for one), then the
    emoji to compare, y or n, and the outcome; Escape cancels one under way and closes."""

    BINDINGS: ClassVar = [
        Binding("y", "confirm(True)", "They match"),
        Binding("n", "confirm(False)", "They differ"),
        Binding("escape", "close", "Cancel & close"),
    ]
    DEFAULT_CSS = """
    VerifyScreen { align: center middle; }
    VerifyScreen > Vertical { width: 76; height: auto; max-height: 22; border: round $primary; padding: 0 1; }
    VerifyScreen #target { margin-bottom: 1; }
    """
    AUTO_FOCUS = ""  # none: the target's input only while nothing is under way: y and n are the screen's then

    def __init__(self) -> None:
        super().__init__()
        self._started = False  # a verification was started from this screen: its outcome stays shown

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("Verify the bot's device (Escape cancels and closes)")
            yield Input(placeholder="@user:server DEVICE, @user:server, or empty: wait for one", id="target")
            yield Static(id="progress")
        yield Footer()

    def on_mount(self) -> None:
        self.show(self._console.verification)

    @property
    def _console(self) -> Console:
        assert isinstance(self.app, Console)
        return self.app

    def show(self, state: dict[str, Any] | None) -> None:
        under_way = state is not None and state["phase"] in UNDER_WAY
        target = self.query_one("#target", Input)
        target.display = not under_way
        if under_way:
            self.set_focus(None)
        else:
            target.focus()
        self.query_one("#progress", Static).update(verification_text(state if under_way or self._started else None))

    async def on_input_submitted(self, event: Input.Submitted) -> None:
        words = event.value.split()
        if len(words) > 2:
            self.notify("At most two words: USER and DEVICE.", severity="warning")
            return
        fields = dict(zip(("user", "device"), words, strict=False))
        if await self._console.verify_request("verify", **fields) is not None:
            self._started = True

    async def action_confirm(self, match: bool) -> None:
        state = self._console.verification
        if state is None or state["phase"] != "comparing":
            self.notify("No emoji are waiting to be compared.", severity="warning")
            return
        await self._console.verify_request("verify_confirm", match=match)

    async def action_close(self) -> None:
        state = self._console.verification
        if state is not None and state["phase"] in UNDER_WAY:
            await self._console.verify_request("verify_cancel")
        self.dismiss(None)


class Console(App[None]):
    """The operator's console. `client` None: nothing to attach to (a rendering of a given state, for the
    screenshot)."""

    TITLE = "aiagentchat console"
    ENABLE_COMMAND_PALETTE = False
    CSS = """
    #rooms { height: 5; }
    #detail { height: 8; border-top: solid $primary; padding: 0 1; }
    #queue { height: 3; border-top: solid $primary; }
    #log { border-top: solid $primary; padding: 0 1; }
    #status { height: 1; background: $panel; padding: 0 1; }
    """
    BINDINGS: ClassVar = [
        Binding("s", "stop", "Stop"),
        Binding("a", "answer('allow')", "Allow"),
        Binding("d", "deny", "Deny"),
        Binding("A", "answer('always')", "Always"),
        Binding("x", "drop", "Drop"),
        Binding("N", "new", "New"),
        Binding("v", "verify", "Verify"),
        Binding("r", "attach", "Reattach", show=False),
        Binding("tab", "focus_next", "Next pane", show=False),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, socket: Path | None, clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self._socket = socket
        self._clock = clock
        self.client: ControlClient | None = None
        self.rooms: dict[str, dict[str, Any]] = {}
        self.selected: str | None = None
        self.user_id = ""
        self.activity: dict[str, str] = {}  # room → the last line its running prompt wrote
        self._tails: dict[str, str] = {}
        self.logs: dict[str, collections.deque[dict[str, Any]]] = collections.defaultdict(
            lambda: collections.deque(maxlen=LOG_KEPT)
        )
        self.status = "connecting…" if socket is not None else ""
        self.verification: dict[str, Any] | None = None  # the daemon's verification under way, or its last one
        self._stale = False  # the selected room's activity changed since it was shown

    def compose(self) -> ComposeResult:
        yield Static(id="status")
        rooms = DataTable(id="rooms", cursor_type="row", zebra_stripes=True, cell_padding=0)  # 80 columns: gaps of 1
        for label, width in (("room", 11), ("state", 25), ("q'd", 4), ("today", 16), ("model", 8), ("trust", 12)):
            rooms.add_column(label, width=width)
        yield rooms
        yield Static(id="detail")
        queue = DataTable(id="queue", cursor_type="row", show_header=False)
        queue.add_column("queued", width=50)
        queue.add_column("from", width=24)
        queue.border_title = "queue"
        yield queue
        log = RichLog(id="log", max_lines=LOG_KEPT, wrap=False, markup=False)
        log.border_title = "log"
        yield log
        yield Footer()

    def on_mount(self) -> None:
        self.theme = "ansi-dark"  # the terminal's own colours: readable on dark and light terminals alike
        self.set_interval(1.0, self.refresh_view)
        self.set_interval(STALE_S, self._refresh_if_stale)
        if self._socket is not None:
            self.attach()
        self.refresh_view()

    @work(exclusive=True, group="control")
    async def attach(self) -> None:
        assert self._socket is not None
        try:
            self.client = await ControlClient.connect(self._socket)
        except OSError as exc:
            self.status = f"❌ cannot reach the daemon at {self._socket}: {exc.strerror or exc} (r tries again)"
            self.refresh_view()
            return
        streaming = asyncio.create_task(self.client.stream(self.take))
        try:
            self.load(await self.client.request("subscribe", logs=True))
            why = await streaming
        except ControlError as exc:
            why = str(exc)
        finally:
            streaming.cancel()
            await self.client.close()
            self.client = None
        self.status = f"❌ detached: {why} (r attaches again)"
        self.refresh_view()

    def action_attach(self) -> None:
        if self.client is None and self._socket is not None:
            self.status = "connecting…"
            self.attach()

    # --- state -------------------------------------------------------------------------------------------

    def load(self, snapshot: dict[str, Any]) -> None:
        """Take a snapshot: every room as it is now."""
        self.user_id = str(snapshot.get("user_id", ""))
        self.rooms = {room["id"]: room for room in snapshot.get("rooms", [])}
        self.verification = snapshot.get("verification")
        if self.selected not in self.rooms:
            self.selected = next(iter(self.rooms), None)
        self.status = f"attached to {self.user_id}"
        self.refresh_view(rooms_changed=True)

    def take(self, message: dict[str, Any]) -> None:
        """One message of the stream."""
        room_id = message.get("room") if isinstance(message.get("room"), str) else None
        match message.get("type"):
            case "room":
                room = message["room"]
                known = room["id"] in self.rooms
                self.rooms[room["id"]] = room
                if self.selected is None:
                    self.selected = room["id"]
                self.refresh_view(rooms_changed=not known)
            case "begin" if room_id is not None:
                self.activity[room_id], self._tails[room_id] = "", ""
            case "output" if room_id is not None and message.get("kind") == "text":
                tail = (self._tails.get(room_id, "") + str(message.get("text", "")))[-400:]
                self._tails[room_id] = tail
                line = next((line.strip() for line in reversed(tail.splitlines()) if line.strip()), "")
                self.activity[room_id] = f"✍️ {line[-120:]}"
                self._stale = self._stale or room_id == self.selected  # shown within STALE_S: a burst costs one
            case "verification" if isinstance(message.get("verification"), dict):
                self.verification = message["verification"]
                if isinstance(self.screen, VerifyScreen):
                    self.screen.show(self.verification)
                if self.verification["phase"] in ("verified", "failed"):
                    self.notify((self.verification.get("lines") or ["verification ended"])[-1])
            case "log":
                record = message.get("record")
                if isinstance(record, dict):
                    self.add_log(record)

    def add_log(self, record: dict[str, Any]) -> None:
        room_id = record.get("room_id")
        if not isinstance(room_id, str):
            return
        self.logs[room_id].append(record)
        if room_id == self.selected:
            self.query_one("#log", RichLog).write(log_line(record))

    # --- the screen --------------------------------------------------------------------------------------

    def _refresh_if_stale(self) -> None:
        if self._stale:
            self.refresh_view()

    def refresh_view(self, rooms_changed: bool = False) -> None:
        self._stale = False
        now = self._clock()
        table = self.query_one("#rooms", DataTable)
        if rooms_changed or table.row_count != len(self.rooms):
            table.clear()
            for room_id, room in self.rooms.items():
                table.add_row(*self._room_cells(room, now), key=room_id)
            if self.selected in self.rooms:
                table.move_cursor(row=list(self.rooms).index(self.selected))
        else:
            for room_id, room in self.rooms.items():
                for column, cell in enumerate(self._room_cells(room, now)):
                    table.update_cell_at((list(self.rooms).index(room_id), column), cell)
        room = self.rooms.get(self.selected or "")
        activity = self.activity.get(self.selected or "", "") if room and room.get("running") else ""
        self.query_one("#detail", Static).update(room_detail(room, activity, now))
        queue = self.query_one("#queue", DataTable)
        queued = (room or {}).get("queue") or []
        if [str(key.value) for key in queue.rows] != [entry["prompt"] for entry in queued]:
            queue.clear()
            for entry in queued:
                queue.add_row(Text(entry["text"]), entry["sender"], key=entry["prompt"])
        self.query_one("#status", Static).update(Text(self.status))

    @staticmethod
    def _room_cells(room: dict[str, Any], now: float) -> tuple[Text, ...]:
        return (
            Text(str(room["name"])),
            Text(state_text(room, now)),
            Text(str(len(room.get("queue") or []))),
            Text(cost_text(room)),
            Text(str(room.get("model") or "default")),
            Text(trust_text(room)),
        )

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.data_table.id != "rooms" or event.row_key.value is None or event.row_key.value == self.selected:
            return
        self.selected = str(event.row_key.value)
        log = self.query_one("#log", RichLog)
        log.clear()
        for record in self.logs.get(self.selected, ()):
            log.write(log_line(record))
        self.refresh_view()

    # --- actions -----------------------------------------------------------------------------------------

    async def _act(self, op: str, **fields: Any) -> None:
        if self.client is None or self.selected is None:
            self.notify("Not attached to a daemon.", severity="error")
            return
        try:
            reply = await self.client.request(op, room=self.selected, **fields)
        except ControlError as exc:
            self.notify(str(exc), severity="warning")
            return
        self.notify(f"{op}: {reply.get('outcome', 'done')}")

    def _approval(self) -> dict[str, Any] | None:
        approval = self.rooms.get(self.selected or "", {}).get("approval")
        if approval is None:
            self.notify("Nothing waits for approval in this room.", severity="warning")
        return approval

    async def action_stop(self) -> None:
        await self._act("stop")

    async def action_answer(self, verdict: str) -> None:
        if (approval := self._approval()) is not None:
            await self._act("answer", approval=approval["key"], verdict=verdict)

    def action_deny(self) -> None:
        if (approval := self._approval()) is None:
            return

        async def denied(reason: str | None) -> None:
            if reason is not None:
                await self._act("answer", approval=approval["key"], verdict="deny", text=reason)

        self.push_screen(DenyScreen(approval["what"]), denied)

    async def action_drop(self) -> None:
        queue = self.query_one("#queue", DataTable)
        if queue.row_count == 0:
            self.notify("Nothing is queued in this room.", severity="warning")
            return
        key = queue.coordinate_to_cell_key((queue.cursor_row, 0)).row_key.value
        await self._act("drop", prompt=key)

    async def action_new(self) -> None:
        await self._act("new")

    def action_verify(self) -> None:
        self.push_screen(VerifyScreen())

    async def verify_request(self, op: str, **fields: Any) -> dict[str, Any] | None:
        """A verification request to the daemon; its reply, or None (the operator is told why)."""
        if self.client is None:
            self.notify("Not attached to a daemon.", severity="error")
            return None
        try:
            return await self.client.request(op, **fields)
        except ControlError as exc:
            self.notify(str(exc), severity="warning")
            return None
