"""The study record: where a sweep lives in SQL (SQLite or PostgreSQL) and how it is found again.

Everything a person or a dashboard shows about a sweep is read from one Optuna study.
This module opens its storage, writes the study-level attributes (the validated spec,
the base model's metrics), and keeps a small registry so `sweep status NAME` finds a
study without its URL. The Ray side of the record (`StudySearch`) is in `sweep.record.search`,
so nothing here imports Ray.

Study user attrs written here:
  spec          the validated spec as plain data, secrets removed (what `sweep export` reads)
  spec_hash     hash of that spec; `spec_history` lists earlier hashes when a resume changed it
  base_val_loss, base_ppl   the untrained base model on the same validation tokens (written once)
  base_eval_key the hash of what the base evaluation depends on (`base_eval_key`); a later sweep of the
                same model, data and split in the same storage takes the metrics from here
  base_from     the study whose base evaluation this one's metrics are (absent: evaluated for this one)

Trial user attrs (written by `sweep.record.search.StudySearch`, read by the leaderboard/export):
  ray_trial_id                       Tune's id of the trial (set when the trial is asked)
  rung_<budget>                      the rung's report (`trial_worker.config.REPORT_KEYS` but `rung`:
                                      val_loss, ppl, steps, samples, scheduled_lr, ...), keyed by the
                                      budget value (rung_10, rung_20, ...)
  rung_reached                       rungs reached, 1-based (0: no report)
  budget_reached                     budget value of the last report (steps or samples)
  budget_unit                        "steps" or "samples"
  val_loss_last, ppl_last            metrics of the last report (a PRUNED trial's final word)
  tokens_per_s, samples_per_s, peak_mem_gb, wall_s   from the last report
  fail_reason                        error text of a FAIL trial (last 4000 characters)
  checkpoint_events                  [{reported_at, note}]: a resume that skipped a checkpoint failing
                                      its hash check (cut short, corrupted, deleted), and where it went on
  retries                            [{error, resumes_from, unit}]: each Ray retry of the trial
                                      (`max_failures`): why its attempt ended, and the budget value of the
                                      checkpoint it goes on from (0: from the start)

A PRUNED trial is told with no value, but Optuna itself copies its last intermediate value
onto it (trial.value); `study.best_trial` and `sweep export` consider COMPLETE trials only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional

import optuna

logger = logging.getLogger(__name__)


def error_summary(text: str) -> str:
    """One line saying why a trial's attempt ended, from Tune's error text (error.txt: "Failure # N" blocks).

    A Python exception: the line that names it (Ray wraps it in lines of its own), else the block's last
    line. A worker process that died (no traceback): Ray's first line, with the worker's exit type.
    """
    block = re.split(r"^Failure # \d+.*$", text, flags=re.M)[-1]
    lines = [ln.strip() for ln in block.strip().splitlines() if ln.strip()]
    if not lines:
        return "trial failed"
    if any(ln.startswith(("Traceback", 'File "')) for ln in lines) or len(lines) == 1:
        named = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b.*:", ln)]
        return (named or lines)[-1][:500]
    exit_type = re.search(r"Worker exit type: (\w+)", block)
    return (lines[0] + (f" (worker exit: {exit_type[1]})" if exit_type else ""))[:500]


SQLITE_BUSY_TIMEOUT_S = 60
FAIL_REASON_MAX_CHARS = 4000


class StudyNotFound(LookupError):
    """A study name (or spec) that no registry entry or storage knows."""


class StorageError(RuntimeError):
    """The study storage could not be opened; the message never holds a password."""


# ------------------------------------------------------------------ URLs


def safe_url(url: str) -> str:
    """The URL for messages: password shown as ***."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        # Not parseable: still never echo what may be a password.
        return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)


def url_without_password(url: str) -> str:
    """The URL with no password at all (libpq then reads PGPASSWORD or ~/.pgpass).

    A relative SQLite path becomes absolute, so the URL works from any folder.
    """
    from sqlalchemy.engine import URL, make_url

    u = make_url(url)
    if u.password is not None:
        # (URL.set(password=None) means "leave unchanged", so build it again.)
        u = URL.create(u.drivername, username=u.username, host=u.host, port=u.port, database=u.database, query=u.query)
    if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:" and not u.database.startswith("file:"):
        u = u.set(database=str(Path(u.database).expanduser().resolve()))
    return u.render_as_string(hide_password=False)


def _sqlite_file(url: str) -> Optional[Path]:
    from sqlalchemy.engine import make_url

    u = make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:" or u.database.startswith("file:"):
        return None
    return Path(u.database).expanduser()


