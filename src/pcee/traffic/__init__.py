"""Traffic: the store of served requests and feedback, and the HTTP load generator."""
