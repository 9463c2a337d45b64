"""Where the proxy sends a worker's requests (docs/architecture.md, "The path of a request").

A worker of the plane's own host is reached on loopback, at its port. A worker of another
node of a Ray cluster (docs/cluster.md) is reached through that node's agent: the agent's
address and port, the request target under the agent's `/proxy/{id}`, and the cluster token
as the `Authorization` header. The token never shows in a repr.
"""

from __future__ import annotations

from urllib.parse import quote

LOOPBACK = "127.0.0.1"


class Upstream:
    """One worker's way in: `host`:`port`, `prefix` put before the request target, and
    `authorization` (the whole header value) sent instead of the client's, or None for a
    worker on this host (the client's own headers pass as on one host). `node` names the
    agent's node in errors (None: this host)."""

    __slots__ = ("authority", "authorization", "host", "key", "node", "port", "prefix")

    def __init__(
        self,
        host: str,
        port: int,
        prefix: bytes = b"",
        authorization: bytes | None = None,
        node: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.key = (host, port)
        """The connection pool's key: connections are shared by everything at host:port."""
        self.authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        """`host:port` as the Host header and messages write it."""
        self.prefix = prefix
        self.authorization = authorization
        self.node = node

    @classmethod
    def loopback(cls, port: int) -> Upstream:
        """A worker of this host."""
        return cls(LOOPBACK, port)

    @classmethod
    def agent(cls, host: str, port: int, worker_id: str, token: str, node: str) -> Upstream:
        """A worker of another node, through its agent's `/proxy/{worker_id}` (the id
        percent-encoded whole, as the agent's proxy reads it: a `/` in it stays in it)."""
        prefix = b"/proxy/" + quote(worker_id, safe="").encode()
        return cls(host, port, prefix, b"Bearer " + token.encode(), node)

    def describe(self) -> str:
        """For messages: where the worker is reached (never the token)."""
        if self.node is None:
            return self.authority
        return f"the agent of node {self.node} at {self.authority}"

    def __repr__(self) -> str:
        auth = ", authorization=<hidden>" if self.authorization is not None else ""
        return f"Upstream({self.authority}, prefix={self.prefix!r}{auth})"
