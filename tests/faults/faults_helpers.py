"""The fault suite uses the shared CLI helpers (tests/sweep_helpers.py)."""

from sweep_helpers import ROOT, small_spec, sweep_cli, sweep_env  # noqa: F401
