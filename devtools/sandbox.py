"""An isolated Conveyor for tests and the benchmark: its own RabbitMQ vhost and
Postgres database, and the simulator plus the four services and the HTTP API as
real processes on free ports, so it never disturbs `make up` or another run.

RabbitMQ and Postgres come from testcontainers when a Docker engine answers,
otherwise from the servers already running on this machine. Either way each run
gets its own vhost and database, removed afterwards.

    with backing_services("conveyor-bench") as backing:
        stack = Stack(backing, run_dir, env={"CONVEYOR_WORKER_CONCURRENCY": "1000"})
        try:
            stack.start_all()
            ...
        finally:
            stack.stop_all()

`tests/stack.py` builds the test suite's stack from these pieces.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import asyncpg

from conveyor.core.config import Settings
from conveyor.db.engine import migrate
from devtools import devstack

LOCAL_AMQP = "amqp://guest:guest@127.0.0.1:5672/"
LOCAL_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
START_TIMEOUT_S = 60.0


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    (port,) = free_ports(1)
    return port


def free_ports(n: int) -> list[int]:
    """`n` different TCP ports of 127.0.0.1 that nothing listens on right now.

    Each is held until all are found: a port asked for after another is released can
    be the same one again (it happened to a test stack's gateway and simulator).
    """
    with contextlib.ExitStack() as held:
        ports = []
        for _ in range(n):
            s = held.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            ports.append(int(s.getsockname()[1]))
        return ports


def docker_engine_available() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@dataclass
class Backing:
    """Where this run's RabbitMQ vhost and Postgres database are."""

    amqp_url: str
    database_url: str
    cleanup: list[object] = field(default_factory=list)
    vhost: str = ""
    database: str = ""
    admin_url: str = LOCAL_PG
    """A URL of the server's `postgres` database (to create or drop databases)."""
    local: bool = True
    """True on this machine's servers (rabbitmqctl works), False on containers."""


def rabbitmqctl(*args: str, container: object | None = None) -> str:
    """Run rabbitmqctl (in the container if one is given); its output, or RuntimeError."""
    if container is not None:
        code, out = container.exec(["rabbitmqctl", *args])  # type: ignore[attr-defined]
        if code != 0:
            raise RuntimeError(out)
        return str(out.decode() if isinstance(out, bytes) else out)
    done = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip() or done.stdout.strip())
    return done.stdout


@contextlib.contextmanager
def backing_services(prefix: str = "conveyor-test") -> Iterator[Backing]:
    """A fresh vhost and database (named `<prefix>-<random>`), on containers or the local servers."""
    containers: list[object] = []
    amqp_base, pg_admin, rabbit = LOCAL_AMQP, LOCAL_PG, None
    if docker_engine_available():  # pragma: no cover - this machine has no Docker engine
        from testcontainers.postgres import PostgresContainer
        from testcontainers.rabbitmq import RabbitMqContainer

        rabbit = RabbitMqContainer("rabbitmq:3.13-management").start()
        pg = PostgresContainer("postgres:16", driver=None).start()
        containers += [rabbit, pg]
        amqp_base = (
            f"amqp://guest:guest@{rabbit.get_container_host_ip()}:{rabbit.get_exposed_port(5672)}/"
        )
        pg_admin = pg.get_connection_url()
    vhost = f"{prefix}-{uuid.uuid4().hex[:10]}"
    database = vhost.replace("-", "_")
    rabbitmqctl("add_vhost", vhost, container=rabbit)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*", container=rabbit)
        database_url = pg_admin.rsplit("/", 1)[0] + f"/{database}"
        asyncio.run(migrate(database_url))
        yield Backing(
            amqp_url=amqp_base + quote(vhost, safe=""),
            database_url=database_url,
            vhost=vhost,
            database=database,
            admin_url=pg_admin,
            local=rabbit is None,
        )
    finally:
        with contextlib.suppress(Exception):
            rabbitmqctl("delete_vhost", vhost, container=rabbit)
        with contextlib.suppress(Exception):
            asyncio.run(drop_database(pg_admin, database))
        for c in containers:
            with contextlib.suppress(Exception):
                c.stop()  # type: ignore[attr-defined]


