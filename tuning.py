"""`--mode=tune`: a hyper-parameter search on Optuna whose trials are ordinary training runs.

Each trial calls `main()` with `--mode=train` and the values the sampler chose, so it writes an ordinary run folder
(config.json, logs, checkpoint, per-impression records) under `<output_dir>/tune/<study>/`, which `--mode=dev`,
`--mode=compare` and `--mode=aggregate --output_dir=<that folder>` read like any other run. The study lives in
Optuna's RDB storage: SQLite in the study folder by default, or a database server (`--tune_storage=<URL>`) shared by
workers on many machines; nothing here keeps state of its own.

Resuming: a trial interrupted by Ctrl-C queues its own retry (same values, `--resume` of its run folder) before it
is marked failed; a worker that died without a word leaves a trial whose heartbeat stops, and the next worker to
start a trial marks it failed and queues its retry the same way. The study counts a retried trial once, so
`--n_trials` trials are finished in all, however often the study was stopped.

Pruning: `PruningCallback` reports the dev metric after each epoch (`trial.report`); when the pruner says stop, the
run ends cleanly after that epoch's checkpoint and the trial is recorded as pruned (`tune_trial.json` in its run
folder says so too).
"""
from __future__ import annotations

import json
import math
import shlex
from pathlib import Path
from typing import Any, Callable, Sequence

import scorer
import util
from trainer import Callback, TrainingInterrupted

# Flags a search space may not vary: they say what to run and where, not how to train.
NOT_TUNABLE = {"mode", "output_dir", "resume", "seeds", "config_file", "dev_model_path", "test_model_path", "runs",
               "impression_id", "explain_output", "compare_output", "init_from"}
HEARTBEAT_SECONDS = 30  # a running trial's worker writes a heartbeat this often; after 4 missed ones it is stale
TRIAL_FILE = "tune_trial.json"  # in a trial's run folder: study, trial number, state, value, values chosen
PICTURES = ("optimization_history", "param_importances", "parallel_coordinate")


def metric_direction(metric: str) -> str:
    """Every dev metric the evaluation writes is better when higher; a loss would be minimised."""
    return "minimize" if metric.endswith("loss") else "maximize"


def _import_optuna():
    try:
        import optuna
    except ImportError:
        raise ImportError("--mode=tune needs Optuna: pip install optuna (it is in requirements.txt)") from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial's error is printed by main.cli itself
    return optuna


# ----------------------------------------------------------------------------------------------------------
# The search space file
# ----------------------------------------------------------------------------------------------------------

