"""The `sweep` command line. Heavy libraries load inside the commands that need them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn, Optional

import typer

app = typer.Typer(
    name="sweep",
    help="Hyperparameter search for QLoRA fine-tuning: YAML spec -> Ray Tune ASHA -> Optuna study -> export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help: typer's rich panels show a flag such as --json as `--json <bool>`, as if it took a value.
    rich_markup_mode=None,
)

# `sweep run`/`resume` exit status when the study database failed mid-sweep (sysexits' EX_TEMPFAIL: try again later).
EXIT_STORAGE_LOST = 75
# ... when a trial's checkpoint hit a full disk (sysexits' EX_IOERR): free space, then `sweep resume`.
EXIT_DISK_FULL = 74

STORAGE_HELP = "SQLAlchemy URL of the study (overrides the spec's storage); password from PGPASSWORD if omitted"


def _fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(message, err=True)
    raise typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"sweep {version('sweep')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            typer.echo("sweep (not installed: no version)")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version and exit"),
) -> None:
    """Hyperparameter search for QLoRA fine-tuning: YAML spec -> Ray Tune ASHA -> Optuna study -> export."""


def _load(path: Path):
    from sweep.spec import SpecError, load_spec

    try:
        return load_spec(path)
    except SpecError as e:
        _fail(str(e))


@app.command()
def validate(
    spec: list[Path] = typer.Argument(..., help="spec YAML file(s)"),
    no_data_check: bool = typer.Option(False, "--no-data-check",
                                       help="check the spec only, not the local data and model it points at"),
) -> None:
    """Check spec files without running anything (and the local data and model they name); report every problem at once."""
    from sweep.preflight import preflight
    from sweep.spec import SpecError, load_spec

    bad = 0
    for path in spec:
        try:
            s = load_spec(path)
            notes = [] if no_data_check else preflight(s, path, prepare=False, local_only=True)
        except SpecError as e:
            typer.echo(str(e), err=True)
            bad += 1
            continue
        for note in notes:
            typer.echo(note, err=True)
        kind = f"{s.num_trials} trials ({s.search.sampler})" if s.search else "training config (no search)"
        unit = s.budget.unit
        typer.echo(f"{path}: ok — {s.name}: {kind}, rungs {' -> '.join(map(str, s.budget.rungs))} {unit}")
        if s.search:
            from trial_worker.entry import packing_said

            typer.echo(f"  trials: {packing_said(s.resources.model_dump(), s.job().model_dump(mode='json'), s.search_params())}")
    if bad:
        raise typer.Exit(2)


@app.command()
def run(
    spec: Path = typer.Argument(..., help="search space YAML"),
    name: Optional[str] = typer.Option(None, "--name", help="study name (default: the spec's name)"),
    storage: Optional[str] = typer.Option(None, "--storage", help=STORAGE_HELP),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)"),
    num_trials: Optional[int] = typer.Option(None, "--num-trials", min=1, help="override search.num_trials"),
) -> None:
    """Run the search: ASHA over QLoRA trials, every trial recorded in the study."""
    s = _load(spec)
    if s.search is None:
        _fail(f"{spec}: has no `search` section; to train this config once use `sweep train {spec}`")
    _before_start(s, spec, name, storage)
    _sweep("run", s, spec_path=spec, study_name=name, storage=storage, address=address, num_trials=num_trials)


def _before_start(s, spec_path: Path, name: Optional[str], storage: Optional[str]) -> None:
    """What `sweep run`/`resume` do before anything is created: the preflight check (`sweep.preflight`; problems
    end the command with exit 2, warnings are printed), and a note when the study's name is registered elsewhere."""
    from sweep.preflight import PreflightError, preflight
    from sweep.spec import default_storage

    url = storage or s.storage or default_storage(s, spec_path)
    try:
        notes = preflight(s, spec_path, storage_url=url, storage_field="--storage" if storage else "storage")
    except PreflightError as e:
        _fail(str(e))
    for note in notes:
        typer.echo(note, err=True)
    _say_if_moved(name or s.name, url)


def _say_if_moved(study_name: str, storage_url: str) -> None:
    """A study name the registry knows in another storage: say that `sweep status NAME` will now read this one.

    The registry keeps one storage per name (the latest run's); the other study stays in its database,
    readable with --storage.
    """
    from sweep.record import registered_studies, url_without_password

    before, now = registered_studies().get(study_name), url_without_password(storage_url)
    if before is not None and before != now:
        typer.echo(f"sweep: note: study {study_name!r} is registered in {before}, and this run uses {now}: once it "
                   f"starts, `sweep status {study_name}` reads {now} (the other stays: `sweep status {study_name} "
                   f"--storage {before}`)", err=True)


