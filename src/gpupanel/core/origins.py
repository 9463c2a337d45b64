"""Browser origins, parsed once (docs/security.md, "Browser origins"): an `Origin` header as
a browser sends it, and a `[panel] allowed_origins` entry. The config checks entries with
`allowed_origin` at load; the HTTP guard (api/security.py) matches headers against them."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

DEFAULT_PORTS = {"http": 80, "https": 443}
ANY_PORT = -1
"""The port of an entry that ends in `:*`."""
ENTRY_FORM = (
    'an origin is scheme://host[:port] (port "*" for any), e.g. "https://notebooks.example.org"'
)

_SCHEME = r"[a-z][a-z0-9+.\-]*"
_LABEL = r"[a-z0-9_~\-]+"
_NAME = rf"{_LABEL}(?:\.{_LABEL})*"
_ORIGIN = re.compile(rf"({_SCHEME})://(\[[0-9a-f:.]+\]|{_NAME})?(?::([0-9]{{1,5}}))?")
_PATTERN_LABEL = re.compile(r"[a-z0-9_~\-*]+")


def origin_host(host: str) -> str | None:
    """A host as it appears in an origin: lowercased, IPv6 bracketed and compressed;
    None if it is not a host name or an IP literal."""
    host = host.lower()
    if host.startswith("["):  # only IPv6 goes in brackets
        try:
            return f"[{ipaddress.IPv6Address(host[1:-1] if host.endswith(']') else '-')}]"
        except ValueError:
            return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host if re.fullmatch(_NAME, host) else None
    return f"[{ip.compressed}]" if ip.version == 6 else ip.compressed


def parse_origin(origin: str) -> tuple[str, str, int | None] | None:
    """An `Origin` header as (scheme, host, port), port None for the scheme's default or
    none; None if it is not a plain `scheme://host[:port]` (`null`, user info, a path...)."""
    m = _ORIGIN.fullmatch(origin.lower())
    if m is None:
        return None
    scheme, host, port_text = m[1], m[2] or "", m[3]
    if host.startswith("["):
        normal = origin_host(host)
        if normal is None:
            return None
        host = normal
    port = None
    if port_text is not None:
        port = int(port_text)
        if not 0 < port <= 65535:
            return None
        if port == DEFAULT_PORTS.get(scheme):
            port = None
    return scheme, host, port


@dataclass(frozen=True)
class AllowedOrigin:
    """One `[panel] allowed_origins` entry: a scheme, a host (normalised) or a host pattern
    (`*` labels), and a port (None: the scheme's default; ANY_PORT: any)."""

    scheme: str
    host: str
    port: int | None
    pattern: re.Pattern[str] | None = None


def allowed_origin(entry: str) -> AllowedOrigin:
    """Parse an allowed-origins entry, `scheme://host[:port|:*]` with `*` in host labels.
    ValueError saying what is wrong and what an origin looks like."""

    def bad(why: str) -> ValueError:
        return ValueError(f"{why}; {ENTRY_FORM}")

    scheme, sep, rest = entry.lower().partition("://")
    if not sep or not re.fullmatch(_SCHEME, scheme):
        raise bad("no scheme")
    if rest.startswith("["):
        host, bracket, after = rest.partition("]")
        host += bracket
        if after and not after.startswith(":"):
            raise bad("junk after the IPv6 address")
        port_text: str | None = after[1:] if after else None
    else:
        host, colon, text = rest.partition(":")
        port_text = text if colon else None
    port: int | None = None
    if port_text == "*":
        port = ANY_PORT
    elif port_text is not None:
        if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) <= 65535:
            raise bad(f"port {port_text!r} is not 1-65535 or *")
        port = int(port_text)
        port = None if port == DEFAULT_PORTS.get(scheme) else port
    if "*" in host:
        labels = host.split(".")
        if not all(_PATTERN_LABEL.fullmatch(label) for label in labels):
            raise bad(f"host {host!r} is not a host name with * labels")
        rx = r"\.".join(re.escape(lb).replace(r"\*", _LABEL) for lb in labels)
        return AllowedOrigin(scheme, host, port, re.compile(rx))
    normal = origin_host(host)
    if normal is None or not host:
        raise bad(f"host {host!r} is not a host name or an IP address")
    return AllowedOrigin(scheme, normal, port)
