"""`sweep chat`: the streaming reply function on a merged model, and the Gradio page on 127.0.0.1."""

from __future__ import annotations

import socket


import urllib.request

import pytest

from trial_worker import production
from trial_worker.production.chat import build_app, load_chat_model, respond


@pytest.fixture(scope="module")
def run_dir(make_job, tmp_path_factory):
    out = tmp_path_factory.mktemp("chatrun")
    production.train(make_job(budget={"min": 2, "max": 2}), out, merge=True)
    return out


def test_reply_streams_growing_text(run_dir):
    model, tok = load_chat_model(run_dir)  # picks run_dir/merged
    history = [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "2"}]
    parts = list(respond(model, tok, "What is 2 + 3?", history, temperature=0.0, max_new_tokens=6))
    assert parts and all(isinstance(p, str) for p in parts)
    assert all(parts[i + 1].startswith(parts[i]) for i in range(len(parts) - 1))  # each chunk extends the last
    again = list(respond(model, tok, "What is 2 + 3?", history, temperature=0.0, max_new_tokens=6))
    assert again[-1] == parts[-1]  # temperature 0: greedy, repeatable


def test_page_is_served_on_localhost(run_dir):
    pytest.importorskip("gradio")
    model, tok = load_chat_model(run_dir / "merged")
    app = build_app(model, tok)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        html = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).read().decode()
        assert "gradio" in html.lower()
        from chromium import CHROMIUM, dump

        if CHROMIUM:  # the page really renders its chat and controls, with no script errors
            page = dump(f"http://127.0.0.1:{port}/", run_dir / "chromium-profile")
            assert page.returncode == 0, page.stderr[-2000:]
            for label in ("Temperature", "Max new tokens"):
                assert label.lower() in page.stdout.lower(), f"{label} control not rendered"
            assert "Uncaught" not in page.stderr, page.stderr[-3000:]
    finally:
        app.close()
