"""Every valid news x user pairing trains one step and evaluates on a tiny generated corpus (RecBole's
run-every-model test; issue 4).

The pairings come from the registries at collection time: an encoder registered later is paired with every
partner here without editing this file. Pairing rules are the encoders' own (`model.check_pairing`); the pairs
it rejects are checked to fail at start-up with a message naming valid partners.

For each valid pairing:
- one optimizer step on a real training batch gives a finite loss (auxiliary losses included) and moves the
  weights of both encoders;
- the cached evaluation path (every news encoded once, `Model.score_cached`) gives the same logits as the full
  forward of the same batch, so candidate-aware user encoders really use the cached vectors correctly;
- `evaluation.evaluate` over the dev split returns metrics in [0, 1] and a valid ranking of every impression.

Legend: B impressions, C candidates, N news.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from common import model_device  # noqa: E402

import run_records
from config import Config
from dataset import EvalDataset, TrainDataset
from devices import Runtime
from evaluation import evaluate
from MIND_corpus import Corpus
from model import Model, check_pairing
from newsEncoders import NEWS_ENCODERS
from popularity import time_popularity_for
from demo_corpus import ensure_demo
from trainer import build_optimizer
from userEncoders import USER_ENCODERS

DEVICE = model_device()  # $MIND_TEST_DEVICE (cpu by default): bench/gpu.py runs this module on the GPU
SIZES = dict(num_news=150, num_users=60, num_train_impressions=60, num_dev_impressions=24, num_test_impressions=6)
# Tiny dims: the point is that every pairing runs, not what it learns.
FLAGS = {
    "dataset": "demo", "word_embedding_dim": 16, "head_num": 2, "head_dim": 8, "attention_dim": 8,
    "cnn_kernel_num": 16, "category_embedding_dim": 8, "subcategory_embedding_dim": 8, "dropout_rate": 0,
    "num_interest_vectors": 4, "context_code_dim": 8, "plm_frozen_layers": 1, "plm_max_length": 16,
    "eval_batch_size": 16, "max_title_length": 16, "max_abstract_length": 24, "hidden_dim": 8,
    "HDC_filter_num": 4, "KCNN_filter_num": 4, "user_embedding_dim": 4, "personalized_embedding_dim": 8,
    "gcn_layer_num": 2, "OMAP_head_num": 2, "conv3D_filter_num_first": 4, "conv3D_filter_num_second": 4,
    "max_history_num": 10, "maxpooling3D_size": 2, "maxpooling3D_stride": 2, "glory_neighbors": 3, "glory_hops": 2,
}


def _valid(news: str, user: str) -> bool:
    try:
        check_pairing(news, user)
    except ValueError:
        return False
    return True


PAIRS = [(n, u) for n in sorted(NEWS_ENCODERS) for u in sorted(USER_ENCODERS) if _valid(n, u)]
INVALID = [(n, u) for n in sorted(NEWS_ENCODERS) for u in sorted(USER_ENCODERS) if not _valid(n, u)]


def _uses_plm(news: str) -> bool:
    return bool(getattr(NEWS_ENCODERS[news], "uses_plm", False))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """(data_dir, {uses_plm: Corpus}): the tiny corpus, processed once for word encoders and once with PLM
    tokens from a 2-layer random BERT whose vocabulary is the corpus vocabulary."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    tmp = tmp_path_factory.mktemp("zoo")
    data_dir = tmp / "data"
    ensure_demo(data_dir, **SIZES)
    config = make_config(data_dir, "MHSA", "ATT")
    word = Corpus(config, need_glove=False, log=lambda *a: None)  # random word init: GloVe is not under test
    write_news_vectors(data_dir, word.meta.news_ids)
    word.add_click_graph(FLAGS["glory_neighbors"])  # GLORY's global click graph (main.load_corpus adds it the same way)
    folder = tmp / "tiny-bert"
    folder.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [w for w in word.meta.vocab[2:] if w.isalnum()]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    plm = Corpus(config, need_glove=False, log=lambda *a: None)
    plm.add_plm_tokens(str(folder), FLAGS["plm_max_length"])
    return data_dir, folder, {False: word, True: plm}


