"""X-Forwarded-* headers, applied only when the peer is a proxy we trust.

A client that talks to us directly could send any X-Forwarded-For it likes;
only a peer in --forwarded-allow-ips (by default the loopback addresses, where
a local proxy runs) may tell us who the client is, in these headers or in a
PROXY protocol header (pyworker.proxy_protocol).
"""

from __future__ import annotations

import ipaddress

from cydispatch.settings import Settings, parse_networks

# X-Forwarded-Proto -> the request's scheme.  Traefik says ws or wss on a
# WebSocket upgrade; its scope says ws or wss from http or https.
SCHEMES = {"http": "http", "https": "https", "ws": "http", "wss": "https"}


class ProxyTrust:
    """Which peers are trusted proxies, and what their headers say."""

    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.proxy_headers
        self.networks = parse_networks(settings.forwarded_allow_ips)  # None: all
        self.known: dict[str, bool] = {}
        if self.enabled:
            # Called once per connection: bound here rather than checking
            # `enabled` in a call more each time.
            self.trusts = self.allows

    def trusts(self, host: str | None) -> bool:
        """Whether `host`'s X-Forwarded-* headers are applied (see __init__)."""
        return False

    def allows(self, host: str | None) -> bool:
        """Whether `host` is in --forwarded-allow-ips (its PROXY header is accepted)."""
        if host is None:
            return False
        if self.networks is None:
            return True
        trusted = self.known.get(host)
        if trusted is None:
            try:
                address = ipaddress.ip_address(host.partition("%")[0])
            except ValueError:
                trusted = False     # a Unix socket path, say
            else:
                trusted = any(address in network for network in self.networks)
            if len(self.known) < 4096:
                self.known[host] = trusted
        return trusted

    def client_from(self, forwarded_for: bytes) -> str | None:
        """The client in an X-Forwarded-For list: the nearest hop we do not trust.

        Each proxy appends the address it saw, so the list reads client,
        proxy1, proxy2...; entries left of an untrusted one may be forged.
        """
        hops = [hop.strip() for hop in forwarded_for.decode("latin-1").split(",")]
        hops = [hop for hop in hops if hop]
        if not hops:
            return None
        for hop in reversed(hops):
            if not self.trusts(hop):
                return hop
        return hops[0]

    def apply(self, headers: list[tuple[bytes, bytes]], client, scheme: str):
        """(client, scheme, host header or None) after a trusted proxy's headers.

        Only the last value of each header counts: that is the one the proxy
        next to us wrote.
        """
        forwarded_for = proto = host = None
        for name, value in headers:
            if name == b"x-forwarded-for":
                forwarded_for = value if forwarded_for is None else forwarded_for + b"," + value
            elif name == b"x-forwarded-proto":
                proto = value
            elif name == b"x-forwarded-host":
                host = value
        if forwarded_for is not None:
            address = self.client_from(forwarded_for)
            if address is not None:
                client = (address, 0)
        if proto is not None:
            value = proto.decode("latin-1").rpartition(",")[2].strip().lower()
            if value in SCHEMES:
                scheme = SCHEMES[value]
        if host is not None:
            host = host.rpartition(b",")[2].strip() or None
        return client, scheme, host
