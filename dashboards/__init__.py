"""Dashboards for a study: optuna-dashboard launcher and W&B workspace definitions (see issue #4)."""