def vector_path(data_dir) -> Path:
    return Path(data_dir).parent / "news_vectors.parquet"


def write_news_vectors(data_dir, news_ids: list[str]) -> None:
    """--news_encoder=Vectors' file: an 8-d vector for every news but each 7th (those get the 'missing' input)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = [nid for i, nid in enumerate(news_ids[1:]) if i % 7]
    values = np.random.default_rng(0).normal(size=(len(ids), 8)).astype(np.float32).tolist()
    table = pa.table({"news_id": ids, "vector": pa.array(values, pa.list_(pa.float32()))})
    pq.write_table(table, vector_path(data_dir))


def make_config(data_dir, news: str, user: str, plm_folder=None, *extra: str) -> Config:
    values = {**FLAGS, "data_dir": data_dir, "news_encoder": news, "user_encoder": user}
    if plm_folder is not None:
        values["plm_model_name"] = plm_folder
    if news == "Vectors":
        values["news_vectors"] = vector_path(data_dir)
    return Config.from_args([f"--{k}={v}" for k, v in values.items()] + ["--no-progress", *extra])


def build(zoo, news: str, user: str, *extra: str) -> tuple[Config, Corpus, Model]:
    data_dir, folder, corpora = zoo
    config = make_config(data_dir, news, user, folder if _uses_plm(news) else None, *extra)
    corpus = corpora[_uses_plm(news)]
    torch.manual_seed(0)
    return config, corpus, Model(config, corpus.meta, corpus.news, time_popularity_for(config, corpus)).to(DEVICE)


@pytest.mark.parametrize("news,user", PAIRS, ids=[f"{n}-{u}" for n, u in PAIRS])
def test_pairing_trains_a_step_and_evaluates(zoo, news, user):
    train_step_and_evaluate(zoo, news, user)


# --category_fusion: every news encoder that does not read the categories itself (7), with a plain, a
# candidate-aware and a category-reading user encoder.
FUSABLE = sorted(n for n in NEWS_ENCODERS if "category" not in NEWS_ENCODERS[n].features)
FUSED_PAIRS = [(n, u) for n in FUSABLE for u in ("ATT", "CATT", "MINER") if (n, u) in PAIRS]


@pytest.mark.parametrize("news,user", FUSED_PAIRS, ids=[f"{n}-{u}" for n, u in FUSED_PAIRS])
def test_category_fusion_appends_both_embeddings_trains_and_evaluates(zoo, news, user):
    plain = build(zoo, news, user)[2]
    model = train_step_and_evaluate(zoo, news, user, "--category_fusion", fused=True)
    enc = model.news_encoder
    assert enc.output_dim == plain.news_encoder.output_dim + 16  # + category (8) + subcategory (8)
    assert {"category", "subcategory"} <= set(model.features)
    index = torch.arange(1, model.news_num, device=DEVICE)
    users = torch.ones_like(index) if enc.personalized else None  # NPA's news vectors depend on the user
    vectors = model.encode_news(index, user_id=users)  # eval mode: no dropout
    feats = model.news_features(index)
    torch.testing.assert_close(vectors[:, -16:-8], enc.fusion_category(feats["category"].long()))
    torch.testing.assert_close(vectors[:, -8:], enc.fusion_subcategory(feats["subcategory"].long()))


@pytest.mark.parametrize("news, reads", [("NAML", "category and subcategory"), ("CNE", "category and subcategory"),
                                         ("HDC", "category and subcategory"), ("TANR", "category itself")])
def test_category_fusion_is_refused_for_encoders_that_read_categories(zoo, news, reads):
    """The refusal names what the encoder reads (TANR reads only the category, for its topic loss)."""
    with pytest.raises(ValueError, match=f"--category_fusion: --news_encoder {news} reads the {reads}"):
        make_config(zoo[0], news, "ATT" if news != "HDC" else "FIM", None, "--category_fusion")


def train_step_and_evaluate(zoo, news: str, user: str, *extra: str, fused: bool = False) -> Model:
    """One training step moves both encoders (and the fusion embeddings when `fused`), the cached evaluation
    path equals the full forward, and `evaluation.evaluate` ranks every dev impression."""
    config, corpus, model = build(zoo, news, user, *extra)
    model.prepare(log=lambda *a: None)

    # -- one training step on a real batch --
    train = TrainDataset(corpus.behaviors("train"), config.negative_sample_num, seed=0)
    batch = train[np.arange(min(8, len(train)))].to(DEVICE)
    model.train()
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    optimizer = build_optimizer(model, config)
    out = model(batch)
    assert out.logits.shape == batch.candidates.shape
    assert torch.isfinite(out.loss), f"{news}-{user}: loss {out.loss}"
    assert all(torch.isfinite(v) for v in out.aux.values())
    out.loss.backward()
    optimizer.step()
    moved = {name for name, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[name])}
    assert any(n.startswith("news_encoder.") for n in moved), f"{news}-{user}: no news-encoder weight moved"
    assert any(n.startswith("user_encoder.") for n in moved) or not any(
        n.startswith("user_encoder.") for n in before), f"{news}-{user}: no user-encoder weight moved"
    if fused:
        assert {"news_encoder.fusion_category.weight", "news_encoder.fusion_subcategory.weight"} <= moved

    # -- the cached evaluation path equals the full forward of the same impressions --
    model.eval()
    dev = corpus.behaviors("dev")
    eval_batch = EvalDataset(dev, 6)[0].to(DEVICE)
    index = torch.arange(model.news_num, device=DEVICE)
    table = model.encode_all_news(index)
    cached = model.score_cached(eval_batch, table)
    with torch.no_grad():
        full = model(eval_batch).logits
    real = eval_batch.candidate_mask
    assert torch.isfinite(cached[real]).all()
    torch.testing.assert_close(cached[real], full[real], rtol=1e-4, atol=1e-4)
    assert torch.isinf(cached[~real]).all()

    # -- the whole dev split through the trainer's evaluation --
    result = evaluate(model, dev, config, Runtime(device=DEVICE), desc="dev")
    for key in ("auc", "mrr", "ndcg5", "ndcg10"):
        assert 0.0 <= result.metrics[key] <= 1.0
    for ranks in np.split(result.ranks, result.offsets[1:-1]):
        assert sorted(ranks.tolist()) == list(range(1, len(ranks) + 1))
    return model


@pytest.mark.parametrize("news,user", INVALID, ids=[f"{n}-{u}" for n, u in INVALID])
def test_invalid_pairing_fails_at_start_naming_valid_partners(news, user):
    with pytest.raises(ValueError) as err:
        check_pairing(news, user)
    message = str(err.value)
    news_rule = getattr(NEWS_ENCODERS[news], "compatible_user_encoders", None)
    user_rule = getattr(USER_ENCODERS[user], "compatible_news_encoders", None)
    partners = [p for rule in (news_rule, user_rule) if rule is not None for p in rule]
    assert any(p in message for p in partners), message


def test_every_encoder_has_a_valid_partner():
    assert {n for n, _ in PAIRS} == set(NEWS_ENCODERS)
    assert {u for _, u in PAIRS} == set(USER_ENCODERS)


def test_invalid_pairing_fails_before_any_data_is_read(tmp_path):
    from main import main

    # The data folder does not exist: had the corpus been read first, the error would be about the data.
    with pytest.raises(ValueError, match="--news_encoder HDC works only with --user_encoder in"):
        main(["--mode=train", "--news_encoder=HDC", "--user_encoder=ATT", f"--data_dir={tmp_path / 'none'}",
              "--dataset=small", "--no-progress"])
    assert not (tmp_path / "none").exists()


def _covering_pairs() -> list[tuple[str, str]]:
    """Each news encoder with its first valid partner, and each user encoder with its first valid partner."""
    pairs = {next(p for p in PAIRS if p[0] == n) for n in NEWS_ENCODERS}
    pairs |= {next(p for p in PAIRS if p[1] == u) for u in USER_ENCODERS}
    return sorted(pairs)


COVER = _covering_pairs()


@pytest.mark.parametrize("news,user", COVER, ids=[f"{n}-{u}" for n, u in COVER])
def test_explain_runs_for_every_encoder(zoo, news, user, tmp_path):
    """`--mode=explain`'s core on every registered encoder: scores equal the evaluation path's, word attention (where
    the news encoder pools words with attention) is a distribution over each title's real tokens, and every user
    attention map has the axes its encoder declares, with the history cut to the real clicks."""
    from explain_mode import explain_impression

    config, corpus, model = build(zoo, news, user)
    dev = corpus.behaviors("dev")
    sizes = np.diff(np.asarray(dev["offsets"]))
    hist_len = (np.asarray(dev["histories"])[np.asarray(dev["history_row"])] != 0).sum(1)
    row = int(np.flatnonzero((sizes > 1) & (hist_len > 0))[0])
    impression = str(np.asarray(dev["impression_ids"])[row])
    data = explain_impression(model, corpus, impression)
    batch = EvalDataset(dev, 1)
    batch.batches = [np.array([row])]
    table = model.encode_all_news(torch.arange(model.news_num, device=DEVICE))
    expected = model.score_cached(batch[0].to(DEVICE), table)[0]
    np.testing.assert_allclose([c["score"] for c in data["candidates"]], expected.cpu().numpy(), rtol=1e-4, atol=1e-4)
    assert len(data["history"]) == hist_len[row] and len(data["candidates"]) == sizes[row]
    if data["word_attention"] is not None:
        for item in data["history"] + data["candidates"]:
            assert len(item["tokens"]) == len(item["weights"])
            if item["tokens"]:  # (an empty abstract has no token to attend to)
                assert sum(item["weights"]) == pytest.approx(1.0, abs=1e-4)
    axes = USER_ENCODERS[user].attention_axes
    for name, m in data["user_attention"].items():
        assert tuple(m["axes"]) == axes[name][1:]
        shape = np.asarray(m["weights"]).shape
        sized = {"history": len(data["history"]), "candidate": len(data["candidates"])}
        assert all(shape[i] == sized[a] for i, a in enumerate(m["axes"]) if a in sized), (name, shape)
    png = run_records.plot_explanation(data, tmp_path / "x.png")
    assert png.stat().st_size > 1000


def test_explain_takes_the_texts_from_the_corpus_and_encodes_by_the_models_path(zoo, monkeypatch):
    """Explain mode shows the corpus's own titles (Corpus.news_texts), without reading news.tsv again, and encodes
    the impression's news by the model's own path (Model.batch_news, Model.encode_news)."""
    import builtins

    from explain_mode import explain_impression

    config, corpus, model = build(zoo, "MHSA", "ATT")
    data_dir = zoo[0]
    titles = {}
    for split in ("train", "dev"):
        for line in (data_dir / "MIND-demo" / split / "news.tsv").read_text(encoding="utf-8").splitlines():
            parts = line.split("\t")
            titles.setdefault(parts[0], parts[3])
    dev = corpus.behaviors("dev")
    impression = str(np.asarray(dev["impression_ids"])[0])
    real_open, encoded = builtins.open, []

    def no_news_tsv(file, *args, **kwargs):
        assert not str(file).endswith("news.tsv"), f"explain mode read {file} again"
        return real_open(file, *args, **kwargs)

    real_encode = model.encode_news
    monkeypatch.setattr(builtins, "open", no_news_tsv)
    monkeypatch.setattr(model, "encode_news", lambda *a, **k: encoded.append(1) or real_encode(*a, **k))
    data = explain_impression(model, corpus, impression)
    monkeypatch.undo()
    assert encoded == [1]
    shown = data["history"] + data["candidates"]
    assert shown and all(item["title"] == titles[item["news_id"]] for item in shown)
