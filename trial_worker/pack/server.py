"""The pack server: one Ray actor per GPU that keeps the 4-bit base, the CUDA context and the imports warm.

Tune trials hand their work to it (`join`), wait for what it has for them (`poll`: rung reports with their
checkpoint folders, an error, or done), say when Tune let them go on past a rung (`proceed`), and leave when
they are stopped or finished (`leave`). The engine (`engine.PackEngine`) runs in the actor's own thread; every
change of membership is queued and applied between two pack steps, so a pruned trial leaves at once and a new
one joins at the next step.

Why an actor the controller owns, and not the trials: a trial's Tune actor comes and goes with the trial (and
a non-detached actor dies with its owner), while the base must outlive every trial on its GPU. Created with
`max_restarts=-1`: a pack process that is killed comes back empty, and each of its trials, failed by the lost
`poll`, is retried by Tune from its own last rung checkpoint (`resources.max_failures`).
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections import deque
from typing import Any, Optional

from trial_worker.marks import mark, mark_process_start

# A trial whose attempt has not polled for this long lost its Tune actor (killed, or stopped without a word):
# it is dropped from the pack, its slot and memory freed. An attempt polls all the time (each poll waits up to
# 5 s) except while Tune takes a rung report the attempt took from the pack: then it gets the long time.
LOST_S = 60.0
STALE_S = 900.0


class PackServer:
    """The pack of one GPU (or of the CPU): admission, the training loop thread, and each trial's event queue."""

    def __init__(self, name: str, max_trials: Optional[int] = None, early: Optional[dict] = None):
        # `early`: the ticket of the pack process the controller started before Ray (`pack.early`): this actor
        # adopts it and relays every call to it, or, where it cannot (another GPU, gone), builds the pack here.
        self.relay = None
        if early is not None:
            import ray

            from trial_worker.pack.early import adopt

            self.relay = adopt(early, ray.get_gpu_ids())
            if self.relay is not None:
                self.name = name
                return
        mark_process_start("pack: process started")
        mark("pack: actor init")
        self.name = name
        self.max_trials = max_trials
        # A pack's steps change size as trials come and go: expandable segments keep the allocator from
        # fragmenting the card (set before this process's first CUDA allocation).
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        from trial_worker.attempt import temp_folder

        self.output_dir = temp_folder(f"sweep-{name}")  # named for this process: removed by any sweep once it is gone
        self.engine: Optional[Any] = None  # the PackEngine, built by the first trial (or base evaluation)
        self.lock = threading.Condition()
        self.commands: deque = deque()  # (op, args), applied by the loop between pack steps
        self.queue: list = []  # trials waiting for room: (trial_id, job, resume_from, started_at, attempt)
        self.joined_at = -1  # the engine's step count at the last join (`_admit`)
        self.held: dict[str, Optional[str]] = {}  # trial id -> the attempt whose trial the engine holds
        self.events: dict[str, list] = {}
        self.seen: dict[str, float] = {}
        # trial id -> the attempt (a Tune attempt's own token) that holds it here now: what an earlier attempt
        # of the same trial still sends (a `leave` or `proceed` Ray delivers late, after a retry joined) is
        # ignored, and nothing of that attempt reaches the new one's events
        self.attempts: dict[str, Optional[str]] = {}
        self.reporting: set[str] = set()  # trials whose attempt took a rung report and has not polled since
        self.error: Optional[str] = None
        self.thread = threading.Thread(target=self._loop, name="pack-loop", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------ called by Tune trials and the controller
    def info(self) -> dict:
        """Who this pack is: name, process id, node, its checkpoint folder, and how many trials it holds or queues."""
        import sys

        ray = sys.modules.get("ray")  # the pack's own process (`pack.early`) has no Ray: its actor adds the node
        node = ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None
        if self.relay is not None:
            return dict(self.relay.call("info"), node=node)
        with self.lock:
            held = len(self.engine.trials) if self.engine else 0
            return {"name": self.name, "pid": os.getpid(), "node": node,
                    "trials": held + len(self.queue), "error": self.error, "output_dir": self.output_dir}

    def prepare(self, job) -> None:
        """Build the engine for `job` now (the base loaded, the data made, the warm-up step run), before any
        trial asks to join: what the pack process started before Ray does first (`pack.early`)."""
        self._command("prepare", _job(job))

    def join(self, trial_id: str, job, resume_from: Optional[str] = None, started_at: Optional[float] = None,
             attempt: Optional[str] = None) -> None:
        """Queue a trial for admission; it starts at the first pack step after there is room for it.
        `job`: the trial's `JobConfig` as the trial validated it (or its data, validated here once);
        `started_at` (`time.time()`): when Tune started the trial, for its reports' `setup_s`; `attempt`: this
        attempt's token, which its `poll`, `proceed` and `leave` give (a retry of the trial brings a new one)."""
        if self.relay is not None:
            return self.relay.call("join", trial_id, job, resume_from, started_at, attempt)
        job = _job(job)
        mark(f"pack: join {trial_id}")
        with self.lock:
            self.events[trial_id] = []
            self.seen[trial_id] = time.monotonic()
            self.attempts[trial_id] = attempt
            self.commands.append(("join", (trial_id, job, resume_from, started_at, attempt)))
            self.lock.notify_all()

    def poll(self, trial_id: str, timeout: float = 5.0, attempt: Optional[str] = None) -> list[dict]:
        """The trial's events so far ({"kind": "report"|"error"|"done", ...}), waiting up to `timeout` s for one.
        A trial this pack does not hold for `attempt` (the pack process was restarted and came back empty, a
        newer attempt of the trial joined, or the pack dropped it: `LOST_S`) gets an error: its attempt fails and
        Tune retries it, where it would otherwise wait for events that never come."""
        if self.relay is not None:
            return self.relay.call("poll", trial_id, timeout, attempt)
        with self.lock:
            if self._current(trial_id, attempt):
                self.seen[trial_id] = time.monotonic()
                self.reporting.discard(trial_id)
                # Woken as well when another attempt takes the trial over: a poll the pack still runs for a dead
                # attempt (its caller killed mid-wait) must not take the new attempt's events, which its dead
                # caller would never see (seen: a retried trial parked for good after its rung report).
                self.lock.wait_for(lambda: self.events.get(trial_id) or self.error
                                   or not self._current(trial_id, attempt), timeout=timeout)
            if not self._current(trial_id, attempt):
                return [{"kind": "error", "type": "RuntimeError",
                         "message": f"pack {self.name} (process {os.getpid()}) does not hold this attempt of the trial: "
                                    "the pack process was restarted, a newer attempt joined, or this one had "
                                    f"not polled for {LOST_S:.0f} s"}]
            if self.error and not self.events[trial_id]:
                return [{"kind": "error", "type": "RuntimeError", "message": f"pack {self.name} failed: {self.error}"}]
            out, self.events[trial_id] = self.events[trial_id], []
            if any(e["kind"] == "report" for e in out):
                self.reporting.add(trial_id)  # Tune takes it now: the attempt polls again after
            return out

    def proceed(self, trial_id: str, attempt: Optional[str] = None) -> None:
        """Tune took the trial's rung report and lets it go on (ASHA did not stop it)."""
        if self.relay is not None:
            return self.relay.call("proceed", trial_id, attempt)
        self._command("proceed", (trial_id, attempt))

    def leave(self, trial_id: str, attempt: Optional[str] = None) -> None:
        """The trial stopped (pruned, finished, failed, or its actor is going away): drop it from the pack."""
        if self.relay is not None:
            return self.relay.call("leave", trial_id, attempt)
        self._command("leave", (trial_id, attempt))

    def evaluate_base(self, job) -> dict:
        """{"val_loss", "ppl", "tokens"} of the untrained base on the job's validation rows, on the warm base."""
        if self.relay is not None:
            return self.relay.call("evaluate_base", job)
        done = threading.Event()
        box: dict = {}
        self._command("evaluate_base", (_job(job), box, done))
        while not done.wait(1.0):
            if self.error:  # the loop thread broke: the evaluation went with it
                raise RuntimeError(f"the pack failed during the base evaluation: {self.error}")
        if "error" in box:
            raise RuntimeError(box["error"])
        return box["result"]

    # ------------------------------------------------------------ the loop thread
    def _command(self, op: str, args) -> None:
        with self.lock:
            self.commands.append((op, args))
            self.lock.notify_all()

    def _emit(self, trial_id: str, event: dict, attempt: Optional[str]) -> None:
        """`event` for the attempt `attempt` of the trial, if it is the one that holds the trial here now."""
        with self.lock:
            if self._current(trial_id, attempt):
                self.events[trial_id].append(event)
                self.lock.notify_all()

    def _engine_for(self, job):
        """The engine for `job`'s base/data: the warm one, or a new one when the pack is empty and they differ."""
        from trial_worker.pack.engine import PackEngine, pack_key

        if self.engine is None or (pack_key(job) != self.engine.key and not self.engine.trials
                                   and not self.engine.evaluating):
            self.engine = None
            import gc

            gc.collect()
            mark("pack: engine build")
            self.engine = PackEngine(job, output_dir=self.output_dir, max_trials=self.max_trials)
        return self.engine

    def _loop(self) -> None:
        try:
            while True:
                self._apply_commands()
                self._admit()
                ran = self.engine.step() if self.engine is not None else False
                if self.engine is not None:
                    self._drain()
                if not ran:
                    with self.lock:
                        self.lock.wait(timeout=0.05)
        except BaseException:  # noqa: BLE001 - the pack itself broke: every trial in it is told
            with self.lock:
                self.error = traceback.format_exc()[-2000:]
                self.lock.notify_all()

    def _apply_commands(self) -> None:
        """Every command sent so far, those that came while one ran too (the first builds the engine, for
        seconds: the trials that asked to join meanwhile are queued before the next step, not one step later;
        `_admit` lets them in)."""
        while True:
            with self.lock:
                commands, self.commands = list(self.commands), deque()
            if not commands:
                break
            for op, args in commands:
                self._apply(op, args)
        now = time.monotonic()
        with self.lock:
            stale = [tid for tid, t in self.seen.items() if now - t > (STALE_S if tid in self.reporting else LOST_S)]
        for tid in stale:
            mark(f"pack: {tid} dropped, its attempt stopped polling")
            self._apply_leave(tid)

    def _apply(self, op: str, args) -> None:
        """One command from `join`, `leave`, `proceed` or `evaluate_base`, on the loop thread."""
        if op == "join":
            trial_id = args[0]
            if not self._current(trial_id, args[4]):
                return  # a newer attempt joined meanwhile
            self.queue = [q for q in self.queue if q[0] != trial_id] + [args]
            if self.engine is not None:
                self.engine.remove(trial_id)  # a retry of a trial the pack still held
        elif op == "leave":
            trial_id, attempt = args
            if not self._current(trial_id, attempt):
                mark(f"pack: leave {trial_id} of an earlier attempt, ignored")
                return
            mark(f"pack: leave {trial_id}")
            self._apply_leave(trial_id)
        elif op == "proceed":
            trial_id, attempt = args
            mark(f"pack: proceed {trial_id}")
            t = self.engine.trials.get(trial_id) if self.engine and self._current(trial_id, attempt) else None
            if t is not None and t.state == "parked":
                t.state = "running"
        elif op == "prepare":
            try:
                self._engine_for(args)
            except Exception as e:  # noqa: BLE001 - only a head start: the first trial's join meets it again, and fails alone
                mark(f"pack: engine build failed ({type(e).__name__}: {str(e)[:200]})")
        elif op == "evaluate_base":
            # Queued beside the trials' rung evaluations: the trials admitted next train while it runs.
            job, box, done = args

            def finished(metrics, error, box=box, done=done) -> None:
                mark("pack: base evaluation done")
                if error is None:
                    box["result"] = metrics
                else:
                    box["error"] = f"{type(error).__name__}: {error}"
                done.set()

            try:
                self._engine_for(job).queue_evaluation(None, finished, job)
            except Exception as e:  # noqa: BLE001 - handed back to the caller
                finished(None, e)

    def _current(self, trial_id: str, attempt: Optional[str]) -> bool:
        """Whether `attempt` is the one that holds `trial_id` here now (`join` and `_apply_leave` keep `attempts`
        and `events` on the same trials)."""
        with self.lock:  # re-entrant: callers may hold it
            return trial_id in self.attempts and self.attempts[trial_id] == attempt

    def _apply_leave(self, trial_id: str) -> None:
        self.queue = [q for q in self.queue if q[0] != trial_id]
        if self.engine is not None:
            self.engine.remove(trial_id)
        with self.lock:
            self.events.pop(trial_id, None)
            self.seen.pop(trial_id, None)
            self.attempts.pop(trial_id, None)
            self.reporting.discard(trial_id)
            self.lock.notify_all()  # a poll waiting for it returns now
        self.held.pop(trial_id, None)

    def _admit(self) -> None:
        """Queued trials join, oldest first, while there is room. One join between two pack steps once the pack
        has work: a join is host work (its adapters drawn and copied, its optimizer built: ~0.16 s for the 1B
        shape on an H100's host, 2026-12-07), which then runs while the GPU still works on the last step's
        backward, and the first step starts after the first join, not after all of them (24 joins had taken 5.3 s
        of an idle GPU before the first step); a trial that joins later is admitted by the memory the steps
        measured (`PackEngine.fits`)."""
        from trial_worker.pack.engine import pack_key

        if self.engine is not None:  # trials sent back to wait by an out-of-memory step come first
            self.engine.readmit()
        while self.queue:
            if self.engine is not None and self.engine.running() and self.joined_at == self.engine.steps:
                return  # one join between two steps while the pack trains
            head = self.queue[0]
            try:
                e = self._engine_for(head[1])
            except Exception as err:  # noqa: BLE001 - a trial that cannot join fails alone
                self._refuse(head, err)
                continue
            if pack_key(head[1]) != e.key:
                return  # another base: built once this pack has emptied
            # Another dataset (a search over max_seq_length) is made beside the steps; meanwhile the next queued
            # trial whose data is made joins in its place.
            chosen = None
            for queued in list(self.queue):
                if pack_key(queued[1]) != e.key:
                    continue
                try:
                    ready = e.data_ready(queued[1])
                except Exception as err:  # noqa: BLE001 - its data could not be made: that trial fails
                    self._refuse(queued, err)
                    continue
                if ready:
                    chosen = queued
                    break
            if chosen is None or not e.fits(chosen[1]):
                return
            trial_id, job, resume_from, started_at, attempt = chosen
            self.queue.remove(chosen)
            try:
                mark(f"pack: admit {trial_id}")
                e.add(trial_id, job, lambda m, d, tid=trial_id, a=attempt: self._emit(
                          tid, {"kind": "report", "metrics": m, "checkpoint": d, "pack": self.name}, a),
                      resume_from=resume_from, started_at=started_at)
                self.held[trial_id] = attempt
                self.joined_at = e.steps
            except Exception as err:  # noqa: BLE001 - a trial that cannot join fails alone
                self._refuse(chosen, err)

    def _refuse(self, queued: tuple, err: BaseException) -> None:
        """A queued trial that cannot join: out of the queue (and the pack), its error to its attempt."""
        trial_id, attempt = queued[0], queued[4]
        if queued in self.queue:
            self.queue.remove(queued)
        if self.engine is not None:
            self.engine.remove(trial_id)
        self._emit(trial_id, _error_event(err), attempt)

    def _drain(self) -> None:
        """Hand each failed or finished trial's end to its owner, and take it out of the pack."""
        e = self.engine
        if e is None:
            return
        for t in e.failed:
            self._emit(t.id, _error_event(t.error), self.held.get(t.id))
        e.failed.clear()
        for t in [t for t in e.trials.values() if t.state == "done"]:
            e.remove(t.id)
            self._emit(t.id, {"kind": "done"}, self.held.get(t.id))


def _error_event(error: BaseException) -> dict:
    return {"kind": "error", "type": type(error).__name__, "message": str(error),
            "traceback": "".join(traceback.format_exception(error))[-3000:]}


def _job(job):
    """A trial's `JobConfig`: as sent (Ray pickles the validated object), or validated once from its data."""
    from trial_worker.config import JobConfig

    return job if isinstance(job, JobConfig) else JobConfig.model_validate(job)
