"""optuna-dashboard for a study's storage, bound to localhost.

The dashboard shows every study in the storage; the page of this study is
``http://HOST:PORT/dashboard/studies/<study id>``.
"""

from __future__ import annotations


def study_url(study_id: int, host: str, port: int) -> str:
    return f"http://{host}:{port}/dashboard/studies/{study_id}"


def serve(storage, *, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve optuna-dashboard for `storage` (an Optuna storage, opened by the caller) on host:port until
    interrupted (blocks). Nothing here imports `sweep`: the CLI opens the study and its storage."""
    try:
        from optuna_dashboard import run_server
    except ImportError:
        raise ImportError("``optuna-dashboard`` package not found; install it with "
                          "`pip install 'sweep[dashboard]'`") from None
    run_server(storage, host=host, port=port)