def read_space_file(path: str) -> dict[str, Any]:
    """The file's mapping flag -> spec, or a one-line error naming the file."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--tune_space {file}: no such file")
    text = file.read_text()
    try:
        if file.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--tune_space {file}: not valid JSON (line {e.lineno}: {e.msg})") from None
    except Exception as e:  # yaml.YAMLError: its first line names the place
        raise ValueError(f"--tune_space {file}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not data:
        raise ValueError(f"--tune_space {file}: empty; give at least one flag, e.g. lr: {{low: 1.0e-5, high: 1.0e-3, "
                         f"log: true}}")
    if not isinstance(data, dict):
        raise ValueError(f"--tune_space {file}: expected a mapping of flag -> range or choices, got "
                         f"{type(data).__name__}")
    return data


def _number(value: Any, where: str) -> float:
    """YAML 1.1 reads 1e-5 (no dot) as a string: accept any number spelled as text."""
    if isinstance(value, bool):
        raise ValueError(f"{where}: expected a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected a number, got {value!r}") from None


def _flag_kind(action) -> str:
    """categorical (choices, switches, text), int or float: what a search space may ask of the flag."""
    if action.choices is not None or action.type not in (int, float) or action.nargs is not None:
        return "categorical"
    return "int" if action.type is int else "float"


def parse_space(data: dict[str, Any], file: str, parser) -> dict[str, dict[str, Any]]:
    """Each entry checked and normalised: {"choices": [...]} or {"low", "high", "log", "step", "int"}."""
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    space = {}
    for flag, spec in data.items():
        where = f"--tune_space {file}: {flag}"
        name = str(flag).lstrip("-")
        if name not in actions:
            raise ValueError(f"{where}: no such flag (python main.py --help lists them)")
        if name in NOT_TUNABLE or name.startswith("tune_") or name in ("n_trials", "tracker"):
            raise ValueError(f"{where}: says what to run or where, not how to train; it cannot be tuned")
        if not isinstance(spec, dict) or not spec:
            raise ValueError(f"{where}: expected {{low: .., high: ..[, log: true][, step: ..]}} or {{choices: [..]}}")
        extra = set(spec) - {"low", "high", "log", "step", "choices"}
        if extra:
            raise ValueError(f"{where}: unknown key(s) {sorted(extra)}; use low, high, log, step or choices")
        kind = _flag_kind(actions[name])
        if "choices" in spec:
            if set(spec) != {"choices"} or not isinstance(spec["choices"], list) or not spec["choices"]:
                raise ValueError(f"{where}: choices must be a non-empty list, alone")
            space[name] = {"choices": [_choice(actions[name], kind, c, where) for c in spec["choices"]]}
            continue
        if kind == "categorical":
            raise ValueError(f"{where}: --{name} takes a value from a set, not a number range; give choices: [...]")
        space[name] = _range(spec, kind, where)
    return space


def _choice(action, kind: str, value: Any, where: str) -> Any:
    if action.nargs == 0:  # a switch: --flag / --no-flag
        if not isinstance(value, bool):
            raise ValueError(f"{where}: --{action.dest} is a switch; its choices are true and false, not {value!r}")
        return value
    if kind in ("int", "float"):
        number = _number(value, where)
        if kind == "int" and number != int(number):
            raise ValueError(f"{where}: --{action.dest} takes whole numbers, not {value!r}")
        return int(number) if kind == "int" else number
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{where}: {value!r} is not a choice of --{action.dest} ({', '.join(map(str, action.choices))})")
    return value


def _range(spec: dict[str, Any], kind: str, where: str) -> dict[str, Any]:
    if "low" not in spec or "high" not in spec:
        raise ValueError(f"{where}: a range needs both low and high")
    low, high = _number(spec["low"], f"{where}.low"), _number(spec["high"], f"{where}.high")
    log, step = bool(spec.get("log", False)), spec.get("step")
    if not low < high:
        raise ValueError(f"{where}: low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise ValueError(f"{where}: a log scale needs low > 0")
    if log and step is not None:
        raise ValueError(f"{where}: give log or step, not both")
    if step is not None and not _number(step, f"{where}.step") > 0:
        raise ValueError(f"{where}: step must be > 0")
    if kind == "int":
        if low != int(low) or high != int(high) or (step is not None and float(step) != int(float(step))):
            raise ValueError(f"{where}: --{where.split(': ')[-1]} takes whole numbers; low, high and step must be too")
        return {"low": int(low), "high": int(high), "log": log, "step": int(float(step)) if step else 1, "int": True}
    return {"low": low, "high": high, "log": log, "step": float(step) if step is not None else None, "int": False}


def check_space_values(space: dict[str, dict[str, Any]], file: str, base_argv: list[str]) -> None:
    """Every end of every range and every choice must be a valid value with the other flags (e.g. --dropout_rate
    1.5 would fail only in the trial that drew it)."""
    from config import Config

    Config.from_args(base_argv)  # the other flags' own errors, under their own names
    for flag, spec in space.items():
        for value in spec["choices"] if "choices" in spec else (spec["low"], spec["high"]):
            try:
                Config.from_args([*base_argv, format_flag(flag, value)])
            except ValueError as e:
                lines = [x.strip() for x in str(e).splitlines() if x.strip() and not x.endswith("configuration:")]
                raise ValueError(f"--tune_space {file}: {flag}: the value {value!r} is refused: "
                                 f"{'; '.join(lines)}") from None


def grid_of(space: dict[str, dict[str, Any]], file: str) -> dict[str, list]:
    """The grid sampler's values: choices, or every step of a range."""
    grid = {}
    for flag, spec in space.items():
        if "choices" in spec:
            grid[flag] = spec["choices"]
        elif spec["step"] is not None and not spec["log"]:
            n = int(round((spec["high"] - spec["low"]) / spec["step"]))
            grid[flag] = [spec["low"] + i * spec["step"] for i in range(n + 1)]
            grid[flag] = [int(v) if spec["int"] else round(v, 12) for v in grid[flag]]
        else:
            raise ValueError(f"--tune_sampler=grid: --tune_space {file}: {flag} has neither choices nor a step (and "
                             f"no log scale); a grid needs a finite set of values")
    return grid


