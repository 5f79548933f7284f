"""`sweep chat RUN` on a tuned SmolLM2-135M, driven in headless Chromium like a person would.

A short CPU fine-tune on the date task (12 steps), then `sweep chat` as its own process; the
browser opens the page, finds the run's system prompt already in place, sets the temperature
to 0, types a held-out question and waits for the streamed reply to end. The reply is the
right ISO date, and exactly what `generate` answers to the same chat outside the browser.

Needs Debian's `chromium` and `chromium-driver`, `selenium`, `gradio` and the real model's
wheel; skips, saying which, without them. 78 s on 2 shared cores (2026-11-30), the model's
session fixture and the fine-tune most of it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from chromium import CHROMIUM

from trial_worker.config import JobConfig

CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's headless browser and its driver: apt-get install chromium chromium-driver",
)
pytest.importorskip("selenium", reason="pip install selenium (in .[dev])")
pytest.importorskip("gradio", reason="pip install gradio (in .[chat])")
PAGE_TIMEOUT_S = 120  # a busy 2-core machine: the server loads torch, the model and Gradio


@pytest.fixture(scope="module")
def tuned_run(smollm2_model, date_data, tmp_path_factory) -> Path:
    """A `sweep train` output folder: LoRA on SmolLM2 taught the date task in 12 steps.

    Measured on 2 cores: greedy answers are ISO dates, right for 19 of 20 fresh questions under the
    system prompt (the held-out question asked below among them).
    """
    from trial_worker import production

    job = JobConfig.model_validate({
        "name": "chatrun",
        "model": {"name_or_path": smollm2_model, "quantization": {"load_in_4bit": False, "bnb_4bit_compute_dtype": "float32"},
                  "lora": {"r": 8, "alpha": 16}},
        "data": {"path": date_data, "validation_split": "validation", "max_eval_samples": 4, "max_seq_length": 96},
        "training": {"learning_rate": 2e-3, "lr_scheduler_type": "constant", "per_device_train_batch_size": 4,
                     "per_device_eval_batch_size": 4, "gradient_checkpointing": False, "use_cpu": True,
                     "torch_threads": 2, "logging_steps": 4},
        "budget": {"min": 12, "max": 12},
    })
    out = tmp_path_factory.mktemp("chat") / "run"
    production.train(job, out, log=lambda _: None)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def chat_server(tuned_run, tmp_path):
    """`sweep chat RUN` as a user starts it, on a free port; its URL once the page answers."""
    port = _free_port()
    log = open(tmp_path / "chat.log", "w")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sweep.cli", "chat", str(tuned_run), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + PAGE_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"sweep chat exited {proc.returncode}:\n{(tmp_path / 'chat.log').read_text()[-3000:]}"
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, f"no page at {url} after {PAGE_TIMEOUT_S} s"
                time.sleep(1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):  # no network here: nothing but the page
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


def test_the_tuned_model_answers_a_task_question_in_the_browser(tuned_run, chat_server, browser, date_data):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from trial_worker.production.chat import load_chat_model
    from trial_worker.inputs.demo import DATE_SYSTEM_PROMPT
    from trial_worker.production.compare import generate

    held_out = json.loads((Path(date_data) / "validation.jsonl").read_text().splitlines()[0])["messages"]
    system, question, answer = (m["content"] for m in held_out[:3])
    assert system == DATE_SYSTEM_PROMPT and len(held_out) == 3  # one round: the question and its ISO date

    browser.get(chat_server)
    wait = WebDriverWait(browser, PAGE_TIMEOUT_S, poll_frequency=0.2)
    wait.until(lambda d: d.find_elements(By.XPATH, "//button[contains(., 'Additional inputs')]"))[0].click()
    # The controls under "Additional inputs": the system prompt the run was trained with is already there.
    system_box = wait.until(lambda d: d.find_element(By.XPATH, "//label[contains(., 'system prompt')]//textarea"))
    assert system_box.get_attribute("value") == DATE_SYSTEM_PROMPT
    temperature = browser.find_element(By.CSS_SELECTOR, "input[aria-label='number input for temperature']")
    temperature.send_keys(Keys.CONTROL, "a")
    temperature.send_keys("0", Keys.TAB)
    slider = browser.find_element(By.CSS_SELECTOR, "input[aria-label='range slider for temperature']")
    wait.until(lambda d: float(slider.get_attribute("value")) == 0.0)  # the page took it: greedy replies

    message = browser.find_element(By.XPATH, "//button[@data-testid='submit-button']/ancestor::*[.//textarea][1]//textarea")
    message.send_keys(question, Keys.ENTER)
    # Streaming: a stop button shows until the last token; then the reply is whole.
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "[data-testid='bot']")
               and not d.find_elements(By.CSS_SELECTOR, "[data-testid='stop-button']"))
    replies = browser.find_elements(By.CSS_SELECTOR, "[data-testid='bot']")
    user_turns = browser.find_elements(By.CSS_SELECTOR, "[data-testid='user']")
    assert [u.text for u in user_turns] == [question] and len(replies) == 1
    reply = replies[0].text.strip()

    # The right answer, and the model's own greedy answer outside the browser, token for token.
    assert reply == answer, f"{question!r}: the page answered {reply!r}, the task's answer is {answer!r}"
    model, tok = load_chat_model(tuned_run)
    assert generate(model, tok, [{"role": "system", "content": system}, {"role": "user", "content": question}],
                    max_new_tokens=256) == reply
