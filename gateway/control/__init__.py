"""The control API: what an agent's tools POST to a call's control URL, and how it is carried out."""
