"""Private corners of Ray Train and TRL that the worker relies on, each named once here.

`trial_worker` never imports `sweep`, so these live apart from `sweep/_compat/`. Covered by
`tests/compat/test_compat.py` for the versions `pyproject.toml` allows (ray <2.61, trl <1.17).
"""

from __future__ import annotations

from typing import Any


def storage_checkpoint() -> dict:
    """{"path", "local"} of the checkpoint Tune is copying into the run's storage, from Ray Train's private
    session (`ray.train._internal.session.get_storage`): Tune numbers a checkpoint before the copy, and only
    the session knows which one a failed `tune.report` was writing. Raises outside a Tune session."""
    import pyarrow.fs
    from ray.train._internal.session import get_storage

    storage = get_storage()
    return {"path": storage.checkpoint_fs_path,
            "local": isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem)}


def set_logged_token_count(trainer: Any, tokens: int) -> None:
    """Make TRL's SFTTrainer log `num_tokens` as `tokens` (its private `_metrics["train"]` store, which its
    `log` averages and prints): the worker counts the tokens it really trained on, not the padded batch."""
    trainer._metrics["train"]["num_tokens"] = [int(tokens)]
