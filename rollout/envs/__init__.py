"""Environments the agent acts in: the protocol, Docker containers, the bubblewrap sandbox, task images."""