def _sweep(command: str, spec, **kwargs) -> None:
    """`run_sweep` for `sweep run`/`resume`, each way it can stop turned into one message and its exit code."""
    from sweep.controller import DiskFullStop, ResumeRefused, StudyStorageLost, SweepStopped, run_sweep
    from sweep.record import StorageError, StudyHeld
    from sweep.stops import EXIT_INTERRUPTED

    try:
        summary = run_sweep(spec, **kwargs)
    except ResumeRefused as e:
        _fail(str(e))
    except StudyHeld as e:
        _fail(f"sweep {command}: {e}")
    except SweepStopped as e:
        _fail(str(e), EXIT_INTERRUPTED)
    except StorageError as e:
        _fail(f"sweep {command}: {e}")
    except StudyStorageLost as e:
        _fail(str(e), EXIT_STORAGE_LOST)
    except DiskFullStop as e:
        _fail(str(e), EXIT_DISK_FULL)
    if summary.get("errors"):
        raise typer.Exit(1)


@app.command()
def resume(
    spec: Path = typer.Argument(..., help="the search space YAML the sweep was started with (unedited)"),
    name: Optional[str] = typer.Option(None, "--name", help="study name (default: the spec's name)"),
    storage: Optional[str] = typer.Option(None, "--storage", help=STORAGE_HELP),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)"),
) -> None:
    """Continue a sweep whose controller died: finished trials stay, unfinished ones go on from their checkpoints."""
    s = _load(spec)
    if s.search is None:
        _fail(f"{spec}: has no `search` section; nothing to resume")
    _before_start(s, spec, name, storage)
    _sweep("resume", s, spec_path=spec, study_name=name, storage=storage, address=address, resume=True)


@app.command()
def status(
    study: str = typer.Argument(..., help="study name (as given to `sweep run`) or the spec file"),
    storage: Optional[str] = typer.Option(None, "--storage", help=STORAGE_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the leaderboard as JSON"),
) -> None:
    """Leaderboard of a study, read from its storage."""
    from sweep.record.leaderboard import leaderboard, render, to_json

    st = _open_study(study, storage)
    rows = leaderboard(st)
    if as_json:
        typer.echo(to_json(rows, st))
    else:
        render(rows, st)
    from sweep.resume import never_started_note, stale_running_note

    note = never_started_note(st) or stale_running_note(st)
    if note:
        typer.echo(f"sweep status: {note}", err=True)


@app.command()
def export(
    study: str = typer.Argument(..., help="study name or spec file"),
    out: str = typer.Option("best.yaml", "-o", "--out",
                            help="the training config to write (.yaml/.yml); a folder (any path without a suffix) gets "
                                 "TRL/PEFT/bitsandbytes/Axolotl formats too"),
    storage: Optional[str] = typer.Option(None, "--storage", help=STORAGE_HELP),
    steps: Optional[int] = typer.Option(None, "--steps", help="production length in optimizer steps (schedule re-derived)"),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="production length in passes over the train split"),
) -> None:
    """Write the best COMPLETE trial as a full training config (validates with `sweep validate`)."""
    from sweep.record.export import ExportError, export_best

    st = _open_study(study, storage)
    try:
        info = export_best(st, out, steps=steps, epochs=epochs)
    except ExportError as e:
        _fail(f"sweep export: {e}")
    typer.echo(f"wrote {out}" + (f" — {info}" if info else ""))


