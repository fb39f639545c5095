"""--mode=explain: what a trained model attends to in one impression (word attention of the news encoder, the
user encoder's declared attention maps), as data for records.plot_explanation."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from dataset import EvalDataset

PICTURE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")  # what matplotlib's savefig writes by the name
WRITTEN_BY = "--mode=explain"


def _own_picture(json_path: Path, provenance: dict[str, Any]) -> bool:
    """Whether `json_path` is the numbers of an explain picture of the same checkpoint and impression."""
    try:
        data = json.loads(json_path.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict) or data.get("written_by") != WRITTEN_BY:
        return False
    saved = data.get("provenance") or {}
    return all(saved.get(k) == v for k, v in provenance.items() if k != "checkpoint")  # a path may be spelt otherwise


def explain_paths(requested: str | None, checkpoint: Path, best: bool, provenance: dict[str, Any],
                  log: Callable = print) -> tuple[Path, Path]:
    """(picture, numbers) paths of --mode=explain. Default: `explain/impression-<id>.png` beside the run's
    best-model file (`explain-<stem>/` beside another checkpoint), numbered `-2`, `-3`, ... when a picture of
    another checkpoint is there. `--explain_output`: a folder takes `impression-<id>.png`; a name without an
    extension gets `.png` (said in a note); another extension than a picture's is an error. A picture or its `.json`
    that would replace any file but an explain picture of the same checkpoint and impression is an error: a run's
    records (metrics.json, config.json, curves.png, ...) are never written over."""
    name = f"impression-{provenance['impression_id']}"
    if requested is None:
        folder = checkpoint.parent / ("explain" if best else f"explain-{checkpoint.stem}")
        n = 1
        while True:
            out = folder / (f"{name}.png" if n == 1 else f"{name}-{n}.png")
            if not (out.exists() or out.with_suffix(".json").exists()) or _own_picture(out.with_suffix(".json"),
                                                                                        provenance):
                return out, out.with_suffix(".json")
            n += 1
    out = Path(requested)
    if out.is_dir():
        out = out / f"{name}.png"
    elif out.suffix == "":
        out = out.with_name(out.name + ".png")
        log(f"note: --explain_output {requested} has no extension: writing the picture as {out}")
    elif out.suffix.lower() not in PICTURE_SUFFIXES:
        raise ValueError(f"--explain_output {requested}: {out.suffix} is not a picture format; end the name with "
                         f"{', '.join(PICTURE_SUFFIXES[:3])} (.png for example), or drop the extension")
    numbers = out.with_suffix(".json")
    if not _own_picture(numbers, provenance):
        for taken in (out, numbers):
            if taken.exists():
                raise FileExistsError(f"--explain_output {requested}: {taken} exists and is not an explain picture "
                                      f"of this checkpoint and impression (the picture goes to {out.name} and its "
                                      f"numbers to {numbers.name}); it is never replaced: choose another name")
    return out, numbers


def find_impression(beh: dict[str, Any], impression_id: str) -> int:
    """Row of `impression_id` in a split's behaviors arrays; a clear error with examples when absent."""
    ids = np.asarray(beh["impression_ids"])
    rows = np.flatnonzero(ids.astype(str) == str(impression_id))
    if len(rows) == 0:
        sizes = np.diff(np.asarray(beh["offsets"]))
        raise ValueError(f"impression {impression_id!r} is not in {beh['path']} (column 1); "
                         f"for example: {', '.join(map(str, ids[sizes > 0][:5]))}")
    return int(rows[0])


