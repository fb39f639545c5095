"""Entry point: `python main.py --mode={train,dev,test,aggregate,explain,compare,pretrain,tune} ...` (see README). `main(argv)` is
what tests call."""
from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

import beyond_accuracy
import demo_corpus
import news_data
import run_records
import scorer
import significance
import trackers
import util
from checkpoints import (
    LAST_CHECKPOINT,
    RunLock,
    load_checkpoint,
    load_state,
    load_training_state,
    resolve_checkpoint_path,
    is_best_model_file,
    records_name,
    resolve_resume,
    runs_base_dir,
)
from config import Config, architecture_flags
from devices import setup_runtime, shutdown_runtime
from evaluation import (
    evaluate,
    evaluation_provenance,
    format_metrics,
    format_ties,
    popularity_for,
    records_folder,
    rerank_and_measure,
    tie_rank_for,
    write_evaluation,
)
from MIND_corpus import Corpus, CorpusError
from model import Model, check_pairing
from newsEncoders import get_news_encoder, resolve_plm_path
from popularity import time_popularity_for
from trainer import Callback, Trainer, TrainingInterrupted

# Flags a user may change when evaluating a checkpoint (they do not change the model or the corpus arrays;
# --news_vectors: where the vector file is now, its content checked against the checkpoint's signature).
EVAL_OVERRIDABLE = ("data_dir", "cache_dir", "device", "eval_batch_size", "num_workers", "progress", "mode",
                    "dev_model_path", "test_model_path", "output_dir", "amp", "dist_timeout", "impression_id",
                    "explain_output", "tie_break", "beyond_metrics", "beyond_k", "beyond_embedding", "rerank",
                    "rerank_lambda", "news_vectors")
# Flags a user may change when resuming a run (`--resume`): where and how fast it runs, and how long it goes on.
# Everything else comes from the run's saved config, so the resumed epochs continue the same training.
RESUME_OVERRIDABLE = ("data_dir", "cache_dir", "device", "eval_batch_size", "num_workers", "progress", "amp", "dist_timeout",
                      "find_unused_parameters", "epoch", "early_stopping_epoch", "resume", "mode", "output_dir",
                      "log_every", "tensorboard", "plot", "compile", "tracker", "news_vectors")


def rank0_print(*args, **kwargs) -> None:
    """print on the main process only (torchrun starts one process per GPU, all running this file)."""
    if util.dist_env()[0] == 0:
        print(*args, **kwargs)


def prepare_data(config) -> None:
    """The demo corpus is generated on first use; real MIND must be prepared by prepare_MIND_dataset.py.

    An existing demo corpus is never replaced: typed --demo_* flags must match it (else an error naming both
    settings), untyped ones take its values (a corpus made by prepare_MIND_dataset.py with other sizes is used as
    it is), and the config records them, so config.json names the corpus the run used. Evaluating a checkpoint
    or resuming a run asks for the saved settings: they name the corpus the model was trained on."""
    if config.dataset == "demo":
        strict = config.mode not in ("train", "pretrain") or bool(config.resume)  # new runs adopt the corpus
        flags = demo_corpus.DEMO_FLAG_NAMES  # generator argument -> main.py flag
        asked = {name: config.values[flag] for name, flag in flags.items() if strict or flag in config.explicit}
        util.check_folder(config.data_dir, "--data_dir")
        with util.writing_into(config.data_dir, "--data_dir", "the demo corpus"):
            root = demo_corpus.ensure_demo(config.data_dir, seed=asked.pop("seed", None), **asked)
        saved = demo_corpus.demo_settings(root) or {}
        have = {**saved.get("sizes", {}), "seed": saved.get("seed")}
        adopted = [f"--{flag}={have[name]}" for name, flag in flags.items()
                   if have.get(name) is not None and config.values[flag] != have[name]]
        for name, flag in flags.items():
            if have.get(name) is not None:
                config.values[flag] = have[name]
        if adopted:
            rank0_print(f"note: using the demo corpus in {root} as it is ({' '.join(adopted)}; type --demo_* flags "
                        f"to ask for other settings)")
    elif not news_data.is_mind(config.dataset):  # EB-NeRD, xMIND, Adressa: converted once from the raw files
        with util.writing_into(config.data_dir, "--data_dir", "the converted corpus"):
            news_data.get_dataset(config.dataset).ensure(config.data_dir, config.news_language, log=rank0_print)


