"""`cchat`: post prompts to an aiagentchat room from a terminal or another agent (being built; see issue 3)."""

from __future__ import annotations

import sys

import typer

app = typer.Typer(add_completion=False, help="Talk to aiagentchat rooms from the terminal.")


@app.command()
def send(room: str, text: str) -> None:
    """Post TEXT as a prompt in ROOM (not available yet)."""
    print(f"cchat: sending to {room} is not available in this version yet", file=sys.stderr)
    raise typer.Exit(2)