def suggest(trial, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    values = {}
    for flag, spec in space.items():
        if "choices" in spec:
            values[flag] = trial.suggest_categorical(flag, spec["choices"])
        elif spec["int"]:
            values[flag] = trial.suggest_int(flag, spec["low"], spec["high"], step=spec["step"], log=spec["log"])
        else:
            values[flag] = trial.suggest_float(flag, spec["low"], spec["high"], step=spec["step"], log=spec["log"])
    return values


def format_flag(flag: str, value: Any) -> str:
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    if isinstance(value, (list, tuple)):
        return f"--{flag}=" + ",".join(map(str, value))
    return f"--{flag}={value}"


# ----------------------------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------------------------

def base_argv(config) -> list[str]:
    """The flags the user typed that every trial trains with (not the tuning's own, nor where runs go)."""
    skip = NOT_TUNABLE | {"n_trials", "tracker"}
    return [format_flag(flag, config.values[flag]) for flag in sorted(config.explicit)
            if flag not in skip and not flag.startswith("tune_") and config.values[flag] is not None]


def study_folder(config) -> Path:
    name = config.tune_study or Path(config.tune_space).stem
    return Path(config.output_dir) / "tune" / name


def open_storage(config, folder: Path, on_stale: Callable):
    """Optuna's RDB storage with heartbeats (SQLite in the study folder unless --tune_storage), or a one-line
    error naming the URL."""
    optuna = _import_optuna()
    url = config.tune_storage or f"sqlite:///{(folder / 'study.db').resolve()}"
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}  # workers share one file
    import time
    import warnings

    for attempt in range(5):
        try:
            with warnings.catch_warnings():  # heartbeats are marked "experimental" since Optuna 2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_SECONDS,
                                                  grace_period=4 * HEARTBEAT_SECONDS,
                                                  heartbeat_stale_trial_callback=on_stale)
        except Exception as e:  # sqlalchemy's errors, a missing database driver: the first line says which
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            # Two workers creating a new database's tables together: the loser finds them made on its next try.
            if attempt < 4 and ("alembic_version" in first or "already exists" in first):
                time.sleep(1 + attempt)
                continue
            raise ValueError(f"--tune_storage {url}: cannot open the study storage ({type(e).__name__}: "
                             f"{first})") from None


def open_study(config, space: dict, sampler, pruner, storage, name: str, metric: str):
    """Create the study or load it; a study created with another space or metric is an error naming both."""
    optuna = _import_optuna()
    study = optuna.create_study(storage=storage, study_name=name, sampler=sampler, pruner=pruner,
                                direction=metric_direction(metric), load_if_exists=True)
    saved = study.user_attrs
    ours = {"search_space": json.dumps(space, sort_keys=True), "metric": metric}
    if not saved.get("search_space"):
        for key, value in ours.items():
            study.set_user_attr(key, value)
        return study
    if saved["search_space"] != ours["search_space"]:
        old, new = json.loads(saved["search_space"]), space
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise ValueError(f"--tune_space {config.tune_space}: study {name!r} was created with another search space "
                         f"(differs in: {', '.join(keys)}); use the original file or another --tune_study")
    if saved.get("metric") != metric:
        raise ValueError(f"--tune_metric {metric}: study {name!r} optimises {saved.get('metric')}; use that metric "
                         f"or another --tune_study")
    return study


