"""The agent side: the loop, its tools, policies, experts and the hidden judge, trajectory records."""
