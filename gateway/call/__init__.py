"""One call on this instance: its states, the actions it takes, what the caller hears, and the
session that bridges the caller's leg to the agent's."""