def make_sampler(config, space: dict):
    optuna = _import_optuna()
    if config.tune_sampler == "grid":
        return optuna.samplers.GridSampler(grid_of(space, config.tune_space))
    if config.tune_sampler == "random":
        return optuna.samplers.RandomSampler()
    # Not seeded: workers started together would otherwise draw the same first trials.
    return optuna.samplers.TPESampler()


PRUNERS: dict[str, Callable[[Any], Any]] = {
    "median": lambda cfg: __import__("optuna").pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0),
    "hyperband": lambda cfg: __import__("optuna").pruners.HyperbandPruner(min_resource=1, max_resource=cfg.epoch),
    "none": lambda cfg: __import__("optuna").pruners.NopPruner(),
}


def retry_of(study, failed, run_dir: str | None) -> None:
    """Queue a failed trial again with its values; its run folder is resumed when it holds a finished epoch."""
    attrs = {"retry_of": failed.number}
    if run_dir and (Path(run_dir) / "last.pt").is_file():
        attrs["resume_run"] = run_dir
    study.enqueue_trial(failed.params, user_attrs=attrs)


def counted_trials(study) -> int:
    """Trials of the study, a trial that was retried counted once (by its retry)."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    return sum(t.number not in retried for t in trials)


# ----------------------------------------------------------------------------------------------------------
# Trials
# ----------------------------------------------------------------------------------------------------------

class PruningCallback(Callback):
    """Reports each epoch's dev metric to the trial and stops the run when the pruner says so. Only rank 0 talks to
    the study; its decision is broadcast, so every rank of a DDP trial stops after the same epoch."""

    def __init__(self, trial, metric: str):
        self.trial, self.metric = trial, metric

    def on_train_start(self, trainer, run) -> None:
        if trainer.runtime.is_main:
            self.trial.set_user_attr("run_dir", str(run.run_dir))
            for record in run.state.history:  # a resumed run: the epochs it had already done
                self.trial.report(scorer.criterion_value(record, self.metric), record["epoch"])

    def on_epoch_end(self, trainer, epoch: int, record: dict[str, Any]) -> None:
        prune = None
        if trainer.runtime.is_main:
            self.trial.report(scorer.criterion_value(record, self.metric), epoch)
            prune = self.trial.should_prune() and epoch < trainer.config.epoch
        if util.broadcast_object(prune, group=trainer.runtime.wait_group):
            import optuna

            raise optuna.TrialPruned(f"pruned after epoch {epoch}")


def write_trial_file(run_dir: str | None, record: dict[str, Any]) -> None:
    if run_dir and Path(run_dir).is_dir():
        util.write_lines_atomic(Path(run_dir) / TRIAL_FILE, [json.dumps(record, indent=1)])


def run_trial(trial, config, space: dict, argv: list[str], metric: str, callbacks: Sequence[Callback],
              send: Callable | None = None) -> float:
    """One trial: `main(--mode=train ...)` with the values drawn (or, for a retry, `--resume` of its run folder);
    under torchrun `send` hands the trial's flags to the other ranks first."""
    import optuna
    from main import main

    values = suggest(trial, space)
    resume = trial.user_attrs.get("resume_run")
    trial_argv = ["--mode=train", *argv, *(format_flag(f, v) for f, v in values.items()),
                  f"--output_dir={study_folder(config)}"] + ([f"--resume={resume}"] if resume else [])
    print(f"=== trial {trial.number}: {' '.join(format_flag(f, v) for f, v in values.items())}"
          + (f" (retry of trial {trial.user_attrs['retry_of']}, resuming {resume})" if resume else "") + " ===")
    record = {"study": trial.study.study_name, "trial": trial.number, "values": values, "metric": metric}
    if send is not None:
        send(("trial", trial_argv))
    try:
        result = main(trial_argv, callbacks=[*callbacks, PruningCallback(trial, metric)])
    except optuna.TrialPruned:
        write_trial_file(trial.user_attrs.get("run_dir"), {**record, "state": "pruned"})
        raise
    except (TrainingInterrupted, KeyboardInterrupt) as e:
        run_dir = str(e.run_dir) if getattr(e, "run_dir", None) else trial.user_attrs.get("run_dir")
        retry_of(trial.study, trial, run_dir)  # before optuna marks it failed: nothing is lost
        raise
    value = scorer.criterion_value(result["dev_metrics"], metric)
    write_trial_file(result["run_dir"], {**record, "state": "complete", "value": value})
    return value


