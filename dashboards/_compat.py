"""The one private corner of wandb-workspaces the dashboards rely on (covered by tests/compat/test_compat.py)."""

from __future__ import annotations

from typing import Any


def workspace_model(workspace: Any) -> Any:
    """The pydantic model W&B stores for a `wandb_workspaces.workspaces.Workspace` (its private `_to_model`,
    what its own `save` sends): the workspace as JSON without a network call."""
    return workspace._to_model()
