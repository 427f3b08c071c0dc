"""The daemon's Prometheus metrics (`GET /metrics`), on a registry of its own, so that tests can run several
daemons' worth in one process. What happens once (a run ends, a sync batch arrives, an approval is answered,
a run costs) is counted where it happens; what is a state (queues, backlogs, agents) or is counted already
(each outbox's `Stats`) is read only when scraped, so sending an event pays nothing more for it."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, get_args

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from aiagentchat.outbox import EVENT_KINDS
from aiagentchat.store import PromptState

if TYPE_CHECKING:
    from aiagentchat.runner import RoomWorker

OUTCOMES = [state for state in get_args(PromptState) if state not in ("queued", "running")]
RUN_BUCKETS_S = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)  # a one-line answer takes ~1 s; timeout_s is 300
LAG_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, workers: Callable[[], Mapping[str, RoomWorker]] = dict) -> None:
        self.registry = CollectorRegistry()
        self.run_seconds = Histogram(
            "aiagentchat_run_duration_seconds",
            "Wall time of each prompt's run, from its start to its end (any outcome but a shutdown).",
            buckets=RUN_BUCKETS_S,
            registry=self.registry,
        )
        self.sync_lag = Histogram(
            "aiagentchat_sync_lag_seconds",
            "From an event's origin_server_ts to its arrival in a sync (senders' clocks count too).",
            buckets=LAG_BUCKETS_S,
            registry=self.registry,
        )
        self.cost_usd = Counter(
            "aiagentchat_cost_usd",
            "What the agent's runs cost, as the CLI reports it.",
            ["room"],
            registry=self.registry,
        )
        self.approvals = Counter(
            "aiagentchat_approvals",
            "Approval requests by verdict: allow, always, deny, or unanswered (timed out or the run stopped).",
            ["verdict"],
            registry=self.registry,
        )
        self.registry.register(_Rooms(workers))

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The metrics in the format the scraper asked for (Prometheus text, or OpenMetrics), and its type."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class _Rooms:
    """What the rooms' workers and outboxes know, read at scrape time."""

    def __init__(self, workers: Callable[[], Mapping[str, RoomWorker]]) -> None:
        self._workers = workers

    def collect(self) -> Iterator[Metric]:
        workers = self._workers()
        prompts = CounterMetricFamily("aiagentchat_prompts", "Prompts that ended, by outcome.", labels=["outcome"])
        sent = CounterMetricFamily(
            "aiagentchat_events_sent", "Events the homeserver accepted, by type.", labels=["type"]
        )
        stats = [worker.batcher.stats for worker in workers.values()]
        for outcome in OUTCOMES:
            prompts.add_metric([outcome], sum(s.prompts_ended.get(outcome, 0) for s in stats))
        for kind in EVENT_KINDS:
            sent.add_metric([kind], sum(s.sent_by_kind.get(kind, 0) for s in stats))
        yield prompts
        yield sent
        yield CounterMetricFamily(
            "aiagentchat_rate_limited",
            "Sends the homeserver answered with 429.",
            value=sum(s.rate_limited for s in stats),
        )
        yield CounterMetricFamily(
            "aiagentchat_send_backoff_seconds",
            "Seconds sending paused after 429s and failed sends, summed over rooms.",
            value=sum(s.backoff_s for s in stats),
        )
        yield GaugeMetricFamily(
            "aiagentchat_agents_running",
            "Claude Code CLI processes alive.",
            value=sum(worker.live_agents() for worker in workers.values()),
        )
        queued = GaugeMetricFamily("aiagentchat_queued_prompts", "Prompts waiting to run, per room.", labels=["room"])
        backlog = GaugeMetricFamily(
            "aiagentchat_outbox_backlog_events", "Events not yet delivered, per room.", labels=["room"]
        )
        for room_id, worker in workers.items():
            queued.add_metric([room_id], worker.queued())
            backlog.add_metric([room_id], worker.batcher.backlog())
        yield queued
        yield backlog
