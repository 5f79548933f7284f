"""evaluation.md shows each prompt whole: every turn of a multi-turn conversation, system prompt included."""

from __future__ import annotations

from trial_worker.config import JobConfig
from trial_worker.production.compare import conversation_text, plot_loss_curves, render_markdown

CHAT = [
    {"role": "system", "content": "Reply with the date only."},
    {"role": "user", "content": "What is May 1 1989 in ISO format?"},
    {"role": "assistant", "content": "1989-05-01"},
    {"role": "user", "content": "ISO date for July 31, 2043 | please"},
]


def test_a_multi_turn_prompt_is_shown_whole(tmp_path):
    job = JobConfig.model_validate({"name": "page", "model": {"name_or_path": "m"}, "data": {"path": "d"},
                                    "budget": {"min": 1, "max": 2}})
    scores = {"val_loss": 0.5, "ppl": 1.6, "exact": 0.0, "f1": 0.0}
    row = {"id": 0, "prompt": conversation_text(CHAT), "reference": "2043-07-31", "base": "2043-05-01",
           "tuned": "2043-07-31", "base_exact": 0.0, "tuned_exact": 1.0, "base_f1": 0.0, "tuned_f1": 1.0}
    (tmp_path / "loss.csv").write_text("steps,epoch,loss,scheduled_lr,grad_norm\n10,0.1,0.4,0.001,1\n20,0.2,0.1,0.001,1\n")
    plot = plot_loss_curves(tmp_path / "loss.csv", 0.5, 0.01, tmp_path / "loss_curves.png")
    md = render_markdown(job, "adapter", {"base": scores, "tuned": scores, "tokens": 9, "prompts": 1, "rows": [row],
                                          "plot": plot})
    line = next(ln for ln in md.splitlines() if ln.startswith("| 0 |"))
    prompt_cell = line.split(" | ")[1]
    # Every turn, in order, one per line of the cell; a pipe in the text does not break the table.
    assert prompt_cell == ("system: Reply with the date only.<br>user: What is May 1 1989 in ISO format?<br>"
                           "assistant: 1989-05-01<br>user: ISO date for July 31, 2043 \\| please")
    assert "![training loss and held-out loss, base vs tuned](loss_curves.png)" in md
    assert plot.stat().st_size > 1000
