"""The aiagentchat benchmark (issue 7): `scripts/bench` measures the six items against a local Synapse and writes
`bench/results.md`. Measurements, not tests: nothing here asserts a time."""

from pathlib import Path

FAKE_CLAUDE = Path(__file__).resolve().parents[1] / "tests" / "fakes" / "fake_claude.py"  # the tests' fake CLI
