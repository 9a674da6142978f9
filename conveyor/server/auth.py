"""API keys and callers: which tenant a gRPC call acts for, and with which role.

A key is `cvk_` followed by 43 URL-safe characters (32 random bytes). Only its
SHA-256 is stored (`api_keys.key_hash`), so a key is shown once, when it is
created, and a database leak does not leak keys; the lookup is by hash, so no
constant-time comparison is needed. Keys map to a tenant and a role:

- `member`: the tenant's own jobs and statistics.
- `admin`: a tenant's administrator. On the API it has a member's rights; it reads
  no other tenant's data (its statistics leave out the shared queues).
- `operator`: runs the installation. It belongs to the tenant it was created for
  (`conveyor keys create --role operator`, tenant `operators` unless told) and its
  job calls act for that tenant alone, like a member's: it cannot read, cancel or
  watch another tenant's jobs. Its one extra right is GetStats of any tenant or of
  all of them, with the depths of the shared lane queues and the dead-letter queue.

Every gRPC server built by `conveyor.server.runtime.grpc_server` authenticates calls
through `authenticate`: the `authorization: Bearer <key>` metadata is resolved
before the handler runs, and the handler reads the result with
`principal(context)` or `tenant_of(context)`. A call without a key acts as
`CONVEYOR_ANONYMOUS_TENANT` when that is set (the local stack), and is
UNAUTHENTICATED otherwise; an unknown or revoked key is always UNAUTHENTICATED.
Health checking and server reflection stay open, so probes and grpcurl's
discovery work without a key.

Answers are cached (CONVEYOR_AUTH_CACHE_S) in two bounded LRU caches, one for
valid keys and one for refused ones, so a flood of wrong keys costs bounded
memory and cannot push the valid keys out. A key that is not even shaped like
one is refused without a query, and looking a key up writes nothing: only a
valid key's `last_used_at` is stamped, at most once a minute.
"""

from __future__ import annotations

import contextvars
import hashlib
import re
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.core.errors import Unauthenticated
from conveyor.db import tenants as db
from conveyor.db.engine import once_more_on_disconnect

KEY_PREFIX = "cvk_"
PREFIX_CHARS = 12
"""Characters of a key kept in clear (`cvk_` and 8 more), to recognise it in listings."""
KEY_SHAPE = re.compile(r"cvk_[A-Za-z0-9_-]{43}")
"""What `generate_key` makes; anything else is refused without a lookup."""
ROLES = ("member", "admin", "operator")
OPERATOR_TENANT = "operators"
"""The tenant of an operator key created without --tenant."""
ANONYMOUS = "anonymous"
"""The key name of calls without a key when an anonymous tenant is configured."""
TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
"""Tenant names: they appear in queue names and routing keys, so no dots or spaces."""
OPEN_METHODS = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
"""Services callable without a key."""
MAX_CACHED = 10_000
"""Default size of each of the two key caches (CONVEYOR_AUTH_CACHE_SIZE)."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant the call acts for, the key's name and role."""

    tenant: str
    role: str = "member"
    key_name: str = ANONYMOUS
    key_id: uuid.UUID | None = None

    @property
    def admin(self) -> bool:
        """A tenant's administrator (no rights over other tenants)."""
        return self.role == "admin"

    @property
    def operator(self) -> bool:
        """May read every tenant's statistics and the shared queues' depths."""
        return self.role == "operator"

    @property
    def actor(self) -> str:
        """How the job history names this caller: `<tenant>/<key name>`."""
        return f"{self.tenant}/{self.key_name}"


def generate_key() -> str:
    """A new random API key."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The stored form of a key: hex SHA-256."""
    return hashlib.sha256(key.encode()).hexdigest()


def check_tenant_name(name: str) -> str:
    """`name` if it is a valid tenant name, else ValueError."""
    if not TENANT_NAME.match(name):
        raise ValueError(
            f"invalid tenant name {name!r}: 1-63 characters, lower-case letters, digits,"
            " '-' and '_', starting with a letter or digit"
        )
    return name


