"""One controller per study (#20 item 2), the lease itself on SQLite and PostgreSQL alike, with no Ray: a lease held
by a live process (another one, started here) is refused naming pid, host and since when; once that process is
killed (`kill -9`, its lease never released) the next controller takes over at once; a lease of another host is
free only once it was not renewed for `LEASE_TTL_S`; two controllers racing for a free lease: exactly one wins."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from sweep.record import LEASE_TTL_S, ControllerLease, StudyHeld, open_storage

HOLD = ("import sys, time\n"
        "from sweep.record import ControllerLease, open_storage\n"
        "ControllerLease(open_storage(sys.argv[1]), 'leased').acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(120)\n")


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request, tmp_path, monkeypatch):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'lease.db'}"
    srv = request.getfixturevalue("pg_server")
    db = f"lease_{os.getpid()}_{int(time.time() * 1000) % 10**8}"
    srv.create_database(db)
    monkeypatch.setenv("PGPASSWORD", srv.password)
    return f"postgresql+psycopg://{srv.user}@127.0.0.1:{srv.port}/{db}"


def test_one_controller_per_study(storage_url, fault_row):
    t0 = time.perf_counter()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, storage_url], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=os.getcwd()))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StudyHeld, match=rf"study 'leased' is held by another controller: pid {holder.pid} on host "
                                            r"\S+, since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC"):
            ControllerLease(open_storage(storage_url), "leased").acquire()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    lease = ControllerLease(open_storage(storage_url), "leased").acquire()  # its holder is gone: taken over at once
    assert lease.taken_over["pid"] == holder.pid
    lease.release()
    assert lease.holder() is None

    # A lease of another host: held while renewed, free once LEASE_TTL_S passed without renewal.
    other = ControllerLease(open_storage(storage_url), "leased")
    other.host, other.pid = "elsewhere", 1
    other.acquire()
    with pytest.raises(StudyHeld, match="pid 1 on host elsewhere"):
        ControllerLease(open_storage(storage_url), "leased").acquire()
    with other.engine.begin() as c:
        c.execute(other._table.update().values(renewed=time.time() - LEASE_TTL_S - 1))
    other._stop.set()
    taken = ControllerLease(open_storage(storage_url), "leased").acquire()
    assert taken.taken_over["host"] == "elsewhere"
    taken.release()

    # Two controllers racing for a free lease: one wins, the other is told who holds it.
    results: list = []

    def race():
        try:
            results.append(ControllerLease(open_storage(storage_url), "raced").acquire())
        except StudyHeld as e:
            results.append(e)

    threads = [threading.Thread(target=race) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    won = [r for r in results if isinstance(r, ControllerLease)]
    assert len(results) == 2 and len(won) == 1, results
    won[0].release()
    fault_row(fault=f"a second controller on one study ({storage_url.split(':')[0].split('+')[0]})",
              injected="a live holder process, then `kill -9` of it; a holder on another host, renewed then stale; two "
                       "controllers racing",
              lost="refused while held (pid, host, since); taken over at once after the kill and after the TTL; one winner",
              seconds=time.perf_counter() - t0)
