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

from trial_worker.config import JobConfig, sweep_home
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
    mark("engine: rows read and tokenized")
    L = job.data.max_seq_length
    train, val = tokenize(train_rows, tokenizer, L), tokenize(val_rows, tokenizer, L)
    for name, before, seqs in (("train", len(train_rows), train), ("validation", len(val_rows), val)):
        if not seqs:
            raise ValueError(f"none of the {before} {name} rows has a response token within max_seq_length={L}; "
                             "raise data.max_seq_length")
    mark(f"engine: data tokenized ({len(train)} train, {len(val)} validation rows)")
    return tokenizer.pad_token_id, train, val


# The made data of local inputs is kept for the next sweep of the same tokenizer, data and data settings
# (`cache_file`): its pack starts without making it again (H100, 2026-12-07: the data process took 15 s beside a
# pack's start, the longest of what holds the first step back).
CACHE_OFF_ENV = "SWEEP_DATA_CACHE"  # "0": always made, never kept
CACHE_KEEP = 8  # datasets kept, the most recently used
CACHE_MAX_TOKENS = 64_000_000  # a larger dataset is made each time (its pickle would be ~0.5 GB and more)
WHOLE_FILE_BYTES = 64 << 20  # files up to this size are keyed by their bytes; larger ones by size and mtime
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".onnx")
# what makes the data: the key changes with any of them
SOURCES = ("trial_worker/pack/data.py", "trial_worker/pack/batch.py", "trial_worker/data.py", "trial_worker/model.py",
           "trial_worker/formats.py")


def cache_file(job: JobConfig) -> Path | None:
    """Where the job's made data is kept: a file named by what it is made of (the tokenizer's files, the data
    files, the data settings, the libraries' versions and this code). None where the model or the data is not
    a local path, or `SWEEP_DATA_CACHE=0`. Imports nothing heavy."""
    import hashlib
    from importlib import metadata

    if os.environ.get(CACHE_OFF_ENV, "1") == "0":
        return None
    model, data = Path(job.model.name_or_path), Path(job.data.path)
    if not model.is_dir() or not data.exists():
        return None
    h = hashlib.sha256()

    def add(f: Path, name: str) -> None:
        st = f.stat()
        h.update(f"{name}\0{st.st_size}\0".encode())
        h.update(f.read_bytes() if st.st_size <= WHOLE_FILE_BYTES else f"{f.resolve()}\0{st.st_mtime_ns}".encode())

    for f in sorted(model.iterdir()):
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES):
            add(f, "model/" + f.name)
    for f in sorted(data.rglob("*")) if data.is_dir() else [data]:
        if f.is_file():
            add(f, "data/" + (str(f.relative_to(data)) if data.is_dir() else ""))
    h.update(job.data.model_dump_json(exclude={"path"}).encode())
    h.update(f"{job.model.revision}\0{job.model.trust_remote_code}".encode())
    for lib in ("transformers", "tokenizers", "datasets", "jinja2"):
        try:
            h.update(f"{lib}={metadata.version(lib)}".encode())
        except metadata.PackageNotFoundError:
            pass
    root = Path(__file__).resolve().parents[2]
    for src in SOURCES:
        h.update((root / src).read_bytes())
    return sweep_home() / "cache" / "pack-data" / f"{h.hexdigest()[:32]}.pkl"


def _keep(cached: Path, data: Data) -> None:
    """Keep the made data as `cached`; the least recently used beyond `CACHE_KEEP` go."""
    if sum(len(s.ids) for seqs in data[1:] for s in seqs) > CACHE_MAX_TOKENS:
        return
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            pickle.dump(("ok", data), f, protocol=pickle.HIGHEST_PROTOCOL)
        tmp.rename(cached)  # whole or absent, for any sweep reading it
        kept = sorted(cached.parent.glob("*.pkl"), key=lambda f: f.stat().st_mtime, reverse=True)
        for old in kept[CACHE_KEEP:]:
            old.unlink(missing_ok=True)
    except OSError:
        pass  # a cache that cannot be written costs the next sweep its head start, nothing more


def _kept(cached: Path | None) -> Data | None:
    """The data an earlier sweep kept in `cached`; None where there is none (or it is unreadable: removed)."""
    if cached is None or not cached.exists():
        return None
    try:
        with open(cached, "rb") as f:
            kind, data = pickle.load(f)
        if kind == "ok":
            os.utime(cached)  # recently used: kept longest
            mark(f"engine: data tokenized ({len(data[1])} train, {len(data[2])} validation rows, kept from an "
                 "earlier sweep)")
            return data
    except Exception:  # noqa: BLE001 - unreadable (cut short, another version's): made again, and kept anew
        pass
    cached.unlink(missing_ok=True)
    return None


def _made(job: JobConfig, cached: Path | None) -> Data:
    """The job's data made now (`tokenized`), and kept as `cached` (None: not kept)."""
    data = tokenized(job)
    if cached is not None:
        _keep(cached, data)
    return data


def made_or_kept(job: JobConfig) -> Data:
    """The job's data as an earlier sweep kept it (`cache_file`), else made now and kept."""
    cached = cache_file(job)
    data = _kept(cached)
    return data if data is not None else _made(job, cached)


def start(job: JobConfig, *, own_process: bool) -> Callable[[], Data]:
    """Start making the job's data, or reading it where an earlier sweep kept it (`made_or_kept`), in a process
    of its own or in a thread; returns the wait for it, which raises what making it raised."""
    if not own_process:
        # The kept data is looked for here, and the thread only makes it: it imports transformers (the tokenizer)
        # at once, before this thread's own imports do (two threads importing transformers' lazy module at the
        # same moment can fail: "cannot import name 'AutoTokenizer'").
        cached = cache_file(job)
        kept = _kept(cached)
        if kept is not None:
            return lambda: kept
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pack-data")
        future = pool.submit(_made, job, cached)
        pool.shutdown(wait=False)
        return future.result
    from trial_worker.attempt import child_env, temp_folder

    folder = Path(temp_folder("sweep-pack-data"))  # named for this process: removed by any sweep once it is gone
    (folder / "job.json").write_text(job.model_dump_json())
    env = child_env()
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


def exit_with(parent: int) -> None:
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
    exit_with(parent)
    out = Path(folder)
    job = JobConfig.model_validate_json((out / "job.json").read_text())
    try:
        value: object = ("ok", made_or_kept(job))
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