MODE_SPLITS = {"train": ("train", "dev"), "dev": ("dev",), "test": ("test",), "explain": ("dev",), "pretrain": ("train",)}


def load_corpus(config, log=print) -> Corpus:
    """The corpus plus what the chosen encoders read: GloVe (training word encoders), PLM tokens, category GloVe."""
    prepare_data(config)
    news_cls = get_news_encoder(config.news_encoder)
    needs_glove = news_cls.needs_glove and config.mode in ("train", "pretrain")  # a pretraining starts from GloVe too
    needs_entities = bool({"title_entity", "abstract_entity"} & set(news_cls.features))  # KCNN: a warning without vectors
    corpus = Corpus(config, root=news_data.corpus_root(config), need_glove=needs_glove, log=log,
                    need_entities=needs_entities)
    note = news_data.get_dataset(config.dataset).word_vector_note(config.news_language)
    if note and news_cls.needs_glove:
        log(f"note: {note}")
    if news_cls.uses_plm:
        corpus.add_plm_tokens(resolve_plm_path(config.plm_model_name), config.plm_max_length,
                              config.plm_text_template)
    if config.use_category_glove:
        corpus.add_category_glove()
    graph_size = news_cls.click_graph_size(config)
    if graph_size:
        corpus.add_click_graph(graph_size)  # after the train split is readable: the graph is built from it
    # The splits this mode reads, parsed and checked before any model is built: a missing, empty or unusable split
    # fails in seconds, naming its file, not after a PLM has loaded.
    for split in MODE_SPLITS.get(config.mode, ()):
        corpus.behaviors(split)
    return corpus


def load_corpus_distributed(config, runtime, log=print) -> Corpus:
    """`load_corpus`, first on one process per node (it may generate the demo and build the on-disk cache), then on
    the others, which find the cache built and memory-map it."""
    with util.first_then_others(runtime.is_local_main, runtime.wait_group):
        return load_corpus(config, log=log if runtime.is_main else (lambda *a, **k: None))


def check_corpus(ckpt: dict[str, Any], corpus: Corpus, path) -> None:
    saved_sig = ckpt.get("corpus", {})
    now_sig = corpus.meta.signature()
    diff = {k: (saved_sig[k], now_sig[k]) for k in now_sig if k in saved_sig and saved_sig[k] != now_sig[k]}
    if diff:
        raise ValueError(f"{path} was trained on another corpus than {corpus.root} (checkpoint vs now: {diff}); "
                         f"use the --data_dir and data the model was trained on")


def config_from_saved(config: Config, ckpt: dict[str, Any], overridable: Sequence[str], always: Sequence[str],
                      conflicting: Callable[[str], bool], saved_name: str = "run") -> tuple[Config, list[str]]:
    """A run's saved config with the typed `overridable` flags (and every `always` one) taken from the command line.

    Returns it with the typed flags for which `conflicting(flag)` holds and whose value differs from the saved one
    (`--flag=new (<saved_name>: old)`): the caller turns a non-empty list into its own error message."""
    saved = Config.from_dict(ckpt["config"])
    conflicts = [f"--{f}={config.values[f]!r} ({saved_name}: {saved.values.get(f)!r})" for f in sorted(config.explicit)
                 if conflicting(f) and config.values[f] != saved.values.get(f)]
    for flag in overridable:
        if flag in config.explicit or flag in always:
            saved.values[flag] = config.values[flag]
    saved.explicit = set(config.explicit)
    return saved, conflicts


