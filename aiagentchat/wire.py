"""The agent-to-agent wire: the keys and the variable by which daemons and `cchat` recognise each other's events
and count how many agents a prompt has passed through. One place, imported by the daemon and by `cchat`."""

MARKER_KEY = "org.aiagentchat"  # marks every event the bot sends as agent output: {prompt, hops, final, ...}
HOPS_KEY = "org.aiagentchat.hops"  # in a prompt `cchat send` posts: how many agents it has passed through
HOPS_VARIABLE = "AIAGENTCHAT_HOPS"  # in the agent's environment: the hops of the prompt it runs