_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "conveyor_principal", default=None
)


def principal(context: grpc.aio.ServicerContext | None = None) -> Principal:
    """The caller of the current gRPC call, as resolved by `authenticate`.

    `context` is the handler's context; the principal itself travels in a
    context variable of the call's task. Raises Unauthenticated if the call was
    not authenticated (the server lacks the interceptor).
    """
    who = _current.get()
    if who is None:
        raise Unauthenticated("the call is not authenticated")
    return who


def tenant_of(context: grpc.aio.ServicerContext | None = None) -> str:
    """The tenant the current gRPC call acts for (see `principal`)."""
    return principal(context).tenant


def bearer_key(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The key of an `authorization: Bearer <key>` entry; None if there is no such entry.

    Raises Unauthenticated if the entry is there but is not a bearer token.
    """
    for name, value in metadata or ():
        if name.lower() != "authorization":
            continue
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("the authorization metadata must be `Bearer <api key>`")
        return token
    return None


class _LRU:
    """A dict of at most `size` entries that drops the least recently used one."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[str, tuple[float, Principal | None]] = OrderedDict()

    def get(self, key: str, now: float) -> tuple[bool, Principal | None]:
        """(found and fresh, value)."""
        item = self._items.get(key)
        if item is None:
            return False, None
        if item[0] <= now:
            del self._items[key]
            return False, None
        self._items.move_to_end(key)
        return True, item[1]

    def put(self, key: str, until: float, value: Principal | None) -> None:
        self._items[key] = (until, value)
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class Authenticator:
    """Resolves API keys to principals, remembering answers for `cache_s` seconds.

    Refusals are remembered too (in a cache of their own), so a client retrying a
    wrong key does not cost a query per call. A revoked key stops working within
    `cache_s`.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        anonymous_tenant: str | None = None,
        cache_s: float = 10.0,
        cache_size: int = MAX_CACHED,
    ) -> None:
        self.engine = engine
        self.anonymous = (
            Principal(tenant=anonymous_tenant) if anonymous_tenant is not None else None
        )
        self.cache_s = cache_s
        self.valid = _LRU(cache_size)
        self.refused = _LRU(cache_size)

    async def resolve(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> Principal:
        """The caller of a call with this metadata; Unauthenticated if there is none."""
        key = bearer_key(metadata)
        if key is None:
            if self.anonymous is not None:
                return self.anonymous
            raise Unauthenticated(
                "missing API key: send the metadata `authorization: Bearer <key>`"
            )
        if not KEY_SHAPE.fullmatch(key):
            raise Unauthenticated("invalid or revoked API key")
        digest = hash_key(key)
        now = time.monotonic()
        found, who = self.valid.get(digest, now)
        if not found:
            found, who = self.refused.get(digest, now)
        if not found:
            owner = await once_more_on_disconnect(lambda: db.resolve_key(self.engine, digest))
            if owner is None:
                self.refused.put(digest, now + self.cache_s, None)
            else:
                who = Principal(
                    tenant=owner.tenant, role=owner.role, key_name=owner.name, key_id=owner.key_id
                )
                self.valid.put(digest, now + self.cache_s, who)
        if who is None:
            raise Unauthenticated("invalid or revoked API key")
        return who


async def authenticate(authenticator: Authenticator, context: grpc.aio.ServicerContext) -> None:
    """Resolve the caller of the current call and make it `principal()`; a refused
    call ends UNAUTHENTICATED (UNAVAILABLE when the key store cannot be reached)."""
    try:
        who = await authenticator.resolve(context.invocation_metadata())
    except Unauthenticated as exc:
        await context.abort_with_status(exc.to_status())
    except Exception as exc:  # the key store is unreachable: worth retrying
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            f"cannot check the API key now: {type(exc).__name__}",
        )
    # Each call runs in a task of its own, so the variable is this call's alone.
    _current.set(who)
