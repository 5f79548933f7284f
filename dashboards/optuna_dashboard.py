"""optuna-dashboard for a study's storage, bound to localhost.

The dashboard shows every study in the storage; the page of this study is
``http://HOST:PORT/dashboard/studies/<study id>``.
"""

from __future__ import annotations


def study_url(study, host: str, port: int) -> str:
    from sweep._compat.optuna import study_id

    return f"http://{host}:{port}/dashboard/studies/{study_id(study)}"


def serve(storage_url: str, *, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve optuna-dashboard on host:port until interrupted (blocks)."""
    try:
        from optuna_dashboard import run_server
    except ImportError:
        raise ImportError("``optuna-dashboard`` package not found; install it with "
                          "`pip install 'sweep[dashboard]'`") from None
    from sweep.record import open_storage

    run_server(open_storage(storage_url, create=False), host=host, port=port)