# ------------------------------------------------------------------ storage


def open_storage(url: str, *, create: bool = True) -> optuna.storages.RDBStorage:
    """An Optuna RDB storage for a SQLite or PostgreSQL URL, with its schema created.

    SQLite waits up to a minute on a locked database (the dashboard may be reading), or the URL's
    `?timeout=SECONDS` (SQLAlchemy's own parameter for it);
    a server connection is checked before use (`pool_pre_ping`) so a sweep survives a
    database restart or an idle timeout. With `create=False` a missing SQLite file is
    a `StudyNotFound` instead of a new empty database.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    try:
        backend = make_url(url).get_backend_name()
    except ArgumentError:
        raise StorageError(f"not a SQLAlchemy URL: {safe_url(url)!r} (expected sqlite:///path.db or postgresql+psycopg://user@host/db)") from None
    engine_kwargs: dict[str, Any]
    if backend == "sqlite":
        path = _sqlite_file(url)
        if path is not None:
            if not create and not path.exists():
                raise StudyNotFound(f"no study database at {path}")
            path.parent.mkdir(parents=True, exist_ok=True)
        # connect_args would override the URL's own ?timeout=, so the default is set only without one.
        engine_kwargs = {} if "timeout" in make_url(url).query else {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    else:
        engine_kwargs = {"pool_pre_ping": True}
    try:
        return _create_rdb_storage(url, engine_kwargs)
    except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
        # SQLAlchemy's own message may carry the URL; only the driver's message is shown.
        cause = getattr(e, "orig", None) or e.__cause__ or e
        raise StorageError(f"cannot open the study storage {safe_url(url)}: {str(cause).strip()}") from None
    except ImportError as e:
        hint = " (pip install 'psycopg[binary]')" if backend == "postgresql" else ""
        raise StorageError(f"cannot open the study storage {safe_url(url)}: {e}{hint}") from None


def _create_rdb_storage(url: str, engine_kwargs: dict, tries: int = 5) -> optuna.storages.RDBStorage:
    """RDBStorage, surviving the race of several processes creating a fresh schema at once.

    Each process checks for the tables, finds none and creates them; the losers get an
    IntegrityError (alembic_version) or a "table already exists" error. Once the winner has
    committed, opening again finds the schema and goes on.
    """
    import time

    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    for attempt in range(tries):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
        except (IntegrityError, OperationalError, ProgrammingError) as e:
            text = str(e).lower()
            racing = any(w in text for w in ("alembic_version", "already exists", "duplicate", "unique constraint",
                                             "database is locked"))
            if not racing or attempt == tries - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def load_study(storage_url: str, name: str) -> optuna.Study:
    """An existing study; `StudyNotFound` names the studies that the storage does hold."""
    storage = open_storage(storage_url, create=False)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False))
        have = f"; it holds: {', '.join(names)}" if names else "; it holds no study"
        raise StudyNotFound(f"no study named {name!r} in {safe_url(storage_url)}{have}") from None


def set_trial_user_attr_any_state(storage: optuna.storages.BaseStorage, trial_id: int, key: str, value: Any) -> None:
    """Set a trial user attr even when the trial has finished.

    Optuna refuses to change a finished trial, but Ray tells the searcher that a trial
    failed *before* its error callbacks run, so the error text arrives after the trial
    is already FAIL. RDB storages only (see `sweep._compat.optuna`).
    """
    from sweep._compat.optuna import set_user_attr_of_finished_trial

    set_user_attr_of_finished_trial(storage, trial_id, key, value)


def fail_running_trials(study: optuna.Study, reason: str, *, keep: frozenset[int] = frozenset(),
                        only: Optional[set[int]] = None) -> list[int]:
    """Mark the study's RUNNING trials FAIL with `reason` (user attr `fail_reason`); return their numbers.

    `keep`: trial numbers left alone; `only`: if given, the storage trial ids to consider (one
    controller's own trials, so another controller's running trials are left alone). After a fit
    nothing may stay RUNNING; do not call it while another controller works on the same trials.
    """
    from sweep._compat.optuna import study_storage
    from sweep._compat.optuna import trial_id as storage_id

    failed = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t.number in keep or (only is not None and storage_id(t) not in only):
            continue
        set_trial_user_attr_any_state(study_storage(study), storage_id(t), "fail_reason", reason)
        study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        failed.append(t.number)
    return failed


# ------------------------------------------------------------------ study attrs


def base_eval_key(job: Any, *, on_gpu: bool) -> str:
    """The hash of everything the base model's validation loss depends on: the model section but its LoRA
    settings (path, revision, quantization, attention), the whole data section (path, format, splits,
    sample caps, sequence length, system prompt), the compute dtype, the seed (a held-out fraction is drawn
    with it), GPU or CPU, and the name, size and modification time of every file of a local model or data
    path. Anything else a sweep changes (learning rate, batch, LoRA rank) leaves it alone. Conservative:
    a regenerated file or a moved folder is a new key (the base is evaluated again), never a wrong reuse."""
    import hashlib

    t = job.training
    what = {"model": job.model.model_dump(mode="json", exclude={"lora"}), "data": job.data.model_dump(mode="json"),
            "bf16": t.bf16, "fp16": t.fp16, "seed": t.seed, "gpu": bool(on_gpu),
            "files": [_files_of(job.model.name_or_path), _files_of(job.data.path)]}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _files_of(path: str, limit: int = 20000) -> list:
    """[(relative name, size, mtime_ns)] of a local file or of a folder's files (hidden ones too); [] for a hub id."""
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return [[os.path.abspath(p), st.st_size, st.st_mtime_ns]]
    if not p.is_dir():
        return []
    out: list = [[os.path.abspath(p)]]
    for root, dirs, files in os.walk(p):
        dirs.sort()
        for f in sorted(files):
            st = os.stat(os.path.join(root, f))
            out.append([os.path.relpath(os.path.join(root, f), p), st.st_size, st.st_mtime_ns])
            if len(out) > limit:
                return out
    return out


