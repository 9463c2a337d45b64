"""The HTTP app: management routes, proxy routes, host checks, error shapes."""
