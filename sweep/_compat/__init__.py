"""The private corners of Ray and Optuna that `sweep` relies on, one module per library.

Each module names every private symbol once, says why it is needed, and is covered by
`tests/compat/test_compat.py` (fast, no cluster) for the versions `pyproject.toml` allows.
Nothing else in `sweep/` reaches into a library's private names. (`trial_worker/_compat.py`
does the same for the worker's side: Ray Train's session and TRL.)
"""
