"""Client-server API calls that matrix-nio 0.26 has no method for (cross-signing, account data): one request
with the bot's access token, its JSON answer and status. Network errors propagate (callers retry or report)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from nio import AsyncClient

PREFIX = "/_matrix/client/v3"


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any]  # {} when the answer was not a JSON object
    is_object: bool = True

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def error(self) -> str:
        """The homeserver's own words for a refusal: `M_CODE: message`."""
        return f"{self.body.get('errcode', self.status)}: {self.body.get('error', 'no reason given')}"


async def call(client: AsyncClient, method: str, path: str, body: dict[str, Any] | None = None) -> Reply:
    """`method` `PREFIX + path` with `body` as JSON."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {client.access_token}"}
    data = None if body is None else json.dumps(body)
    async with await client.send(method, PREFIX + path, data, headers) as response:
        text = await response.text()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    is_object = isinstance(parsed, dict)
    return Reply(response.status, parsed if is_object else {}, is_object)


def segment(value: str) -> str:
    """One path segment (a user id, an event type), escaped."""
    return quote(value, safe="")