def trial_command(config, argv: list[str], values: dict[str, Any]) -> str:
    args = ["--mode=train", *argv, *(format_flag(f, v) for f, v in values.items())]
    if "output_dir" in config.explicit:
        args.append(f"--output_dir={config.output_dir}")
    return "python main.py " + " ".join(shlex.quote(a) for a in args)


# ----------------------------------------------------------------------------------------------------------
# --mode=tune
# ----------------------------------------------------------------------------------------------------------

def prepare(config) -> dict[str, Any]:
    """Everything checked before the first trial: the space file, its values, the metric, the storage, the study."""
    from config import build_parser

    metric = config.tune_metric or config.dev_criterion
    argv = base_argv(config)
    space = parse_space(read_space_file(config.tune_space), config.tune_space, build_parser())
    check_space_values(space, config.tune_space, ["--mode=train", *argv])
    folder = study_folder(config)
    with util.writing_into(folder, "--output_dir", "the study"):
        folder.mkdir(parents=True, exist_ok=True)
    sampler, pruner = make_sampler(config, space), PRUNERS[config.tune_pruner](config)
    storage = open_storage(config, folder, lambda study, t: retry_of(study, t, t.user_attrs.get("run_dir")))
    study = open_study(config, space, sampler, pruner, storage, folder.name, metric)
    n_trials = config.n_trials
    if config.tune_sampler == "grid":
        size = math.prod(len(v) for v in grid_of(space, config.tune_space).values())
        if size < n_trials:
            print(f"note: the grid has {size} points: --n_trials {n_trials} -> {size}")
            n_trials = size
    return {"metric": metric, "argv": argv, "space": space, "folder": folder, "study": study, "n_trials": n_trials}


