"""Health and metrics without a homeserver: the verdicts of /healthz, what an outbox counts for /metrics, and
both endpoints served on a real socket."""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from aiagentchat.errors import ConfigError
from aiagentchat.health import Health, outbox_problem, serving, split_address, sync_problem
from aiagentchat.metrics import OUTCOMES, Metrics
from aiagentchat.outbox import Outbox, RateLimited, SendOutcome, Sent, Stats, reaction_content, redaction_content
from aiagentchat.settings import DaemonSettings

pytestmark = pytest.mark.anyio
ROOM = "!room:example.org"


def test_a_sync_within_the_max_age_is_healthy_and_an_older_one_says_how_old():
    assert sync_problem(now=100.0, last_sync=20.0, max_age_s=90) is None
    assert sync_problem(now=100.0, last_sync=5.0, max_age_s=90) == "no good sync for 95 s (more than 90 s)"
    assert sync_problem(now=100.0, last_sync=None, max_age_s=90) == "starting: no sync with the homeserver yet"


def test_an_outbox_is_stuck_only_when_its_next_event_waited_longer_than_the_max_age():
    assert outbox_problem(now=1000.0, waiting_since=None, max_age_s=300) is None
    assert outbox_problem(now=1000.0, waiting_since=800.0, max_age_s=300) is None
    assert outbox_problem(now=1000.0, waiting_since=600.0, max_age_s=300) == (
        "outbox stuck: an event has waited 400 s to be delivered (more than 300 s)"
    )


def test_listen_addresses_split_into_host_and_port():
    assert split_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert split_address("[::1]:0") == ("::1", 0)


