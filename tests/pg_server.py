"""A throwaway PostgreSQL server for tests: initdb + pg_ctl as the `postgres` user, on a free port.

initdb refuses to run as root, so when the tests run as root the server is run as
`postgres` (via `runuser`/`su`); as any other user it runs as that user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def available() -> bool:
    return shutil.which("initdb") is not None and shutil.which("pg_ctl") is not None


@dataclass
class PgServer:
    port: int
    datadir: Path
    user: str
    password: str
    _as_user: str | None

    @property
    def url_no_password(self) -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/postgres"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{self.user}:{self.password}@127.0.0.1:{self.port}/postgres"

    def _run(self, *cmd: str, check=True) -> subprocess.CompletedProcess:
        return _as(self._as_user, list(cmd), check=check)

    def restart(self) -> None:
        self._run("pg_ctl", "-D", str(self.datadir), "-m", "fast", "-w", "restart", "-l", str(self.datadir / "log"))

    def stop(self, mode: str = "immediate") -> None:
        """Stop it; "immediate" is a crash and, with `synchronous_commit = off` (set above, for speed), may lose the last
        commits: a test of what a sweep keeps across an outage stops it with mode="fast" (every commit flushed)."""
        self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "stop", check=False)

    def start(self) -> None:
        """Start it again after `stop()`, on the same port and data."""
        self._run("pg_ctl", "-D", str(self.datadir), "-w", "-t", "60", "start", "-l", str(self.datadir / "log"))

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, password=self.password,
                             dbname="postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://{self.user}:{self.password}@127.0.0.1:{self.port}/{name}"


def _as(user: str | None, cmd: list[str], check=True) -> subprocess.CompletedProcess:
    if user:
        cmd = ["runuser", "-u", user, "--", *cmd] if shutil.which("runuser") else ["su", user, "-c", " ".join(cmd)]
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def start(password: str = "s3cret-test-pw") -> PgServer:
    """Start a server on a free port in a temporary folder; the caller stops it."""
    as_user = "postgres" if os.geteuid() == 0 else None
    tmp = Path(tempfile.mkdtemp(prefix="sweep-pg-"))
    datadir = tmp / "data"
    pwfile = tmp / "pw"
    pwfile.write_text(password + "\n")
    if as_user:
        pw = pwd.getpwnam(as_user)
        os.chown(tmp, pw.pw_uid, pw.pw_gid)
        os.chown(pwfile, pw.pw_uid, pw.pw_gid)
    user = "sweep"
    _as(as_user, ["initdb", "-D", str(datadir), "-U", user, "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8"])
    port = _free_port()
    with open(datadir / "postgresql.conf", "a") as f:
        f.write(f"\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{tmp}'\n"
                "fsync = off\nsynchronous_commit = off\nmax_connections = 200\n")
    srv = PgServer(port, datadir, user, password, as_user)
    srv._run("pg_ctl", "-D", str(datadir), "-w", "-t", "60", "start", "-l", str(datadir / "log"))
    deadline = time.time() + 30
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return srv
        time.sleep(0.2)
    raise RuntimeError("postgres did not start: " + (datadir / "log").read_text()[-2000:])


def cleanup(srv: PgServer) -> None:
    srv.stop()
    shutil.rmtree(srv.datadir.parent, ignore_errors=True)
