"""Entry point: `python main.py --mode={train,dev,test} ...` (see README). `main(argv)` is what tests call."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import util
from config import ARCHITECTURE_FLAGS, Config
from MIND_corpus import Corpus, CorpusError
from model import Model
from newsEncoders import get_news_encoder, resolve_plm_path
from trainer import (EvalResult, Trainer, evaluate, format_metrics, load_checkpoint, load_state, setup_runtime)

# Flags a user may change when evaluating a checkpoint (they do not change the model or the corpus arrays).
EVAL_OVERRIDABLE = ("data_dir", "device", "eval_batch_size", "num_workers", "progress", "seed", "mode",
                    "dev_model_path", "test_model_path", "output_dir")


def prepare_data(config) -> None:
    """The demo corpus is generated on first use; real MIND must be prepared by prepare_MIND_dataset.py."""
    if config.dataset == "demo":
        from prepare_MIND_dataset import ensure_demo

        ensure_demo(config.data_dir, num_news=config.demo_news, num_users=config.demo_users,
                    num_train_impressions=config.demo_train_impressions,
                    num_dev_impressions=config.demo_dev_impressions,
                    num_test_impressions=config.demo_test_impressions, seed=0)


def load_corpus(config, log=print) -> Corpus:
    """The corpus plus what the chosen encoders read: GloVe (training word encoders), PLM tokens, category GloVe."""
    prepare_data(config)
    news_cls = get_news_encoder(config.news_encoder)
    needs_glove = getattr(news_cls, "needs_glove", True) and config.mode == "train"
    corpus = Corpus(config, need_glove=needs_glove, log=log)
    if getattr(news_cls, "uses_plm", False):
        corpus.add_plm_tokens(resolve_plm_path(config.plm_model_name), config.plm_max_length)
    if config.use_category_glove:
        corpus.add_category_glove()
    return corpus


def train(config) -> dict[str, Any]:
    util.set_seed(config.seed)
    runtime = setup_runtime(config)
    corpus = load_corpus(config)
    model = Model(config, corpus.meta, corpus.news)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"model {config.model_name}: {n_params:,} trainable parameters")
    result = Trainer(config, corpus, model, runtime).train()
    return {"run_dir": str(result.run_dir), "checkpoint": str(result.checkpoint), "best_epoch": result.best_epoch,
            "dev_metrics": result.best_metrics, "history": result.history}


def config_for_checkpoint(config: Config, ckpt: dict[str, Any], path: str) -> Config:
    """The saved config, with only evaluation flags taken from the command line; a typed architecture flag
    that contradicts the checkpoint is an error (the weights would not fit, or would silently mean otherwise)."""
    saved = Config.from_dict(ckpt["config"])
    conflicts = [f"--{f}={config.values[f]!r} (checkpoint: {saved.values.get(f)!r})"
                 for f in sorted(config.explicit) if f in ARCHITECTURE_FLAGS and config.values[f] != saved.values.get(f)]
    if conflicts:
        raise ValueError(f"{path} was trained with other settings: " + ", ".join(conflicts)
                         + ". Drop these flags: dev/test rebuild the model from the checkpoint's config.")
    for flag in EVAL_OVERRIDABLE:
        if flag in config.explicit or flag in ("mode", "dev_model_path", "test_model_path"):
            saved.values[flag] = config.values[flag]
    saved.explicit = set(config.explicit)
    return saved


def evaluate_checkpoint(config: Config) -> dict[str, Any]:
    split = config.mode
    path = config.dev_model_path if split == "dev" else config.test_model_path
    ckpt = load_checkpoint(path)
    cfg = config_for_checkpoint(config, ckpt, path)
    runtime = setup_runtime(cfg)
    corpus = load_corpus(cfg)
    saved_sig = ckpt.get("corpus", {})
    now_sig = corpus.meta.signature()
    diff = {k: (saved_sig[k], now_sig[k]) for k in now_sig if k in saved_sig and saved_sig[k] != now_sig[k]}
    if diff:
        raise ValueError(f"{path} was trained on another corpus than {corpus.root} (checkpoint vs now: {diff}); "
                         f"use the --data_dir and data the model was trained on")
    model = Model(cfg, corpus.meta, corpus.news)
    load_state(model, ckpt, path)
    model.to(runtime.device)
    beh = corpus.behaviors(split)
    result = evaluate(model, beh, cfg, runtime, desc=split)
    out_dir = Path(path).parent / split
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"split": split, "checkpoint": str(path), "metrics": result.metrics,
                              "stats": beh["stats"], "seconds": round(result.seconds, 2)}
    ranks_list = np.split(result.ranks, result.offsets[1:-1])
    if split == "test":
        util.write_prediction(out_dir / "prediction.txt", result.impression_ids.tolist(),
                              [r.tolist() for r in ranks_list], zip_path=out_dir / "prediction.zip")
        report["prediction"] = str(out_dir / "prediction.zip")
    else:
        util.write_prediction(out_dir / "ranking.txt", result.impression_ids.tolist(), [r.tolist() for r in ranks_list])
        report["ranking"] = str(out_dir / "ranking.txt")
    if result.metrics.get("labelled"):
        labels_list = np.split(result.labels, result.offsets[1:-1])
        util.write_truth(out_dir / "truth.txt", result.impression_ids.tolist(), [lab.tolist() for lab in labels_list])
        report["truth"] = str(out_dir / "truth.txt")
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"{split} ({cfg.model_name}, {corpus.root / split}): {format_metrics(result.metrics)}")
    for key in ("prediction", "ranking", "truth"):
        if key in report:
            print(f"wrote {report[key]}")
    return report


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    config = Config.from_args(argv)
    if config.mode == "train":  # dev/test take their settings from the checkpoint: suggestions do not apply
        for note in config.notes:
            print(f"note: {note}")
        return train(config)
    return evaluate_checkpoint(config)


if __name__ == "__main__":
    try:
        main()
    except (CorpusError, FileNotFoundError, ValueError) as e:
        # A user mistake (bad file, wrong path, conflicting flags) gets its message, not a traceback.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