def config_for_resume(config: Config, ckpt: dict[str, Any], path) -> Config:
    """The run's saved config; typed flags may change only RESUME_OVERRIDABLE ones (others are an error)."""
    saved_epoch = ckpt["config"].get("epoch")
    cfg, conflicts = config_from_saved(config, ckpt, RESUME_OVERRIDABLE, ("resume", "mode"),
                                       lambda f: f not in RESUME_OVERRIDABLE)
    if conflicts:
        raise ValueError(f"--resume {path}: the run was trained with other settings: " + ", ".join(conflicts)
                         + ". Drop these flags (a resumed run keeps its config; may change: "
                         + ", ".join(f"--{f}" for f in RESUME_OVERRIDABLE if f not in ("resume", "mode")) + ")")
    if cfg.epoch != saved_epoch:
        rank0_print(f"note: --epoch {saved_epoch} -> {cfg.epoch}: the learning-rate schedule is re-planned "
                    f"over the new total")
    return cfg


def print_notes(config: Config, suggestions: bool = True) -> None:
    """The config's notes; without `suggestions` only config-file overrides (a checkpoint's or resumed run's
    saved config wins over per-dataset suggestions, so printing them would mislead)."""
    for note in config.notes:
        if suggestions or "overrides" in note:
            rank0_print(f"note: {note}")


_HF_BARS_OFF = False  # transformers' progress bars were turned off here (--no-progress)


def follow_progress_flag(config) -> None:
    """transformers' own progress bars (e.g. "Loading weights" of a PLM) follow --progress / --no-progress."""
    global _HF_BARS_OFF
    if not getattr(get_news_encoder(config.news_encoder), "uses_plm", False):
        return  # no PLM: transformers is not even imported
    from transformers.utils import logging as hf_logging

    if not config.progress:
        hf_logging.disable_progress_bar()
        _HF_BARS_OFF = True
    elif _HF_BARS_OFF:  # an earlier call in this process turned them off
        hf_logging.enable_progress_bar()
        _HF_BARS_OFF = False


def resume_command(config: Config, run_dir: Path) -> str:
    """The command that continues `run_dir`: --resume plus the typed flags a resumed run may change (the rest comes
    from the run's saved config)."""
    args = ["--mode=train", f"--resume={run_dir}"]
    for flag in RESUME_OVERRIDABLE:
        if flag in ("resume", "mode") or flag not in config.explicit or config.values.get(flag) is None:
            continue
        value = config.values[flag]
        args.append((f"--{flag}" if value else f"--no-{flag}") if isinstance(value, bool) else f"--{flag}={value}")
    _, _, world_size = util.dist_env()
    launcher = (f"torchrun --nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', world_size)} main.py"
                if world_size > 1 else "python main.py")
    return launcher + " " + " ".join(shlex.quote(a) for a in args)


