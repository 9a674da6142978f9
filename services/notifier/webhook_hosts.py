"""Where a webhook may connect, and how a receiving host is counted.

A host's name is resolved by `GuardedResolver`, which refuses addresses that are not
public (conveyor.server.webhooks.address_refusal) on the very addresses connected to.
The per-host cap counts a host by the address it resolves to (`HostKeys`), so that
many names of one machine (wildcard subdomains, `127.1` and `localhost`, ...) share
one count.
"""

from __future__ import annotations

import ipaddress
import socket
import time

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from conveyor.server.webhooks import IPNetwork, WebhookRefused, address_refusal

HOST_KEY_CACHE_S = 10.0
"""How long the address a receiving host resolves to is kept (as aiohttp's DNS cache)."""
HOST_KEY_CACHE_MAX = 10_000


class GuardedResolver(AbstractResolver):
    """Resolves like aiohttp's default, and refuses addresses that are not public.

    The addresses checked are the ones connected to (no second lookup an attacker's
    DNS could answer differently). A name with any refused address is refused.
    """

    def __init__(self, allow_private: bool, allowed: list[IPNetwork]) -> None:
        self.inner = aiohttp.ThreadedResolver()
        self.allow_private = allow_private
        self.allowed = allowed

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self.inner.resolve(host, port, family)
        for result in results:
            why = address_refusal(result["host"], self.allow_private, self.allowed)
            if why is not None:
                raise WebhookRefused(f"{host} resolves to a refused address: {why}")
        return results

    async def close(self) -> None:
        await self.inner.close()


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def address_key(address: str) -> str:
    """An address as counted by the per-host cap: IPv4 mapped into IPv6 as IPv4, zone dropped."""
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(
            address.split("%", 1)[0]
        )
    except ValueError:
        return address.lower()
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


class HostKeys:
    """What the per-host cap counts each host as, cached for HOST_KEY_CACHE_S."""

    def __init__(self) -> None:
        self.resolver: AbstractResolver | None = None
        self.cache: dict[str, tuple[float, str]] = {}

    async def key(self, host: str) -> str:
        """The first address `host` resolves to (the one connected to first), or the name
        itself if it does not resolve (the attempt then fails on its own)."""
        if is_ip(host):
            return address_key(host)
        now = time.monotonic()
        cached = self.cache.get(host)
        if cached is not None and cached[0] > now:
            return cached[1]
        assert self.resolver is not None, "start() first"
        try:
            results = await self.resolver.resolve(host, 0, socket.AF_UNSPEC)
            key = address_key(results[0]["host"]) if results else host
        except OSError:
            key = host
        if len(self.cache) >= HOST_KEY_CACHE_MAX:
            self.cache.clear()
        self.cache[host] = (now + HOST_KEY_CACHE_S, key)
        return key