def reuse_base_metrics(study: optuna.Study, storage: Any, key: str) -> Optional[str]:
    """Record on `study` the base metrics an earlier study of the same storage holds under the same
    `base_eval_key`; the name of that study, or None when no study has them (or `study` has its own)."""
    study.set_user_attr("base_eval_key", key)
    if "base_val_loss" in study.user_attrs:
        return None
    for other in optuna.get_all_study_summaries(storage, include_best_trial=False):
        attrs = other.user_attrs
        if (other.study_name != study.study_name and attrs.get("base_eval_key") == key
                and attrs.get("base_val_loss") is not None):
            if record_base_metrics(study, attrs["base_val_loss"], attrs.get("base_ppl", float("nan"))):
                study.set_user_attr("base_from", other.study_name)
            return other.study_name
    return None


def record_base_metrics(study: optuna.Study, val_loss: float, ppl: float) -> bool:
    """Store the base model's val loss / perplexity once per study; False if already there."""
    attrs = study.user_attrs
    if "base_val_loss" in attrs:
        return False
    study.set_user_attr("base_val_loss", finite_or_none(val_loss))
    study.set_user_attr("base_ppl", finite_or_none(ppl))
    return True


# Exact key names only: a pattern such as "token" would also drop max_tokens or pad_token,
# and export would then silently lose a setting.
_SECRET_KEYS = {"password", "passwd", "secret", "api_key", "apikey", "token", "access_token", "auth_token",
                "hf_token", "wandb_api_key", "credentials"}


def scrub(value: Any) -> Any:
    """Plain data with secrets removed: secret keys dropped, passwords in URLs hidden."""
    if isinstance(value, Mapping):
        return {k: scrub(v) for k, v in value.items() if str(k).lower() not in _SECRET_KEYS}
    if isinstance(value, (list, tuple)):
        return [scrub(v) for v in value]
    if isinstance(value, str) and "://" in value and "@" in value:
        return safe_url(value)
    return value


def record_spec(study: optuna.Study, spec_dict: Mapping[str, Any], spec_hash: str) -> bool:
    """Store the validated spec (secrets removed) and its hash; True if it changed.

    A resumed sweep whose spec was edited keeps the new spec (export uses it) and lists
    the earlier hashes in `spec_history`, so the record shows that the space changed.
    """
    attrs = study.user_attrs
    old = attrs.get("spec_hash")
    if old == spec_hash and "spec" in attrs:
        return False
    if old is not None and old != spec_hash:
        logger.warning("study %s: the spec changed since the last run (%s -> %s)", study.study_name, old, spec_hash)
        study.set_user_attr("spec_history", list(attrs.get("spec_history", [])) + [old])
    study.set_user_attr("spec", scrub(json.loads(json.dumps(dict(spec_dict), default=str))))
    study.set_user_attr("spec_hash", spec_hash)
    return True


def finite_or_none(v: Any) -> Optional[float]:
    """A JSON-safe number for the study: NaN/inf, non-numbers and bools become None (JSON has no NaN)."""
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