def train(config, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    resume_path = resolve_resume(config.resume, config.output_dir, config.dataset, config.model_name)
    ckpt = None
    if resume_path is not None:
        RunLock(resume_path.parent).check()  # a run being trained by another process: stop before loading data
        ckpt = load_training_state(resume_path)
        print_notes(config, suggestions=False)
        config = config_for_resume(config, ckpt, resume_path)
    else:
        runs_base_dir(config.output_dir, config.dataset, config.model_name, keep=False)  # unwritable: fail first
        print_notes(config)
    if config.resume == "auto" and resume_path is None:
        rank0_print(f"note: --resume auto: no run with a last.pt under {config.output_dir}/{config.dataset}/"
                    f"{config.model_name}/; starting a new run")
    runtime = setup_runtime(config)
    util.set_seed(config.seed)
    follow_progress_flag(config)
    corpus = load_corpus_distributed(config, runtime)
    if ckpt is not None:
        check_corpus(ckpt, corpus, resume_path)
    model = Model(config, corpus.meta, corpus.news, time_popularity_for(config, corpus))
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rank0_print(f"model {config.model_name}: {n_params:,} trainable parameters")
    if config.init_from and ckpt is None:
        init_from_pretraining(config, corpus, model)
    try:
        result = Trainer(config, corpus, model, runtime, resume=ckpt, resume_path=resume_path,
                         callbacks=[*callbacks, *trackers.for_run(config)]).train()
    except TrainingInterrupted as e:
        if e.run_dir is not None:
            e.command = resume_command(config, e.run_dir)
        raise
    shutdown_runtime(runtime)
    return {"run_dir": str(result.run_dir), "checkpoint": str(result.checkpoint), "best_epoch": result.best_epoch,
            "dev_metrics": result.best_metrics, "history": result.history}


def init_from_pretraining(config: Config, corpus: Corpus, model: Model) -> None:
    """--init_from: the news and user encoder weights of a --mode=pretrain checkpoint (same corpus, same encoder
    architecture, else an error naming what differs)."""
    from pretraining import load_pretrained_encoders

    path = resolve_checkpoint_path(config.init_from, "--init_from", log=rank0_print)
    init = load_checkpoint(path)
    check_corpus(init, corpus, path)
    loaded = load_pretrained_encoders(model, init, path, architecture_flags(config.values), config.init_from_partial)
    tasks = init.get("model_settings", {}).get("pretrain_tasks")
    rank0_print(f"--init_from {path}: {loaded.describe()}"
                + (f" (pretrained with {','.join(tasks)}, epoch {init.get('epoch')})" if tasks else "")
                + "; the click predictor starts afresh")


def pretrain(config: Config, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """--mode=pretrain: the encoders trained on click sequences (pretraining.py), saved in a pretrain#<n> run."""
    from pretraining import PretrainModel, PretrainTrainer

    runs_base_dir(config.output_dir, config.dataset, config.model_name, keep=False)  # unwritable: fail first
    print_notes(config)
    runtime = setup_runtime(config)
    util.set_seed(config.seed)
    follow_progress_flag(config)
    corpus = load_corpus_distributed(config, runtime)
    model = PretrainModel(config, corpus.meta, corpus.news)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rank0_print(f"pretraining {config.model_name} ({config.pretrain_tasks}): {n_params:,} trainable parameters")
    try:
        result = PretrainTrainer(config, corpus, model, runtime,
                                 callbacks=[*callbacks, *trackers.for_run(config)]).train()
    except TrainingInterrupted as e:
        e.command = None  # a pretraining run is not resumed: start it again
        raise
    shutdown_runtime(runtime)
    return {"run_dir": str(result.run_dir), "checkpoint": str(result.checkpoint), "best_epoch": result.best_epoch,
            "metrics": result.best_metrics, "history": result.history}


def config_for_checkpoint(config: Config, ckpt: dict[str, Any], path: str) -> Config:
    """The saved config, with only evaluation flags taken from the command line; a typed architecture flag
    that contradicts the checkpoint is an error (the weights would not fit, or would silently mean otherwise)."""
    shaping = architecture_flags(ckpt["config"])
    cfg, conflicts = config_from_saved(config, ckpt, EVAL_OVERRIDABLE, ("mode", "dev_model_path", "test_model_path"),
                                       lambda f: f in shaping, saved_name="checkpoint")
    if conflicts:
        raise ValueError(f"{path} was trained with other settings: " + ", ".join(conflicts)
                         + ". Drop these flags: dev/test rebuild the model from the checkpoint's config.")
    return cfg


def evaluate_checkpoint(config: Config) -> dict[str, Any]:
    """Dev/test on a checkpoint; under torchrun the work is sharded and rank 0 writes the files."""
    split = config.mode
    flag = f"--{split}_model_path"
    path = resolve_checkpoint_path(config.dev_model_path if split == "dev" else config.test_model_path, flag,
                                   log=rank0_print)
    ckpt = load_checkpoint(path, fine_tuned_for=flag)
    cfg = config_for_checkpoint(config, ckpt, path)
    runtime = setup_runtime(cfg)
    follow_progress_flag(cfg)
    corpus = load_corpus_distributed(cfg, runtime)
    check_corpus(ckpt, corpus, path)
    model = Model(cfg, corpus.meta, corpus.news, time_popularity_for(cfg, corpus))
    load_state(model, ckpt, path)
    model.to(runtime.device)
    beh = corpus.behaviors(split)
    result = evaluate(model, beh, cfg, runtime, desc=split,
                      tie_rank=tie_rank_for(cfg, corpus.behaviors("train"), model.news_num),
                      keep_scores=cfg.rerank != "none" or cfg.beyond_embedding == "model")
    report: dict[str, Any] = {"split": split, "checkpoint": str(path), "metrics": result.metrics,
                              "ties": result.ties, "stats": beh["stats"], "seconds": round(result.seconds, 2)}

    def measure_and_write() -> None:
        beyond = rerank_and_measure(cfg, corpus, beh, result, corpus.behaviors("train"))  # re-ranks result
        report["metrics"] = result.metrics
        write_evaluation_report(cfg, corpus, path, ckpt, result, beh, report, flag, model.news_num, beyond)

    # The other ranks wait for the files; a rank-0 failure (a full disk) stops them with one line each.
    util.on_main_rank(measure_and_write, runtime.is_main, runtime.wait_group, f"writing the {split} records")
    shutdown_runtime(runtime)
    return report


def checkpoint_role(path: Path, ckpt: dict[str, Any]) -> tuple[bool, str]:
    """(whether `path` is its run's best-model file, the words that say which checkpoint it is)."""
    best = is_best_model_file(path)
    epoch = ckpt.get("epoch")
    what = ("the run's best epoch" if best else "the training state of the last finished epoch"
            if path.name == LAST_CHECKPOINT else "not the run's best-model file")
    return best, f"{path} (epoch {epoch}, {what})"


def write_evaluation_report(cfg: Config, corpus: Corpus, path: Path, ckpt: dict[str, Any], result, beh,
                            report: dict[str, Any], flag: str, news_num: int, beyond=None) -> None:
    """Rank 0 of --mode=dev/test: the records in the checkpoint's own records folder (`evaluation.records_folder`:
    never over another checkpoint's or another evaluation's records), and what was evaluated and written."""
    split = report["split"]
    best, which = checkpoint_role(path, ckpt)
    provenance = evaluation_provenance(path, ckpt, split, cfg.tie_break)
    reranked = f"{cfg.rerank}{cfg.rerank_lambda:g}" if cfg.rerank != "none" else ""
    if reranked:  # the model's own records stay as they are: a re-ranked evaluation has a folder of its own
        provenance["rerank"] = reranked
    out_dir = records_folder(path, provenance, ckpt["config"].get("tie_break", "popularity"))
    default = path.parent / records_name(path, split)
    report.update({"folder": str(out_dir), "provenance": provenance})
    pop = None
    if result.per_impression is not None:
        pop = popularity_for(cfg, corpus.behaviors("train"), beh, news_num)
        report["popularity_metrics"] = scorer.mean_metrics(pop)
    model_name = cfg.model_name + (f"+{reranked}" if reranked else "")
    # "seed": the training run's (--seed is not an evaluation flag); compare pairs records by it
    meta = {"split": split, "dataset": cfg.dataset, "corpus": str(corpus.root), "model": model_name,
            "run": Path(path).parent.name, "seed": cfg.seed, "epoch": ckpt.get("epoch"), "checkpoint": str(path),
            "tie_break": cfg.tie_break, "written_by": f"--mode={split}"}
    with util.writing_into(out_dir, flag, f"the {split} records"):
        if split == "test":  # a leaderboard's own file, where the dataset has one (EB-NeRD's predictions.zip)
            out_dir.mkdir(parents=True, exist_ok=True)
            ranks_list = np.split(result.ranks, result.offsets[1:-1])
            report.update(news_data.get_dataset(cfg.dataset).write_submission(
                corpus.root, out_dir, result.impression_ids.tolist(), ranks_list))
        if beyond is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            report["beyond"] = beyond.summary()
            report["per_impression_beyond"] = str(beyond_accuracy.write_records(
                out_dir, beyond, beh, {"split": split, "dataset": cfg.dataset, "model": model_name,
                                       "run": Path(path).parent.name, "seed": cfg.seed, "checkpoint": str(path)}))
        written = write_evaluation(out_dir, result, beh, pop, report, meta)
    print(f"evaluated {which}")
    if out_dir != default:
        print(f"note: {default} holds the records of another evaluation (another checkpoint, epoch or "
              f"--tie_break): they are kept, and this one goes to {out_dir}")
    print(f"{split} ({cfg.model_name}, {corpus.root / split}): {format_metrics(result.metrics)}")
    if result.metrics.get("rerank"):
        print(f"{split}: ranks re-ranked by --rerank={cfg.rerank} --rerank_lambda={cfg.rerank_lambda} (the metrics "
              f"above and the files are of the re-ranked lists; {result.metrics['kept_model_order']} impressions "
              f"kept the model's order: nothing to calibrate to)")
    if format_ties(result.ties, split):
        print(format_ties(result.ties, split))
    if beyond is not None:
        print(f"beyond accuracy, {split} (top-k of each ranking; docs/beyond-accuracy.md):\n"
              f"{beyond_accuracy.format_table(beyond)}")
    if pop is not None:
        print(f"popularity baseline, {split}: {format_metrics(report['popularity_metrics'])}")
    else:
        print(f"note: the {split} split has no labels: no per-impression metrics written (--mode=compare needs "
              f"labelled impressions)")
    if "prediction" in report:
        print(f"wrote {out_dir / 'prediction.txt'} and {report['prediction']} "
              + ("(the file to upload)" if "submission" not in report else "(MIND's format, the corpus's ids)"))
    if "submission" in report:
        print(f"wrote {report['submission']} (the file to upload to {cfg.dataset}'s leaderboard)")
    for key in [*written, *(["per_impression_beyond"] if beyond is not None else [])]:
        print(f"wrote {report[key]}")


def aggregate(config: Config) -> dict[str, Any]:
    """`--mode=aggregate`: every finished run under `<output_dir>/<dataset>/` (all datasets unless --dataset is
    typed), grouped by model, as mean ± std per metric; printed as markdown and written as aggregate.md/.tsv."""
    dataset = config.dataset if "dataset" in config.explicit else None
    records = run_records.collect_runs(config.output_dir, dataset)
    runs = [r for r in records if "incomplete" not in r]
    if not runs:
        raise FileNotFoundError(f"no finished run (a run folder with config.json and dev_log.jsonl) under "
                                f"{Path(config.output_dir) / (dataset or '')}; train with --mode=train first")
    markdown, tsv = run_records.aggregate_runs(records)
    paired_md, paired_tsv, notes = significance.seed_differences(records)
    if paired_md:
        markdown += "\n\nPaired by seed (B − A over the seeds both models were trained with, in percentage points):\n\n" \
            + paired_md
    beyond_md, beyond_tsv = beyond_accuracy.aggregate_table(records, config.output_dir)
    if beyond_md:
        markdown += "\n\nBeyond accuracy (from --mode=dev / --mode=test of each run; not in %):\n\n" + beyond_md
    out = Path(config.output_dir) / (dataset or "")
    if beyond_tsv:
        util.write_lines_atomic(out / "aggregate_beyond.tsv", beyond_tsv.splitlines())
    util.write_lines_atomic(out / "aggregate.md", markdown.splitlines())
    util.write_lines_atomic(out / "aggregate.tsv", tsv.splitlines())
    written = [out / "aggregate.md", out / "aggregate.tsv"]
    if beyond_tsv:
        written.append(out / "aggregate_beyond.tsv")
    if paired_tsv:
        util.write_lines_atomic(out / "aggregate_paired.tsv", paired_tsv.splitlines())
        written.append(out / "aggregate_paired.tsv")
    print(markdown)
    differing = run_records.label_configurations(runs)
    print("\nruns are grouped by configuration: one row per dataset, model and configuration (every setting of a "
          "run's config.json except the seed, file locations and how it ran, e.g. --device; docs/training.md lists "
          "them); runs of different configurations are never pooled")
    for (ds, model), keys in sorted(differing.items()):
        count = len({r["group"] for r in runs if (r["dataset"], r["model"]) == (ds, model)})
        print(f"note: {ds}/{model}: {count} configurations, told apart by "
              f"{', '.join('--' + k for k in keys)} (a row each)")
    for note in notes:
        print(f"note: {note}")
    incomplete = [r["incomplete"] for r in records if "incomplete" in r]
    if incomplete:
        print(f"\n{len(incomplete)} run folder(s) without a finished epoch, left out: {', '.join(incomplete)}")
    print("\nmetrics in %, mean ± sample std over runs [95% confidence interval of the mean, t-distribution] (best "
          "dev epoch of each run by its --dev_criterion; test where every run has labelled test metrics); wrote "
          + ", ".join(map(str, written)))
    return {"records": records, "markdown": markdown, "tsv": tsv, "paired_tsv": paired_tsv}


def compare(config: Config) -> dict[str, Any]:
    """`--mode=compare`: paired tests between runs on the impressions they all scored (significance.py); printed
    as markdown, written as compare.md and compare.tsv."""
    import time

    runs = significance.load_runs(config.runs, config.split)
    rows = significance.compare_runs(runs, config.all_pairs, config.resamples, config.seed)
    markdown, tsv = significance.compare_tables(runs, rows, config.resamples, config.seed)
    out = significance.output_folder(config.compare_output, config.output_dir, runs[0].meta.get("dataset", "unknown"),
                                     time.strftime("%Y%m%d-%H%M%S"))
    beyond_md, beyond_tsv, notes = beyond_accuracy.compare_records(runs, config.all_pairs, config.resamples,
                                                                   config.seed)
    if beyond_md:
        markdown += ("\n\nBeyond accuracy (per_impression_beyond.npz; each metric over the impressions where both "
                     "runs have a value, Holm over the pairs of each metric):\n\n" + beyond_md)
        util.write_lines_atomic(out / "compare_beyond.tsv", beyond_tsv.splitlines())
    util.write_lines_atomic(out / "compare.md", markdown.splitlines())
    util.write_lines_atomic(out / "compare.tsv", tsv.splitlines())
    print(markdown)
    for note in notes:
        print(f"note: {note}")
    print(f"\nwrote {out / 'compare.md'} and {out / 'compare.tsv'}" + (f" and {out / 'compare_beyond.tsv'}"
                                                                       if beyond_md else ""))
    return {"runs": runs, "rows": rows, "markdown": markdown, "tsv": tsv, "folder": str(out),
            "beyond_tsv": beyond_tsv}


def train_seeds(config: Config, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """`--seeds 1,2,3`: one run per seed (each its own run folder), then mean ± std over exactly these runs."""
    results = []
    for seed in config.seeds:
        cfg = Config(values={**config.values, "seed": seed, "seeds": None}, explicit=config.explicit | {"seed"})
        rank0_print(f"=== seed {seed} ({len(results) + 1}/{len(config.seeds)}) ===")
        results.append(train(cfg, callbacks))
    runs = {str(Path(r["run_dir"]).resolve()) for r in results}
    records = [r for r in run_records.collect_runs(config.output_dir, config.dataset)
               if "incomplete" not in r and str((Path(config.output_dir) / r["dataset"] / r["model"] / r["run"]).resolve())
               in runs]
    markdown, tsv = run_records.aggregate_runs(records)
    rank0_print(f"\n{len(records)} runs of {config.model_name}, seeds {config.seeds} (metrics in %, mean ± std):\n"
                f"{markdown}")
    return {"runs": results, "records": records, "markdown": markdown, "tsv": tsv}


def explain(config: Config) -> dict[str, Any]:
    """`--mode=explain`: a PNG (and its numbers as JSON) of what a checkpoint attends to in one dev impression."""
    from explain_mode import WRITTEN_BY, explain_impression, explain_paths

    path = resolve_checkpoint_path(config.dev_model_path, "--dev_model_path")
    ckpt = load_checkpoint(path, fine_tuned_for="--dev_model_path")
    cfg = config_for_checkpoint(config, ckpt, path)
    cfg.device = "cpu" if "device" not in config.explicit else cfg.device  # one impression: no GPU needed
    best, which = checkpoint_role(path, ckpt)
    provenance = {**evaluation_provenance(path, ckpt, "dev", cfg.tie_break), "impression_id": str(cfg.impression_id)}
    out, numbers = explain_paths(cfg.explain_output, path, best, provenance)  # refused before any work
    runtime = setup_runtime(cfg)
    follow_progress_flag(cfg)
    corpus = load_corpus(cfg)
    check_corpus(ckpt, corpus, path)
    model = Model(cfg, corpus.meta, corpus.news, time_popularity_for(cfg, corpus))
    load_state(model, ckpt, path)
    model.to(runtime.device)
    data = explain_impression(model, corpus, cfg.impression_id)
    with util.writing_into(out.parent, "--explain_output", "the explain picture"):
        run_records.plot_explanation(data, out)
        util.write_lines_atomic(numbers, [json.dumps({**data, "written_by": WRITTEN_BY, "provenance": provenance},
                                                     indent=1)])
    print(f"explained {which}\nwrote {out} and {numbers}")
    shutdown_runtime(runtime)
    return {**data, "png": str(out), "json": str(numbers)}


def read_config_file(argv: Sequence[str] | None) -> tuple[dict[str, Any] | None, str]:
    """The JSON behind `--config_file` (read here: Config does no I/O), or None when the flag is absent."""
    import argparse

    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config_file", default=None)
    ns, _ = pre.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    if ns.config_file is None:
        return None, ""
    path = Path(ns.config_file)
    if not path.is_file():
        raise FileNotFoundError(f"--config_file {path}: no such file (a run's config.json, e.g. "
                                f"best_model/demo/MHSA-MHSA/#1/config.json)")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--config_file {path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config_file {path}: expected a JSON object of flag: value, got {type(values).__name__}")
    return values, str(path)


def main(argv: Sequence[str] | None = None, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Run one command line. `callbacks` (trainer.Callback) hook into training, e.g. from a test's launcher."""
    file_values, file_name = read_config_file(argv)
    config = Config.from_args(argv, file_values=file_values, file_name=file_name or "the config file")
    for note in config.unread_flags():  # typed flags this mode does not read: they would do nothing, unsaid
        rank0_print(f"note: {note}")
    if config.mode == "aggregate":
        return aggregate(config)
    if config.mode == "compare":
        return compare(config)
    if config.mode == "tune":  # each trial is main(--mode=train ...): its checks run there
        from tuning import tune

        return tune(config, callbacks)
    if config.mode == "pretrain":
        check_pairing(config.news_encoder, config.user_encoder, config.click_predictor, config)
        stray = config.stray_flags(config.typed)
        if stray:
            raise ValueError("; ".join(stray))
        return pretrain(config, callbacks)
    if config.mode == "train":  # dev/test take their settings from the checkpoint: suggestions do not apply
        # Pairing rules before any data is read: a wrong pairing fails in a second, not after the corpus loads.
        check_pairing(config.news_encoder, config.user_encoder, config.click_predictor, config)
        stray = config.stray_flags(config.typed)
        if stray:
            raise ValueError("; ".join(stray))
        if config.seeds:  # each seed's run is a copy without notes: print them once here
            print_notes(config)
            return train_seeds(config, callbacks)
        return train(config, callbacks)  # prints the notes once it knows whether the run resumes
    print_notes(config, suggestions=False)
    if config.mode == "explain":
        return explain(config)
    return evaluate_checkpoint(config)


def cli(argv: Sequence[str] | None = None, callbacks: Sequence[Callback] = ()) -> int:
    """The command line: `main`, with a one-line message and an exit status instead of a traceback for user
    mistakes (2) and Ctrl-C (130)."""
    rank, _, world_size = util.dist_env()
    try:
        main(argv, callbacks)
    except TrainingInterrupted as e:
        if rank == 0:
            print(e, file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        if rank == 0:
            print("interrupted", file=sys.stderr)
        return 130
    except (CorpusError, FileNotFoundError, FileExistsError, ValueError, ImportError, util.RankStopped) as e:
        # A user mistake (bad file, wrong path, conflicting flags) gets its message, not a traceback.
        print(f"error{f' (rank {rank})' if world_size > 1 else ''}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
