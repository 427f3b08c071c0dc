"""What cross-signing costs (issue 16): the bot's identity made and published on a first start, checked on a
later one (both before the daemon joins a room), and judging one device under `trust = "cross_signed"` (every
signature checked, the pinned identity read from its file) against `trust = "all"`. `scripts/bench --identity`
writes bench/identity.md."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from nio.crypto import OlmDevice

from aiagentchat.identity import KeyFile, ensure_identity, query
from aiagentchat.trust import DeviceTrust
from bench import machine
from bench.stats import Distribution, ms
from bench.world import Homeserver
from tests.harness.e2e import E2EUser

JUDGEMENTS = 1000


@dataclass(frozen=True)
class IdentityCost:
    machine: dict[str, str]
    command: str
    publish_s: list[float]
    check_s: list[float]
    judge_cross_signed_s: list[float]
    judge_all_s: list[float]


async def measure(server: Homeserver, scratch: Path, runs: int) -> tuple[list[float], ...]:
    """`runs` fresh accounts: the first `ensure_identity` (make, publish, sign the device) and a second one (the
    homeserver already has it all); then a person's device judged JUDGEMENTS times by the last account's trust."""
    publish, check = [], []
    for run in range(runs):
        user_id, password = await server.account("identity")
        device = E2EUser(scratch / f"identity-{run}")
        await device.login(server.synapse.base_url, user_id, password)
        key_file = KeyFile(scratch / f"identity-{run}" / "cross_signing.json", secrets.token_urlsafe(16))
        try:
            await device.client.keys_upload()
            started = time.perf_counter()
            await ensure_identity(device.client, key_file, password)
            publish.append(time.perf_counter() - started)
            started = time.perf_counter()
            await ensure_identity(device.client, key_file, password)
            check.append(time.perf_counter() - started)
            published = await query(device.client, [user_id])
            trust = DeviceTrust(device.client, scratch / f"identity-{run}")
            trust.learn(published)
            judged = {mode: _judge(trust, mode, device) for mode in ("cross_signed", "all")}
        finally:
            await device.close()
    return publish, check, judged["cross_signed"], judged["all"]


def _judge(trust: DeviceTrust, mode: str, device: E2EUser) -> list[float]:
    """The same device of the account judged by its own trust (as the bot judges a person's device)."""
    olm = device.client.olm
    olm.device_store.add(olm_device := _own_device(device))
    samples = []
    for _ in range(JUDGEMENTS):
        started = time.perf_counter()
        verdict = trust.why_not(mode, olm_device)
        samples.append(time.perf_counter() - started)
        assert verdict is None, verdict
    return samples


def _own_device(device: E2EUser) -> OlmDevice:
    keys = device.client.olm.account.identity_keys
    return OlmDevice(device.client.user_id, device.client.device_id, dict(keys))


def _us(samples_s: list[float]) -> str:
    dist = Distribution.of(samples_s).scaled(1_000_000)
    return f"{dist.median:.0f} / {dist.p95:.0f} µs (n={dist.n})"


def render(cost: IdentityCost) -> str:
    rows = [
        ("first start: make the identity, publish it, sign the device (3 key queries, 2 uploads)", ms(cost.publish_s).cell()),
        ("later start: the identity is published and the device signed (1 key query)", ms(cost.check_s).cell()),
        ('judging a device, `trust = "cross_signed"` (2 signatures checked, pins file read)',
         _us(cost.judge_cross_signed_s)),
        ('judging a device, `trust = "all"`', _us(cost.judge_all_s)),
    ]  # fmt: skip
    intro = (
        f"Written by `{cost.command}`. Median / p95 (nearest rank) over n samples, against a local Synapse (the "
        "machine is shared: see the load averages)."
    )
    after = (
        "A start waits for its identity step before it joins a room; a device is judged when a room key is shared "
        "(each member's devices) and for each prompt."
    )
    lines = [
        "# What cross-signing costs",
        "",
        intro,
        "",
        *machine.table(cost.machine),
        "",
        "| what | median / p95 |",
        "|---|---|",
        *(f"| {what} | {value} |" for what, value in rows),
        "",
        after,
        "",
    ]
    return "\n".join(lines)

