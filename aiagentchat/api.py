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
    body: dict[str, Any]

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def error(self) -> str:
        """The homeserver's own words for a refusal: `M_CODE: message`."""
        return f"{self.body.get('errcode', self.status)}: {self.body.get('error', 'no reason given')}"


async def call(client: AsyncClient, method: str, path: str, body: dict[str, Any] | None = None) -> Reply:
    """`method` `PREFIX + path` with `body` as JSON; a body that is not a JSON object becomes {}."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {client.access_token}"}
    data = None if body is None else json.dumps(body)
    response = await client.send(method, PREFIX + path, data, headers)
    try:
        parsed = await response.json(content_type=None)
    except ValueError:
        parsed = {}
    finally:
        response.release()
    return Reply(response.status, parsed if isinstance(parsed, dict) else {})


def segment(value: str) -> str:
    """One path segment (a user id, an event type), escaped."""
    return quote(value, safe="")
