"""Which running attempts' token deltas go on the bus: only those someone watches.

A notifier registers a watch of one attempt with its text-so-far request
(conveyor.bus.catchup; the request names the notifier) and releases it with an
unwatch message once it has had no watcher of that job for a while; the attempt's
end forgets it anyway. A notifier with a tenant-wide watch (WatchJobs by labels)
sends a lease for the tenant while that watch lasts: every attempt of the tenant
is published until the lease runs out.

An attempt's deltas on the bus never have a hole: when an attempt becomes watched,
every run of pieces not published yet goes out first (services.worker.runner), so
a notifier that saw the attempt's RUNNING event holds all of its published deltas.
"""

from __future__ import annotations

import time

from .inflight import InFlight


class Interest:
    """The tenants under a lease (per-attempt watchers live on each `InFlight`)."""

    def __init__(self) -> None:
        self.tenants: dict[str, float] = {}
        """tenant -> time.monotonic() until which its every attempt is published."""

    def watched(self, entry: InFlight) -> bool:
        """Whether the attempt's deltas go on the bus now."""
        if entry.watchers:
            return True
        if not self.tenants:
            return False
        until = self.tenants.get(entry.tenant)
        if until is None:
            return False
        if until > time.monotonic():
            return True
        del self.tenants[entry.tenant]
        return False

    def lease(self, tenant: str, lease_s: float) -> bool:
        """Publish every attempt of `tenant` for `lease_s` from now; True if it was not
        published until now (its attempts' unpublished deltas must go out)."""
        now = time.monotonic()
        was = self.tenants.get(tenant, 0.0) > now
        self.tenants[tenant] = max(self.tenants.get(tenant, 0.0), now + lease_s)
        return not was