@torch.no_grad()
def explain_impression(model: nn.Module, corpus, impression_id: str, split: str = "dev") -> dict[str, Any]:
    """Run one impression through `model` (eval mode) and collect what it attended to.

    Returns a dict for `run_records.plot_explanation`: the history and candidate titles, labels and scores, each news'
    word (token) attention from the news encoder (`layers.AttentionRecorder`), and the user encoder's own
    attention maps (`UserOutput.attention`) with the names of their axes (`attention_axes`)."""
    from layers import AttentionRecorder

    beh = corpus.behaviors(split)
    row = find_impression(beh, impression_id)
    data = EvalDataset(beh, 1)
    data.batches = [np.array([row])]
    device = next(model.parameters()).device
    batch = data[0].to(device)
    model.eval()
    model.prepare(log=lambda *a: None)
    h, c = batch.history.shape[1], batch.candidates.shape[1]
    # The news the model gathers for this impression, history then candidates, each position encoded (the
    # attention maps are then per position), by the model's own path.
    ids, user_ids = model.batch_news(batch)  # [H + C]
    feats = model.news_features(ids)  # the ids the encoder reads, for the tokens of the picture
    with AttentionRecorder(model) as rec:
        vectors = model.encode_news(ids, user_ids)  # [H + C, D]
        news_maps = dict(rec.maps)
        rec.clear()
        logits, out = model.score(batch, vectors[:h].unsqueeze(0), vectors[h:].unsqueeze(0))
    # Word attention: a news-encoder map over this batch's token positions of the text the encoder reads.
    text_key = next((k for k in ("title", "plm_ids", "abstract") if k in feats), None)
    width = feats[text_key].shape[1] if text_key else -1
    candidates_maps = [(k, w) for k, (w, axes) in news_maps.items()
                       if k.startswith("news_encoder.") and w.dim() == 2 and w.shape == (h + c, width)]
    word_key, word_weights = next(((k, w) for k, w in candidates_maps if "title" in k),
                                  candidates_maps[0] if candidates_maps else (None, None))
    news_ids = corpus.news_meta["news_ids"]
    index = ids.cpu().numpy()
    column = "abstract" if text_key == "abstract" else "title"
    texts = corpus.news_texts(column)  # by news index
    tokens: list[list[str]] = []
    if text_key == "plm_ids":
        from transformers import AutoTokenizer

        from newsEncoders import resolve_plm_path

        tok = AutoTokenizer.from_pretrained(resolve_plm_path(model.config.plm_model_name))
        for r in feats["plm_ids"].cpu().numpy():
            tokens.append(tok.convert_ids_to_tokens([int(t) for t in r]))
    elif text_key is not None:
        from MIND_corpus import tokenize

        vocab = corpus.meta.vocab
        for i, r in zip(index, feats[text_key].cpu().numpy()):
            words = tokenize(texts[i])
            # The text's own words where they line up with the ids (out-of-vocabulary words keep their spelling).
            tokens.append([words[j] if j < len(words) else vocab[t] for j, t in enumerate(r)])
    hist_mask = batch.history_mask[0].cpu().numpy()
    cand_mask = batch.candidate_mask[0].cpu().numpy()
    labels = batch.labels[0].cpu().numpy()
    n_hist = int(hist_mask.sum())

    def news(pos: int) -> dict[str, Any]:
        i = int(index[pos])
        entry = {"news_id": news_ids[i] if i > 0 else "(unknown)", "title": texts[i] if i > 0 else ""}
        if word_weights is not None:
            length = int((feats[text_key][pos] != 0).sum()) if text_key != "plm_ids" else int(feats["plm_mask"][pos].sum())
            entry["tokens"] = tokens[pos][:length]
            entry["weights"] = word_weights[pos, :length].tolist()
        return entry

    axes_of = type(model.user_encoder).attention_axes
    user_maps = {}
    for name, weights in out.attention.items():
        axes = axes_of.get(name)
        if axes is None or weights.dim() != len(axes):
            continue  # an attention without declared axes cannot be labelled: left out of the picture
        w = weights.detach().float().cpu()[0]  # drop the impression axis
        axes = axes[1:]
        w = w.narrow(axes.index("history"), 0, n_hist) if "history" in axes else w
        user_maps[name] = {"axes": list(axes), "weights": w.tolist()}
    return {
        "impression_id": str(impression_id), "split": split, "model": model.config.model_name,
        "word_attention": word_key, "history": [news(p) for p in range(n_hist)],
        "candidates": [{**news(h + j), "label": int(labels[j]), "score": float(logits[0, j])}
                       for j in range(c) if cand_mask[j]],
        "user_attention": user_maps,
    }
