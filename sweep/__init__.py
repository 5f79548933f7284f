"""sweep: hyperparameter search for QLoRA fine-tuning.

YAML search space -> Ray Tune ASHA -> QLoRA trials -> Optuna SQL study -> export.
Importing this package loads nothing heavy (no torch, transformers or ray).
"""

__version__ = "0.1.0"
