"""The aiagentchat benchmark (issue 7): `scripts/bench` measures the six items against a local Synapse and writes
`bench/results.md`. Measurements, not tests: nothing here asserts a time."""