# ------------------------------------------------------------------ registry


def sweep_home() -> Path:
    """$SWEEP_HOME, default ~/.sweep."""
    return Path(os.environ.get("SWEEP_HOME") or Path.home() / ".sweep").expanduser()


def _registry_path() -> Path:
    return sweep_home() / "studies.json"


def registered_studies() -> dict[str, str]:
    """{study name: storage URL (no password)} from $SWEEP_HOME/studies.json."""
    p = _registry_path()
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as e:
        logger.warning("ignoring unreadable study registry %s: %s", p, e)
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def register_study(name: str, storage_url: str) -> Path:
    """Remember where study `name` lives (the URL is stored without its password)."""
    reg = registered_studies()
    reg[name] = url_without_password(storage_url)
    p = _registry_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(reg, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, p)  # atomic: two sweeps starting at once never leave half a file
    return p


def resolve_study(ref: str, storage: Optional[str] = None) -> tuple[str, str]:
    """(storage URL, study name) for a study name or a spec file path; `storage` wins when given.

    A name is looked up in the registry; a spec path gives the spec's name and its
    storage (the spec's `storage`, else the SQLite file beside it).
    """
    if ref.endswith((".yaml", ".yml")) and Path(ref).is_file():
        from sweep.spec import default_storage, load_spec

        spec = load_spec(ref)
        return storage or spec.storage or default_storage(spec, ref), spec.name
    if storage:
        return storage, ref
    reg = registered_studies()
    if ref in reg:
        return reg[ref], ref
    known = f"known studies: {', '.join(sorted(reg))}" if reg else f"no study is registered in {_registry_path()}"
    raise StudyNotFound(f"no study named {ref!r} ({known}); give its database with --storage URL or pass the spec file")


# ------------------------------------------------------------------ one controller per study

LEASE_TABLE = "sweep_controller_leases"
LEASE_TTL_S = 60.0  # a lease not renewed for this long is a dead controller's (another host's: only by time)
LEASE_RENEW_S = 10.0


class StudyHeld(RuntimeError):
    """Another live controller drives this study (its lease is held); the message names it and since when."""


