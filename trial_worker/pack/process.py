"""The pack process the controller starts before Ray (`trial_worker.pack.early`, which says why and how it
ends): a `PackServer` built at once for the sweep's job, served on a Unix socket to the Ray actor that adopts it.

    python -m trial_worker.pack.process <folder>    # the folder `early.start` made: pack.json, key
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from trial_worker.pack.early import METHODS


def _main(folder: str) -> None:
    from multiprocessing.connection import Listener

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    out = Path(folder)
    spec = json.loads((out / "pack.json").read_text())
    key = (out / "key").read_text().encode()
    parent = int(spec["parent"])

    def watch() -> None:  # the controller gone: so is this pack
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, name="controller-watch", daemon=True).start()
    listener = Listener(str(out / "socket"), family="AF_UNIX", authkey=key)
    (out / "listening").touch()
    from trial_worker.pack.server import PackServer

    server = PackServer(spec["name"])
    server.prepare(spec["job"])  # the engine is built now, before any trial or actor asks for it
    adopted = threading.Lock()

    def serve(conn) -> None:
        lease = False
        try:
            while True:
                method, args, kwargs = conn.recv()
                if method == "adopt":
                    lease = adopted.acquire(blocking=False)
                    conn.send(("ok", None) if lease else ("error", RuntimeError("adopted by another actor already")))
                    if not lease:
                        return
                    continue
                if method not in METHODS:
                    conn.send(("error", ValueError(f"not a pack method: {method!r}")))
                    continue
                try:
                    value: tuple = ("ok", getattr(server, method)(*args, **kwargs))
                except Exception as e:  # noqa: BLE001 - raised in the actor as it was raised here
                    value = ("error", _picklable(e))
                conn.send(value)
        except (EOFError, OSError):
            if lease:  # the adopting actor is gone: so is this pack (Ray restarts the actor, empty)
                os._exit(1)
        finally:
            conn.close()

    while True:
        try:
            conn = listener.accept()
        except Exception:  # noqa: BLE001 - a client that failed the key's challenge, or went away meanwhile
            continue
        threading.Thread(target=serve, args=(conn,), name="pack-relay", daemon=True).start()


def _picklable(e: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 - its type and message
        return RuntimeError(f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    _main(sys.argv[1])