def tune(config, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Run trials until the study holds --n_trials (a retried trial counted once), then report the best. Under
    torchrun the job is one study worker: rank 0 talks to the study and hands each trial's flags to the other ranks
    over one process group kept for the whole study (`ddp_tune`)."""
    if util.dist_env()[2] > 1:
        return ddp_tune(config, callbacks)
    return run_study(config, prepare(config), callbacks)


def ddp_tune(config, callbacks: Sequence[Callback]) -> dict[str, Any]:
    """torchrun: rank 0 runs the study and broadcasts ("trial", argv) before each trial, ("end", None) after the
    last, ("error", text) when it cannot start; the other ranks train what they are sent. The pruning decision of
    each epoch is rank 0's, broadcast by `PruningCallback`."""
    import optuna

    from devices import setup_runtime, shutdown_runtime
    from main import main

    runtime = setup_runtime(config)
    send = lambda message: util.broadcast_object(message, group=runtime.wait_group)  # noqa: E731
    if runtime.is_main:
        try:
            setup = prepare(config)
        except Exception as e:
            send(("error", str(e)))
            raise
        setup["send"] = send
        out = run_study(config, setup, callbacks)  # on an error the process ends and torchrun stops the other ranks
        send(("end", None))
        shutdown_runtime(runtime)
        return out
    metric = config.tune_metric or config.dev_criterion
    while True:
        kind, payload = send(None)
        if kind == "error":
            raise ValueError(f"rank 0 could not start the study: {payload}")
        if kind == "end":
            break
        try:
            main(payload, callbacks=[*callbacks, PruningCallback(None, metric)])
        except optuna.TrialPruned:
            pass
    shutdown_runtime(runtime)
    return {}


def run_study(config, setup: dict[str, Any], callbacks: Sequence[Callback]) -> dict[str, Any]:
    study, metric, n_trials = setup["study"], setup["metric"], setup["n_trials"]
    done = counted_trials(study)
    print(f"study {study.study_name!r} ({setup['folder']}): {done} of {n_trials} trials exist; optimising dev "
          f"{metric} ({study.direction.name.lower()}), sampler {config.tune_sampler}, pruner {config.tune_pruner}")
    try:
        while counted_trials(study) < n_trials:
            study.optimize(lambda t: run_trial(t, config, setup["space"], setup["argv"], metric, callbacks,
                                               setup.get("send")), n_trials=1, catch=())
    except (TrainingInterrupted, KeyboardInterrupt):
        stop = TrainingInterrupted(setup["folder"], 1, f"study {study.study_name!r} interrupted: the trial that was "
                                   f"running is queued again (its run folder resumes where its last epoch ended)")
        stop.command = "python main.py --mode=tune " + " ".join(
            shlex.quote(a) for a in [*setup["argv"], *tune_flags(config)])
        raise stop from None
    return report(config, setup, study, callbacks)


def tune_flags(config) -> list[str]:
    return [format_flag(f, config.values[f]) for f in sorted(config.explicit)
            if (f.startswith("tune_") or f in ("n_trials", "output_dir", "seeds")) and config.values[f] is not None]


def report(config, setup: dict[str, Any], study, callbacks: Sequence[Callback]) -> dict[str, Any]:
    """The best trial's command, the pictures, and optionally the best values trained once per --seeds."""
    from optuna.trial import TrialState

    states = [t.state for t in study.get_trials(deepcopy=False)]
    counts = {s.name.lower(): states.count(s) for s in TrialState if states.count(s)}
    print(f"\nstudy {study.study_name!r}: {', '.join(f'{n} {s}' for s, n in counts.items())}")
    if not any(s == TrialState.COMPLETE for s in states):
        raise ValueError(f"study {study.study_name!r}: no trial completed (all pruned or failed); nothing to report")
    best = study.best_trial
    command = trial_command(config, setup["argv"], best.params)
    print(f"best trial {best.number}: dev {setup['metric']} {best.value:.4f} ({best.user_attrs.get('run_dir')})\n"
          f"its command: {command}")
    pictures = draw_pictures(study, setup["folder"] / "pictures")
    out: dict[str, Any] = {"study": study, "best": best, "command": command, "pictures": pictures,
                           "folder": str(setup["folder"]), "counts": counts}
    if config.seeds:
        from main import main

        seeds = ",".join(map(str, config.seeds))
        print(f"\n=== the best values once per seed ({seeds}) ===")
        argv = ["--mode=train", *setup["argv"], *(format_flag(f, v) for f, v in best.params.items()),
                f"--seeds={seeds}", f"--output_dir={setup['folder'] / 'best'}"]
        if setup.get("send"):
            setup["send"](("trial", argv))
        out["seeds"] = main(argv, callbacks=callbacks)
    return out


def draw_pictures(study, folder: Path) -> list[str]:
    """Optuna's matplotlib pictures as PNGs; one that cannot be drawn (e.g. importances of one trial) is a warning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis

    import warnings

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in PICTURES:
        try:
            with warnings.catch_warnings():  # Optuna marks these plots "experimental" on every call
                warnings.simplefilter("ignore")
                ax = getattr(vis, f"plot_{name}")(study)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            fig.savefig(folder / f"{name}.png", dpi=100)
            plt.close(fig)
            written.append(str(folder / f"{name}.png"))
        except Exception as e:  # a picture must never end a study
            print(f"WARNING: could not draw {folder / name}.png: {type(e).__name__}: {str(e).splitlines()[0]}")
    if written:
        print(f"wrote {', '.join(written)}")
    return written