async def drop_database(admin_url: str, name: str) -> None:
    """DROP DATABASE ... WITH (FORCE): the connections still open to it are ended."""
    conn = await asyncpg.connect(admin_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


SERVICES = ("gateway", "notifier", "worker", "dispatcher", "http")


class Stack:
    """The simulator, the four services and the HTTP API, started as processes of this run.

    `env` is set in this process's environment too (so `self.settings` and the
    children see the same configuration), on top of the backing's URLs and
    free ports for the gateway, the notifier and the simulator.
    """

    def __init__(
        self, backing: Backing, run_dir: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.backing = backing
        self.run = devstack.RunDir(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.env = {
            **(env or {}),
            "CONVEYOR_AMQP_URL": backing.amqp_url,
            "CONVEYOR_DATABASE_URL": backing.database_url,
            "CONVEYOR_RUN_DIR": str(run_dir),
        }
        listeners = ["GATEWAY", "NOTIFIER", "SIMULATOR", "HTTP"] + [
            f"{svc.upper()}_METRICS" for svc in SERVICES
        ]
        for listener, port in zip(listeners, free_ports(len(listeners)), strict=True):
            self.env[f"CONVEYOR_{listener}_PORT"] = str(port)
        for name, value in self.env.items():
            os.environ[name] = value
        for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "CONVEYOR_API_KEY"):
            os.environ.pop(name, None)
        self.settings = Settings()
        self.services = {s.name: s for s in devstack.stack(self.settings)}
        self.procs: dict[str, devstack.Started] = {}

    @property
    def gateway(self) -> str:
        return self.settings.gateway_target

    @property
    def notifier(self) -> str:
        return self.settings.notifier_target

    @property
    def http_url(self) -> str:
        """Base URL of the stack's HTTP/JSON API."""
        return f"http://{self.settings.http_target}"

    @property
    def simulator_url(self) -> str:
        return f"http://{self.settings.simulator_host}:{self.settings.simulator_port}"

    def pid(self, name: str) -> int | None:
        """The pid of a service this stack runs, or None."""
        started = self.procs.get(name)
        return started.proc.pid if started is not None else None

    def start(self, name: str, **env: str) -> None:
        """Start a service and wait until it is ready; `env` overrides its settings."""
        service = self.services[name]
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            if env:  # the overrides may change how it is checked (e.g. TLS)
                service = {s.name: s for s in devstack.stack(Settings())}.get(name, service)
            started = devstack.start(service, self.run, self.settings)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        self.procs[name] = started
        why = devstack.wait_ready(
            service, self.run, time.monotonic() + START_TIMEOUT_S, started, started.proc.pid
        )
        if why is not None:
            tail = devstack.log_tail(self.run.log_file(service), started.log_offset)
            raise RuntimeError(f"{name} did not start: {why}\n{tail}")

    def start_all(self) -> None:
        for name in self.services:
            self.start(name)

    def stop(self, name: str) -> str:
        """Graceful stop (SIGTERM, then SIGKILL after a timeout)."""
        started = self.procs.pop(name)
        outcome = devstack.stop_pid(started.proc.pid, started.proc)
        self.run.pid_file(started.service).unlink(missing_ok=True)
        return outcome

    def terminate(self, name: str) -> devstack.Started:
        """SIGTERM without waiting: the caller watches what the service does meanwhile."""
        started = self.procs.pop(name)
        started.proc.send_signal(signal.SIGTERM)
        return started

    def kill(self, name: str) -> None:
        """kill -9: no chance to clean up."""
        started = self.procs.pop(name)
        devstack.signal_group(started.proc.pid, signal.SIGKILL)
        started.proc.wait(timeout=10)

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            with contextlib.suppress(Exception):
                self.stop(name)

    def log(self, name: str) -> str:
        return self.run.log_file(self.services[name]).read_text(errors="replace")


# --------------------------------------------------------------------------- private servers
#
# A fault test that stops or restarts RabbitMQ or Postgres must not do it to the
# machine's servers (other runs use them). These start servers of their own, in a
# directory of their own, on free ports of 127.0.0.1; `stop` removes nothing else.


def _as_postgres_user() -> list[str]:
    """The command prefix that runs a Postgres tool as the `postgres` user when we are
    root (initdb and the server refuse to run as root)."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def postgres_bin() -> Path:
    """The newest installed PostgreSQL's bin directory (Debian layout)."""
    found = sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if p.parent.name.isdigit()),
        key=lambda p: int(p.parent.name),
    )
    if not found:
        raise RuntimeError("no PostgreSQL server installed under /usr/lib/postgresql")
    return found[-1]