@app.command()
def train(
    config: Path = typer.Argument(..., help="training config YAML (from `sweep export`)"),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="output folder (default: runs/<name>)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the newest checkpoint in the output folder"),
    merge: bool = typer.Option(False, "--merge", help="also write merged/: base + adapter as one 16-bit model"),
    merge_dtype: Optional[str] = typer.Option(None, "--merge-dtype", help="bfloat16 | float16 | float32 (default: 16-bit)"),
) -> None:
    """Train a config once (the trials' own code): checkpoints, --resume, loss curve, adapter, --merge."""
    s = _load(config)
    if s.search is not None:
        _fail(f"{config}: has a `search` section; export the best trial first: sweep export STUDY -o best.yaml")
    if merge_dtype not in (None, "bfloat16", "float16", "float32"):
        _fail(f"--merge-dtype is {merge_dtype!r}, but must be one of bfloat16, float16, float32")
    from sweep.spec import resolve_paths
    from trial_worker.entry import prepare_assets
    from trial_worker.entry import ProductionError, train as train_job

    job = prepare_assets(resolve_paths(s, config.parent).job(), config.parent)
    try:
        from sweep.record.tracking import make_train_callback

        run_dir = out or Path("runs") / s.name
        wandb_cb = make_train_callback(s, run_dir)
        train_job(job, run_dir, resume=resume, merge=merge, merge_dtype=merge_dtype, log=typer.echo,
                  callbacks=[wandb_cb] if wandb_cb else [])
    except ProductionError as e:
        _fail(f"sweep train: {e}")


@app.command()
def evaluate(
    target: Path = typer.Argument(..., help="a `sweep train` output folder, or a training config YAML with --adapter"),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="LoRA adapter folder (with a config YAML)"),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="folder for evaluation.md/.csv (default: the run folder)"),
    prompts: int = typer.Option(10, "--prompts", min=0, help="held-out prompts answered by both models"),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", min=1),
) -> None:
    """Base vs tuned on the held-out split: perplexity (same tokens and masking), answers side by side, EM/F1."""
    from trial_worker.entry import ProductionError, load_run

    if target.is_dir():
        try:
            job, adapter_dir = load_run(target)
        except ProductionError as e:
            _fail(f"sweep evaluate: {e}")
        adapter_dir = adapter or adapter_dir
        out = out or target
    else:
        if adapter is None:
            _fail("sweep evaluate: with a config YAML, give the trained adapter: --adapter RUN/adapter")
        from sweep.spec import resolve_paths
        from trial_worker.entry import prepare_assets

        s = _load(target)
        job, adapter_dir = prepare_assets(resolve_paths(s, target.parent).job(), target.parent), adapter
        out = out or adapter.parent
    from trial_worker.entry import compare

    summary = compare(job, adapter_dir, out, num_prompts=prompts, max_new_tokens=max_new_tokens)
    b, t = summary["base"], summary["tuned"]
    typer.echo(f"base:  val_loss {b['val_loss']:.4f}  ppl {b['ppl']:.3f}  exact {b['exact']:.2f}  F1 {b['f1']:.2f}")
    typer.echo(f"tuned: val_loss {t['val_loss']:.4f}  ppl {t['ppl']:.3f}  exact {t['exact']:.2f}  F1 {t['f1']:.2f}")
    typer.echo(f"wrote {out / 'evaluation.md'} and {out / 'evaluation.csv'}")


@app.command("export-gguf")
def export_gguf(
    run: Path = typer.Argument(..., help="a `sweep train` output folder (its merged/ model; merged now if missing) or a model folder"),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="the .gguf file to write (default: RUN/<RUN name>.gguf)"),
    out_type: str = typer.Option("auto", "--type", help="auto (the checkpoint's own dtype) | f16 | bf16 | f32 | q8_0"),
) -> None:
    """Write a merged Llama model as one GGUF file (llama.cpp, Ollama); it loads back in transformers too."""
    from trial_worker.entry import GGUFExportError, export_run_gguf

    if not run.exists():
        _fail(f"sweep export-gguf: {run} does not exist")
    try:
        export_run_gguf(run, out, out_type=out_type, log=typer.echo)
    except GGUFExportError as e:
        _fail(f"sweep export-gguf: {e}")
    except ImportError as e:
        _fail(f"sweep export-gguf: {e}; install it with: pip install 'sweep[smollm2]' (or pip install gguf)")