def _process_start(pid: int) -> Optional[str]:
    """Process `pid`'s start time in clock ticks since boot (Linux /proc), to tell a pid reused; None if unknown.
    A zombie (killed, not yet reaped by its parent) reads as "ended"."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return "ended" if fields[0] == "Z" else fields[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: Optional[str]) -> bool:
    """Whether the process `pid` that started at `started` (see `_process_start`) still runs on this host."""
    now = _process_start(pid)
    if now == "ended":
        return False
    if now is not None:
        return started is None or now == started
    from sweep.processes import pid_exists

    return pid_exists(pid)


class ControllerLease:
    """The lease a live controller holds on its study: one row (study, host, pid, since, renewed) in a small
    table of the study's own database, taken before the controller creates or touches the study and renewed
    every `LEASE_RENEW_S` by a thread.

    Why a table of its own rather than an Optuna study user attr: taking the lease must be atomic (two
    `sweep run` started at once must not both win), and Optuna's attrs are plain upserts with no
    compare-and-set, while a row with a primary key (an INSERT that only one can make) and an UPDATE guarded by
    the old holder's token are atomic on SQLite and PostgreSQL alike; the table also exists before the study
    does (a first `sweep run` is held from its first write). Optuna ignores tables it does not know.

    A lease is free when it is released (the controller ended, by any exit but a kill), when its holder is a
    process of this host that no longer runs (a `kill -9`, a crash: a resume right after is not blocked), or when
    it was not renewed for `LEASE_TTL_S` (a controller on another host, or a lost host; hosts' clocks are assumed
    within seconds of each other).
    """

    def __init__(self, rstorage, study_name: str):
        import socket
        import uuid

        self.engine, self.study_name = rstorage.engine, study_name
        self.host, self.pid, self.token = socket.gethostname(), os.getpid(), uuid.uuid4().hex
        self.taken_over: Optional[dict] = None  # the row of a dead controller this lease replaced
        self._stop: Any = None  # the renewing thread's stop event
        self._table: Any = None  # the lease table (sqlalchemy.Table), once made

    def _schema(self):
        import sqlalchemy as sa

        if self._table is None:
            meta = sa.MetaData()
            self._table = sa.Table(LEASE_TABLE, meta,
                                   sa.Column("study_name", sa.String(512), primary_key=True),
                                   sa.Column("host", sa.String(255), nullable=False),
                                   sa.Column("pid", sa.Integer, nullable=False),
                                   sa.Column("process_start", sa.String(32)),
                                   sa.Column("token", sa.String(64), nullable=False),
                                   sa.Column("since", sa.Float, nullable=False),
                                   sa.Column("renewed", sa.Float, nullable=False))
            for attempt in range(5):
                try:
                    meta.create_all(self.engine, checkfirst=True)
                    break
                except sa.exc.SQLAlchemyError as e:  # two controllers creating the table at once: the loser retries
                    if attempt == 4 or not any(w in str(e).lower() for w in ("already exists", "duplicate", "locked")):
                        raise
                    import time

                    time.sleep(0.2 * (attempt + 1))
        return self._table

    def holder(self) -> Optional[dict]:
        """The row of the controller holding the study, or None."""
        t = self._schema()
        with self.engine.connect() as c:
            row = c.execute(t.select().where(t.c.study_name == self.study_name)).mappings().first()
        return dict(row) if row else None

    def free(self, row: dict, now: float) -> bool:
        """Whether the lease `row` is a dead controller's: this host's process gone, or not renewed in time."""
        import socket

        if row["host"] == socket.gethostname() and not _alive(row["pid"], row.get("process_start")):
            return True
        return now - row["renewed"] > LEASE_TTL_S

    def acquire(self) -> "ControllerLease":
        """Take the lease, or raise `StudyHeld` naming its holder and since when."""
        import time

        import sqlalchemy as sa

        t = self._schema()
        for _ in range(10):
            now = time.time()
            mine = dict(study_name=self.study_name, host=self.host, pid=self.pid, process_start=_process_start(self.pid),
                        token=self.token, since=now, renewed=now)
            row = self.holder()
            try:
                with self.engine.begin() as c:
                    if row is None:
                        c.execute(t.insert().values(**mine))
                    elif self.free(row, now):
                        got = c.execute(t.update().where(t.c.study_name == self.study_name, t.c.token == row["token"])
                                        .values(**mine)).rowcount
                        if got != 1:
                            continue  # another controller took it first: look again
                        self.taken_over = row
                    else:
                        raise StudyHeld(held_message(self.study_name, row, now))
            except sa.exc.IntegrityError:
                continue  # another controller inserted first: look again
            self._renew_in_background()
            return self
        raise StudyHeld(f"study {self.study_name!r}: could not take the controller lease (others kept taking it)")

    def _renew_in_background(self) -> None:
        import threading
        import time

        t, stop = self._table, threading.Event()
        self._stop = stop

        def renew() -> None:
            while not stop.wait(LEASE_RENEW_S):
                try:
                    with self.engine.begin() as c:
                        c.execute(t.update().where(t.c.study_name == self.study_name, t.c.token == self.token)
                                  .values(renewed=time.time()))
                except Exception as e:  # noqa: BLE001 - the database away for a while: the searcher's retries say so
                    logger.debug("renewing the controller lease of %s: %s", self.study_name, e)

        threading.Thread(target=renew, name="sweep-lease", daemon=True).start()

    def release(self) -> None:
        """Give the lease back (only this controller's own: a lease taken over since is left alone)."""
        if self._stop is not None:
            self._stop.set()
        t = self._table
        if t is None:
            return
        try:
            with self.engine.begin() as c:
                c.execute(t.delete().where(t.c.study_name == self.study_name, t.c.token == self.token))
        except Exception as e:  # noqa: BLE001 - the lease then expires by itself (LEASE_TTL_S, or its pid gone)
            logger.warning("could not release the controller lease of study %s: %s", self.study_name, e)


def held_message(study_name: str, row: dict, now: float) -> str:
    """Who holds the study `study_name` (a lease row) and since when, and what to do."""
    import time

    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(row["since"]))
    return (f"study {study_name!r} is held by another controller: pid {row['pid']} on host {row['host']}, since {since} "
            f"(lease renewed {max(0.0, now - row['renewed']):.0f} s ago). One controller per study: wait for it to "
            f"end, or stop it (Ctrl+C) and continue with `sweep resume`; or search as a new study: --name NEW_NAME")


def unregister_study(name: str, previous: Optional[str]) -> None:
    """Undo `register_study(name, ...)`: the name's earlier storage put back (`previous`), or the name removed."""
    reg = registered_studies()
    if previous is None:
        if reg.pop(name, None) is None:
            return
    else:
        reg[name] = previous
    p = _registry_path()
    tmp = p.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(reg, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, p)