class Probe:
    """The facts a Health reads, set by the test."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.last_sync: float | None = 990.0
        self.waiting_since: float | None = None
        self.write_error: Exception | None = None
        self.writes = 0

    async def write(self) -> None:
        self.writes += 1
        if self.write_error is not None:
            raise self.write_error

    def health(self, **settings: Any) -> Health:
        return Health(
            DaemonSettings(**settings), lambda: self.last_sync, lambda: self.waiting_since, self.write, lambda: self.now
        )


async def test_health_names_the_first_problem_and_checks_the_database_with_a_write():
    probe = Probe()
    health = probe.health(health_sync_max_age_s=30, health_outbox_max_age_s=60)
    assert await health.problem() is None
    assert probe.writes == 1
    probe.write_error = sqlite3.OperationalError("disk I/O error")
    assert await health.problem() == "database not writable: OperationalError: disk I/O error"
    probe.waiting_since = 900.0
    assert (await health.problem()).startswith("outbox stuck: an event has waited 100 s")
    probe.last_sync = 900.0
    assert await health.problem() == "no good sync for 100 s (more than 30 s)"
    assert health.sync_problem() == "no good sync for 100 s (more than 30 s)"


async def test_the_database_write_of_a_real_store_passes(store):
    health = Health(DaemonSettings(), lambda: time.monotonic(), lambda: None, store.check_writable)
    assert await health.problem() is None


class ScriptedSender:
    """Answers each send with the next scripted outcome (then Sent)."""

    def __init__(self, *outcomes: SendOutcome) -> None:
        self.outcomes = list(outcomes)
        self.sent = 0

    async def _next(self) -> SendOutcome:
        self.sent += 1
        return self.outcomes.pop(0) if self.outcomes else Sent(f"$e{self.sent}")

    async def send(self, room_id: str, content: dict[str, Any], txn_id: str, event_type: str = "") -> SendOutcome:
        return await self._next()

    async def redact(self, room_id: str, event_id: str, txn_id: str) -> SendOutcome:
        return await self._next()

    async def upload(self, room_id: str, path: Path, mimetype: str) -> SendOutcome:
        raise AssertionError("no uploads here")


async def test_an_outbox_counts_events_by_kind_prompt_outcomes_back_off_and_how_long_its_next_event_waits(store):
    now = [0.0]
    box = Outbox(ROOM, ScriptedSender(RateLimited(2.5)), store, clock=lambda: now[0])
    assert box.waiting_since() is None
    message = {"msgtype": "m.text", "body": "hi", "org.aiagentchat.ref": "r"}
    await box.queue([message], "$p1")
    now[0] = 10.0
    await box.queue([reaction_content("$p1", "✅", ref="x")], "$p1", ended="done")
    await box.send_next()  # 429: the first event keeps waiting since it was queued
    assert box.waiting_since() == 0.0
    now[0] = 13.0
    await box.send_next()
    assert box.waiting_since() == 13.0  # the reaction is next now
    await box.send_next()
    edit = {"msgtype": "m.text", "body": "hi!", "org.aiagentchat.replaces": "r"}
    await box.queue([edit, redaction_content("x")], "$p2", ended="failed")
    await box.send_next()
    await box.send_next()
    assert box.waiting_since() is None
    assert box.stats.sent_by_kind == {"message": 1, "reaction": 1, "edit": 1, "redaction": 1}
    assert box.stats.prompts_ended == {"done": 1, "failed": 1}
    assert (box.stats.rate_limited, box.stats.backoff_s) == (1, 2.5)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_the_endpoints_answer_on_a_real_socket_and_each_daemon_has_a_registry_of_its_own():
    probe = Probe()
    metrics, other = Metrics(), Metrics()
    metrics.approvals.labels("deny").inc()
    metrics.cost_usd.labels(ROOM).inc(0.25)
    metrics.run_seconds.observe(3.0)
    with capture_logs() as logs:
        async with serving(probe.health(http_listen="127.0.0.1:0", health_sync_max_age_s=30), metrics):
            [address] = next(entry["addresses"] for entry in logs if entry["event"] == "http_serving")
            with pytest.raises(ConfigError, match=f"http_listen = '{address}' cannot be served"):
                async with serving(probe.health(http_listen=address), other):
                    pass
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://{address}/healthz") as response:
                    assert (response.status, await response.text()) == (200, "ok\n")
                probe.last_sync = 900.0
                async with session.get(f"http://{address}/healthz") as response:
                    assert (response.status, await response.text()) == (
                        503,
                        "no good sync for 100 s (more than 30 s)\n",
                    )
                async with session.get(f"http://{address}/metrics") as response:
                    assert response.status == 200
                    scraped = samples(await response.text())
    assert scraped[("aiagentchat_approvals_total", (("verdict", "deny"),))] == 1
    assert scraped[("aiagentchat_cost_usd_total", (("room", ROOM),))] == 0.25
    assert scraped[("aiagentchat_run_duration_seconds_count", ())] == 1
    assert scraped[("aiagentchat_prompts_total", (("outcome", "done"),))] == 0
    assert scraped[("aiagentchat_agents_running", ())] == 0
    assert ("aiagentchat_approvals_total", (("verdict", "deny"),)) not in samples(other.exposition(None)[0].decode())


async def test_with_http_listen_empty_nothing_is_served():
    with capture_logs() as logs:
        async with serving(Probe().health(http_listen=""), Metrics()):
            pass
    assert logs == []


def test_the_rooms_are_read_when_scraped_summed_over_rooms_where_a_total_is_enough():
    def worker(queued: int, backlog: int, agent: object | None, **ended: int) -> SimpleNamespace:
        stats = Stats(
            rate_limited=2, backoff_s=1.5, sent_by_kind=Counter(message=3, edit=1), prompts_ended=Counter(ended)
        )
        batcher = SimpleNamespace(stats=stats, backlog=lambda: backlog)
        return SimpleNamespace(queued=lambda: queued, live_agents=lambda: int(agent is not None), batcher=batcher)

    workers = {"!a:x": worker(2, 5, object(), done=3, refused=1), "!b:x": worker(0, 0, None, done=1, dropped=1)}
    scraped = samples(Metrics(lambda: workers).exposition(None)[0].decode())
    assert {outcome: scraped[("aiagentchat_prompts_total", (("outcome", outcome),))] for outcome in OUTCOMES} == {
        "done": 4, "failed": 0, "interrupted": 0, "refused": 1, "dropped": 1
    }  # fmt: skip
    assert scraped[("aiagentchat_events_sent_total", (("type", "message"),))] == 6
    assert scraped[("aiagentchat_events_sent_total", (("type", "reaction"),))] == 0
    assert scraped[("aiagentchat_rate_limited_total", ())] == 4
    assert scraped[("aiagentchat_send_backoff_seconds_total", ())] == 3.0
    assert scraped[("aiagentchat_agents_running", ())] == 1
    assert scraped[("aiagentchat_queued_prompts", (("room", "!a:x"),))] == 2
    assert scraped[("aiagentchat_outbox_backlog_events", (("room", "!a:x"),))] == 5