@app.command()
def chat(
    model: Path = typer.Argument(..., help="a merged model folder, or a `sweep train` output folder"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind (default: this machine only)"),
    port: int = typer.Option(7860, "--port"),
    system: Optional[str] = typer.Option(None, "--system",
                                         help="system prompt (default: the one the run's training chats share, if any)"),
) -> None:
    """A small Gradio chat with a tuned model: streaming replies; system prompt, temperature, max new tokens as controls."""
    from trial_worker.entry import serve

    try:
        serve(model, host=host, port=port, system_prompt=system)
    except ImportError as e:
        _fail(f"sweep chat: {e}")


@app.command()
def report(
    study: str = typer.Argument(..., help="study name or spec file"),
    out: Path = typer.Option(Path("report.html"), "-o", "--out", help="the HTML file to write"),
    storage: Optional[str] = typer.Option(None, "--storage", help=STORAGE_HELP),
) -> None:
    """Write one self-contained HTML report of a study (charts + leaderboard; opens with no server or network)."""
    from sweep.record.report import write_report

    st = _open_study(study, storage)
    write_report(st, out)
    typer.echo(f"wrote {out} ({len(st.trials)} trials)")


@app.command()
def dashboard(
    study: str = typer.Argument(..., help="study name or spec file"),
    storage: Optional[str] = typer.Option(None, "--storage", help=STORAGE_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind (default: this machine only)"),
    port: int = typer.Option(8080, "--port", help="port of optuna-dashboard"),
    wandb: bool = typer.Option(False, "--wandb", help="build the W&B comparison workspace instead, and publish it"),
    entity: Optional[str] = typer.Option(None, "--entity", help="W&B entity (default: the spec's tracking.wandb.entity)"),
    project: Optional[str] = typer.Option(None, "--project", help="W&B project (default: the study's)"),
    save_json: Optional[Path] = typer.Option(None, "--save-json", help="with --wandb: write the workspace as JSON, do not publish"),
) -> None:
    """Serve optuna-dashboard for the study on localhost, or (--wandb) build and publish its W&B workspace."""
    st = _open_study(study, storage)
    if wandb:
        from dashboards.wandb_workspace import build_workspace, publish, workspace_json

        wcfg = ((st.user_attrs.get("spec") or {}).get("tracking") or {}).get("wandb") or {}
        entity = entity or wcfg.get("entity") or st.user_attrs.get("wandb_entity")
        project = project or st.user_attrs.get("wandb_project") or wcfg.get("project") or "sweep"
        if save_json is None and not entity:
            _fail("sweep dashboard --wandb: no W&B entity; give --entity or set tracking.wandb.entity in the spec")
        w = build_workspace(st, entity=entity or "ENTITY", project=project)
        if save_json is not None:
            save_json.write_text(workspace_json(w) + "\n")
            typer.echo(f"wrote {save_json} (workspace {w.name!r} for {entity or 'ENTITY'}/{project}; not published)")
            return
        typer.echo(f"published {publish(w)}")
        return
    from dashboards.optuna_dashboard import serve, study_url
    from sweep._compat.optuna import study_id
    from sweep.record import open_storage, resolve_study

    url, _ = resolve_study(study, storage)
    typer.echo(f"optuna-dashboard: {study_url(study_id(st), host, port)}  (Ctrl-C to stop)")
    serve(open_storage(url, create=False), host=host, port=port)


@app.command("wandb-sync")
def wandb_sync(
    study: str = typer.Argument(..., help="study name or spec file"),
    storage: Optional[str] = typer.Option(None, "--storage", help=STORAGE_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="list the offline runs, upload nothing"),
) -> None:
    """Upload a study's offline W&B runs (key from WANDB_API_KEY or `wandb login`)."""
    from sweep.record.tracking import sync_offline

    st = _open_study(study, storage)
    root = st.user_attrs.get("wandb_dir")
    if not root:
        _fail(f"sweep wandb-sync: study {st.study_name!r} has no W&B runs (tracking.wandb.mode was disabled)")
    runs = sync_offline(root, project=st.user_attrs.get("wandb_project"), entity=st.user_attrs.get("wandb_entity"),
                        dry_run=dry_run)
    for r in runs:
        typer.echo(str(r))
    typer.echo(f"{len(runs)} offline runs under {root}" + (" (dry run: nothing uploaded)" if dry_run else " synced"))


def _open_study(ref: str, storage: Optional[str]):
    """A study from its name (registry), or a spec path (its storage), with --storage winning."""
    from sweep.record import StudyNotFound, load_study, resolve_study

    if ref.endswith((".yaml", ".yml")) and Path(ref).exists():
        from sweep.spec import default_storage

        s = _load(Path(ref))
        url = storage or s.storage or default_storage(s, ref)
        name = s.name
    else:
        try:
            url, name = resolve_study(ref, storage)
        except StudyNotFound as e:
            _fail(f"sweep: {e}")
    try:
        return load_study(url, name)
    except StudyNotFound as e:
        _fail(f"sweep: {e}")


def main() -> None:
    """Console entry point."""
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