class PrivatePostgres:
    """A PostgreSQL cluster of this run: initdb in `root`, trust auth, one free port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.log_path = root / "postgres.log"
        self.port = free_port()
        self.bin = postgres_bin()

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, timeout: float = 120) -> None:
        done = subprocess.run(
            [*_as_postgres_user(), *args], capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed: {done.stderr or done.stdout}")

    def _ctl(self, *args: str) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log_path),
            "-o", options, "-w", "-t", "60", *args,
        )  # fmt: skip

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                  "--auth=trust", "-N")  # fmt: skip

    def start(self) -> None:
        self._ctl("start")

    def stop(self, mode: str = "fast") -> None:
        """`mode` as pg_ctl's -m: fast (clean) or immediate (as a crash)."""
        self._ctl("-m", mode, "stop")

    def restart(self, mode: str = "immediate") -> None:
        self._ctl("-m", mode, "restart")

    def remove(self) -> None:
        """Stop the server (if it runs) and delete the cluster."""
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(Exception):
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def rabbitmq_bin() -> Path:
    """Where rabbitmq-server and rabbitmqctl are, unwrapped (Debian's /usr/sbin wrappers
    switch to the rabbitmq user and its home, hence its node's cookie)."""
    debian = Path("/usr/lib/rabbitmq/bin")
    if (debian / "rabbitmq-server").exists():
        return debian
    found = shutil.which("rabbitmq-server")
    if found is None:
        raise RuntimeError("rabbitmq-server is not installed")
    return Path(found).parent


class PrivateRabbit:
    """A RabbitMQ node of this run: its own name, ports, data, logs and Erlang cookie
    (so no other CLI reaches it by mistake), no plugins; `stop_app`/`start_app` and
    `stop` act on it alone."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.node = f"{name}@localhost"
        self.port, self.dist_port = free_ports(2)
        self.bin = rabbitmq_bin()
        self.env = {
            **os.environ,
            "HOME": str(root / "home"),  # the Erlang cookie of this node and its CLI
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(root / "log"),
            "RABBITMQ_PID_FILE": str(root / "rabbit.pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(root / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(root / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(root / "rabbitmq.conf"),
        }

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def pid_file(self) -> Path:
        return self.root / "rabbit.pid"

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """rabbitmqctl against this node; its output, or RuntimeError."""
        done = subprocess.run(
            [str(self.bin / "rabbitmqctl"), "-n", self.node, *args],
            capture_output=True, text=True, timeout=timeout, env=self.env, cwd=self.root,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip() or done.stdout.strip())
        return done.stdout

    def start(self, timeout: float = 120) -> None:
        """Start the node detached and wait until it serves AMQP."""
        home = self.root / "home"
        for sub in (home, self.root / "mnesia", self.root / "log"):
            sub.mkdir(parents=True, exist_ok=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text(uuid.uuid4().hex.upper())
        cookie.chmod(0o400)
        (self.root / "enabled_plugins").write_text("[].\n")
        (self.root / "rabbitmq-env.conf").write_text("")  # not the machine's node name
        (self.root / "rabbitmq.conf").write_text(f"listeners.tcp.default = 127.0.0.1:{self.port}\n")
        subprocess.run(
            [str(self.bin / "rabbitmq-server"), "-detached"],
            env=self.env, cwd=self.root, check=True, timeout=60,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:  # await_startup fails at once until the node has registered
            try:
                self.ctl("await_startup", "--timeout", "60", timeout=90)
                return
            except (RuntimeError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def stop_app(self) -> None:
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")

    def stop(self) -> None:
        """Halt the node (kill -9 if it does not), keep its files."""
        pid = self.pid()
        with contextlib.suppress(Exception):
            self.ctl("stop", timeout=60)
        if pid is not None and devstack.alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def private_backing(
    root: Path, name: str
) -> Iterator[tuple[Backing, PrivatePostgres, PrivateRabbit]]:
    """A RabbitMQ node and a Postgres cluster of this run under `root` (database
    `conveyor`, migrated), removed on leaving, however it is left."""
    pg = PrivatePostgres(root / "postgres")
    rabbit = PrivateRabbit(root / "rabbitmq", name)
    try:
        pg.init()
        pg.start()
        asyncio.run(_create_database(pg.admin_url, "conveyor"))
        asyncio.run(migrate(pg.url("conveyor")))
        rabbit.start()
        backing = Backing(
            amqp_url=rabbit.amqp_url,
            database_url=pg.url("conveyor"),
            vhost="/",
            database="conveyor",
            admin_url=pg.admin_url,
            local=False,
        )
        yield backing, pg, rabbit
    finally:
        rabbit.remove()
        pg.remove()
        shutil.rmtree(root, ignore_errors=True)


async def _create_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
