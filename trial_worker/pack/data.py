"""The pack's data: its tokenizer's pad id and the train and validation sequences (`pack.batch.Seq`).

On a GPU they are made in a Python process of their own, started before the pack imports torch: reading the
rows, rendering the chat template and tokenizing are Python work that a thread of the pack would do under
the GIL beside the imports, CUDA's start and the 4-bit load (H100, 2026-12-06, 24 trials: CUDA was up 9.7 s into
the engine's build, the tokenizer in that thread only 6.9 s later, the first step began 30.8 s in). The process writes its result, or
its error, to a file; the pack waits for it only once the base is loaded. The same function runs in a thread
on the CPU (no start-up to hide there, and two cores to share).
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from trial_worker.config import JobConfig
from trial_worker.marks import mark
from trial_worker.pack.batch import Seq, tokenize

Data = tuple[int, list[Seq], list[Seq]]  # (pad token id, train sequences, validation sequences)


def tokenized(job: JobConfig) -> Data:
    """The job's pad id and its train and validation sequences, each keeping a response token within
    max_seq_length."""
    from trial_worker.data import load_splits
    from trial_worker.model import load_tokenizer

    tokenizer = load_tokenizer(job.model)
    mark("engine: tokenizer")
    train_rows, val_rows = load_splits(job.data, tokenizer=tokenizer)
    L = job.data.max_seq_length
    train, val = tokenize(train_rows, tokenizer, L), tokenize(val_rows, tokenizer, L)
    for name, before, seqs in (("train", len(train_rows), train), ("validation", len(val_rows), val)):
        if not seqs:
            raise ValueError(f"none of the {before} {name} rows has a response token within max_seq_length={L}; "
                             "raise data.max_seq_length")
    mark(f"engine: data tokenized ({len(train)} train, {len(val)} validation rows)")
    return tokenizer.pad_token_id, train, val


def start(job: JobConfig, *, own_process: bool) -> Callable[[], Data]:
    """Start making the job's data (in a process of its own, or in a thread); returns the wait for it, which
    raises what making it raised."""
    if not own_process:
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pack-data")
        future = pool.submit(tokenized, job)
        pool.shutdown(wait=False)
        return future.result
    from trial_worker.attempt import temp_folder

    folder = Path(temp_folder("sweep-pack-data"))  # named for this process: removed by any sweep once it is gone
    (folder / "job.json").write_text(job.model_dump_json())
    # The child finds this package where the parent found it (an editable install, PYTHONPATH, a Ray worker's path).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p and os.path.isdir(p)))
    with open(folder / "stderr.txt", "wb") as err:  # a file, not a pipe: progress bars cannot fill it and stall
        proc = subprocess.Popen([sys.executable, "-m", "trial_worker.pack.data", str(folder), str(os.getpid())], env=env,
                                stdout=subprocess.DEVNULL, stderr=err)

    def wait() -> Data:
        try:
            proc.wait()
            result = folder / "result.pkl"
            if not result.exists():
                said = (folder / "stderr.txt").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the pack's data process exited {proc.returncode} without a result: {said}")
            try:
                with open(result, "rb") as f:
                    kind, value = pickle.load(f)
            except Exception as e:  # noqa: BLE001 - e.g. an error type that does not unpickle
                raise RuntimeError(f"the pack's data process left a result that does not load: {e}") from e
            if kind == "error":
                raise value
            return value
        finally:
            if proc.poll() is None:
                proc.kill()
            shutil.rmtree(folder, ignore_errors=True)

    return wait


def _exit_with(parent: int) -> None:
    """End this process once `parent` (the pack; its pid as the pack gave it, since this process may start after
    the pack is already gone) is gone: a killed pack leaves no data process behind."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _main(folder: str, parent: int) -> None:
    _exit_with(parent)
    out = Path(folder)
    job = JobConfig.model_validate_json((out / "job.json").read_text())
    try:
        value: object = ("ok", tokenized(job))
    except Exception as e:  # noqa: BLE001 - handed to the pack, raised there as it was raised here
        try:
            pickle.dumps(e)
            value = ("error", e)
        except Exception:  # noqa: BLE001 - an error that does not pickle: its type and message
            value = ("error", RuntimeError(f"{type(e).__name__}: {e}"))
    tmp = out / "result.tmp"
    with open(tmp, "wb") as f:
        pickle.dump(value, f, protocol=pickle.HIGHEST_PROTOCOL)
    tmp.rename(out / "result.pkl")  # whole or absent
    sys.stderr.flush()
    os._exit(0)  # the pack waits for this exit: no interpreter teardown of torch and transformers first


if __name__ == "__main__":
    _main(sys.argv[1], int(sys.argv[2]))
