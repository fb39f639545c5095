"""PLM news encoders (tiny random BERT and the offline MiniLM) and the MINER user encoder (README: PLM and MINER flags)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from common import needs_glove50, needs_minilm  # noqa: E402

import glove_vectors
from config import Config
from MIND_corpus import CorpusMeta
from model import Model
from newsEncoders import NEWS_ENCODERS, OFFLINE_MINILM, resolve_plm_path
from trainer import build_optimizer, warmup_linear
from userEncoders import MINERUserEncoder, UserInputs

WORDS = "stock market falls team wins game storm hits coast new recipe for dinner the a of".split()


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A 3-layer random BERT with a real tokenizer, saved like a hub model folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    return folder


def make_config(plm: str | Path, **flags) -> Config:
    base = {"plm_model_name": str(plm), "plm_frozen_layers": 2, "head_num": 2, "head_dim": 8, "attention_dim": 8,
            "category_embedding_dim": 8, "subcategory_embedding_dim": 8, "dropout_rate": 0.0,
            "num_interest_vectors": 4, "context_code_dim": 8, "word_embedding_dim": 16}
    base.update(flags)
    base = {k: v for k, v in base.items() if v is not None}  # None: leave the flag out (its default)
    return Config.from_args([f"--{k}={v}" for k, v in base.items() if not isinstance(v, bool)]
                            + [f"--{k}" if v else f"--no-{k}" for k, v in base.items() if isinstance(v, bool)])


META = CorpusMeta(vocab_size=20, category_num=5, subcategory_num=7, user_num=4, entity_num=1, news_num=9)


def tokens(folder, titles, length=12):
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(folder)(titles, max_length=length, truncation=True, padding="max_length")
    return torch.tensor(enc["input_ids"]), torch.tensor(enc["attention_mask"])


def news_batch(folder, length=12):
    ids, mask = tokens(folder, ["stock market falls", "team wins the game", "", "storm hits the coast new"], length)
    return {"plm_ids": ids, "plm_mask": mask, "category": torch.tensor([1, 2, 3, 4]),
            "subcategory": torch.tensor([1, 2, 3, 6])}


PLM_ENCODERS = [name for name, cls in NEWS_ENCODERS.items() if getattr(cls, "uses_plm", False)]


def test_plm_encoders_registered():
    assert {"PLMNAML", "PLMNRMS", "PLMMiner"} <= set(PLM_ENCODERS)


@pytest.mark.parametrize("pooling", ["cls", "average", "attention"])
@pytest.mark.parametrize("name", PLM_ENCODERS)
def test_plm_encoder_shapes_padding_and_batch_independence(tiny_bert, name, pooling):
    torch.manual_seed(0)
    enc = NEWS_ENCODERS[name](make_config(tiny_bert, plm_pooling=pooling), META).eval()
    news = news_batch(tiny_bert)
    out = enc(news)
    expected = 32 + (16 if name == "PLMNAML" else 0)
    assert out.shape == (4, expected) and enc.output_dim == expected and torch.isfinite(out).all()
    # Padding invariance: more padding columns change nothing (the empty title is [CLS] [SEP]).
    longer = news_batch(tiny_bert, length=20)
    assert torch.allclose(enc(longer), out, atol=1e-5)
    # Batch independence: a news encoded alone equals the same news in a batch.
    alone = enc({k: v[1:2] for k, v in news.items()})
    assert torch.allclose(alone, out[1:2], atol=1e-5)


def test_frozen_layers_get_no_gradient_and_do_not_move(tiny_bert):
    torch.manual_seed(0)
    cfg = make_config(tiny_bert, plm_frozen_layers=2)
    enc = NEWS_ENCODERS["PLMNRMS"](cfg, META).train()
    layers = enc.plm.encoder.layer
    frozen = list(enc.plm.embeddings.parameters()) + list(layers[0].parameters()) + list(layers[1].parameters())
    assert all(not p.requires_grad for p in frozen)
    assert all(p.requires_grad for p in layers[2].parameters())
    before = {id(p): p.detach().clone() for p in enc.parameters()}
    groups = enc.param_groups()
    rest = [p for p in enc.parameters() if p.requires_grad and all(p is not q for q in groups[0]["params"])]
    opt = torch.optim.Adam(groups + [{"params": rest}], lr=1e-2)
    enc(news_batch(tiny_bert)).pow(2).sum().backward()
    assert all(p.grad is None for p in frozen)
    opt.step()
    assert all(torch.equal(p, before[id(p)]) for p in frozen)
    assert any(not torch.equal(p, before[id(p)]) for p in layers[2].parameters())


def test_too_many_frozen_layers_is_an_error(tiny_bert):
    with pytest.raises(ValueError, match="has 3 layers"):
        NEWS_ENCODERS["PLMMiner"](make_config(tiny_bert, plm_frozen_layers=4), META)


def test_two_learning_rates_follow_the_flags(tiny_bert):
    cfg = make_config(tiny_bert, news_encoder="PLMMiner", user_encoder="MINER", lr=3e-4, plm_lr=2e-5)
    ids, mask = tokens(tiny_bert, [""] + ["stock market"] * 8)
    table = {"plm_ids": ids.numpy(), "plm_mask": mask.numpy(), "category": np.arange(9) % 5,
             "subcategory": np.arange(9) % 7}
    model = Model(cfg, META, table)
    opt = build_optimizer(model, cfg)
    lrs = sorted(g["lr"] for g in opt.param_groups)
    assert lrs == [2e-5, 3e-4]
    plm_ids = {id(p) for p in model.news_encoder.plm.parameters() if p.requires_grad}
    plm_group = next(g for g in opt.param_groups if g["lr"] == 2e-5)
    assert {id(p) for p in plm_group["params"]} == plm_ids
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_linear(100, 0.1))
    for _ in range(10):
        opt.step()
        sched.step()
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([2e-5, 3e-4])  # end of warmup: the flags


@needs_minilm
def test_offline_minilm_loads_real_weights():
    path = resolve_plm_path(OFFLINE_MINILM)
    cfg = make_config(OFFLINE_MINILM, plm_frozen_layers=6, plm_pooling="average")
    enc = NEWS_ENCODERS["PLMMiner"](cfg, META).eval()
    assert enc.output_dim == 384 and len(enc.plm.encoder.layer) == 6
    ids, mask = tokens(path, ["stock markets fall sharply", "shares tumble on wall street",
                              "puppy plays with a ball in the garden"], 16)
    v = F.normalize(enc({"plm_ids": ids, "plm_mask": mask}), dim=-1)
    # Pretrained semantics: the two finance titles are closer to each other than to the puppy.
    assert (v[0] @ v[1]) > (v[0] @ v[2]) + 0.2
    with pytest.raises(ValueError, match="has 6 layers"):
        NEWS_ENCODERS["PLMMiner"](make_config(OFFLINE_MINILM, plm_frozen_layers=10), META)


def test_unreachable_hub_fails_fast_with_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="offline-minilm"):
        resolve_plm_path("some-org/not-cached-model")


# ---------------------------------------------------------------------------------------------------- MINER

class StubNews(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.output_dim = d
        self.category_embedding = None


def miner(aggregation="weighted", lam=0.5, **flags):
    torch.manual_seed(0)
    cfg = make_config("unused", miner_aggregation=aggregation, category_aware_lambda=lam, **flags)
    return MINERUserEncoder(cfg, META, StubNews(6)).eval()


def inputs(b=3, h=5, c=4, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, h, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2] = False  # empty history
    return UserInputs(history=torch.randn(b, h, d, generator=g), history_mask=mask, user_id=torch.ones(b).long(),
                      history_category=torch.randint(1, 5, (b, h), generator=g) * mask,
                      candidates=torch.randn(b, c, d, generator=g), candidate_mask=torch.ones(b, c, dtype=torch.bool),
                      candidate_category=torch.randint(1, 5, (b, c), generator=g))


def direct_interests(m, inp, scale="sqrt"):
    """MINER's poly attention, category bias and interest vectors (userEncoders.MINER) written out one (user, candidate) at a time (`scale`: --poly_attention_scale)."""
    b, h, d = inp.history.shape
    c = inp.candidates.shape[1]
    out = torch.zeros(b, c, m.k, d)
    emb = m.category_embedding.weight
    for i in range(b):
        for j in range(c):
            real = inp.history_mask[i]
            if not real.any():
                continue
            hist = inp.history[i][real]  # [h', D]
            logits = torch.tanh(hist @ m.project.weight.t()) @ m.codes.t()  # [h', K]
            logits = logits / math.sqrt(m.dc) if scale == "sqrt" else logits
            cos = F.cosine_similarity(emb[inp.history_category[i][real]], emb[inp.candidate_category[i, j]][None], dim=-1)
            alpha = torch.softmax(logits + m.category_lambda * cos[:, None], dim=0)  # over history
            out[i, j] = alpha.t() @ hist
    return out


@pytest.mark.parametrize("scale", ["sqrt", "none"])
def test_miner_interest_vectors_match_the_definition(scale):
    m, inp = miner(poly_attention_scale=scale, context_code_dim=64), inputs()
    v = m.interests(inp, inp.candidates, inp.candidate_category)
    assert v.shape == (3, 4, 4, 6)
    assert torch.allclose(v, direct_interests(m, inp, scale), atol=1e-5)
    other = direct_interests(m, inp, "none" if scale == "sqrt" else "sqrt")
    assert not torch.allclose(v[:2], other[:2], atol=1e-3)  # the flag changes the attention
    assert (v[2] == 0).all()  # empty history: zero interests, no NaN


def test_miner_padded_history_gets_exactly_zero_weight():
    m, inp = miner(), inputs()
    ref = m(inp).user
    garbage = inp.history.clone()
    garbage[~inp.history_mask] = 1e4  # padded slots hold anything
    inp.history = garbage
    assert torch.equal(m(inp).user, ref)


def test_miner_lambda_zero_equals_category_agnostic_path():
    m, inp = miner(lam=0.0), inputs()
    v = m.interests(inp, inp.candidates, inp.candidate_category)
    # Without the category bias one set of interests per user serves every candidate.
    logits = torch.tanh(m.project(inp.history)) @ m.codes.t() / math.sqrt(m.dc)  # [B, H, K]
    alpha = torch.softmax(logits.masked_fill(~inp.history_mask[..., None], float("-inf")), dim=1).nan_to_num(0.0)
    agnostic = torch.einsum("bhk,bhd->bkd", alpha, inp.history)
    assert torch.allclose(v, agnostic[:, None].expand_as(v), atol=1e-6)
    # ... while a non-zero lambda makes the interests depend on the candidate's category.
    inp.candidate_category[0] = torch.tensor([1, 2, 3, 4])
    inp.history_category[0, :3] = torch.tensor([1, 1, 2])
    v2 = miner(lam=2.0).interests(inp, inp.candidates, inp.candidate_category)
    assert not torch.allclose(v2[0, 0], v2[0, 1], atol=1e-4)


def test_disagreement_is_one_over_k_for_orthogonal_and_one_for_identical():
    k, d = 4, 6
    orthogonal = torch.eye(k, d)[None, None]  # [1, 1, K, D]
    identical = torch.ones(1, 1, k, d)
    assert MINERUserEncoder.disagreement(orthogonal).item() == pytest.approx(1 / k)
    assert MINERUserEncoder.disagreement(identical).item() == pytest.approx(1.0)


def test_disagreement_loss_goes_through_the_output_with_beta():
    m, inp = miner(disagreement_beta=0.5), inputs()
    m.train()
    out = m(inp)
    v = m.interests(inp, inp.candidates, inp.candidate_category)
    sim = MINERUserEncoder.disagreement(v)[:2]  # user 2 has no history: excluded
    assert out.aux["disagreement"].item() == pytest.approx(0.5 * sim.mean().item(), rel=1e-5)
    m.eval()
    assert "disagreement" not in m(inp).aux


@pytest.mark.parametrize("aggregation", ["weighted", "max", "mean"])
def test_miner_aggregations_match_direct_scores(aggregation):
    m, inp = miner(aggregation), inputs()
    out = m(inp)
    v = direct_interests(m, inp)  # [B, C, K, D]
    per_interest = torch.einsum("bckd,bcd->bck", v, inp.candidates)
    if aggregation == "weighted":
        query = F.gelu(inp.candidates @ m.score_project.weight.t() + m.score_project.bias)
        weights = torch.softmax(torch.einsum("bckd,bcd->bck", v, query), dim=-1)
        user = torch.einsum("bck,bckd->bcd", weights, v)
        assert torch.allclose(out.user, user, atol=1e-5)
        scores = (out.user * inp.candidates).sum(-1)
    else:
        expected = per_interest.max(-1).values if aggregation == "max" else per_interest.mean(-1)
        assert out.logits is not None and torch.allclose(out.logits, expected, atol=1e-5)
        scores = out.logits
    assert torch.isfinite(scores).all() and (scores[2] == 0).all()  # empty history: finite, all zero


def test_miner_candidate_chunks_give_the_same_scores():
    m, inp = miner("max"), inputs(c=9)
    full = m(inp).logits
    m.max_elements = 3 * 5 * 4 * 2  # two candidates per chunk
    assert torch.allclose(m(inp).logits, full, atol=1e-6)


def test_miner_uses_the_news_encoder_category_embedding_or_its_own(tiny_bert):
    cfg = make_config(tiny_bert, news_encoder="PLMMiner", user_encoder="MINER")
    news = NEWS_ENCODERS["PLMMiner"](cfg, META)
    assert MINERUserEncoder(cfg, META, news).category_embedding is news.category_embedding
    own = MINERUserEncoder(cfg, META, StubNews(6)).category_embedding
    assert own.weight.shape == (5, 8) and own.weight.requires_grad


@needs_glove50
def test_category_glove_init_is_frozen_and_semantic():
    names = ["<PAD>", "foodanddrink", "northamerica", "middleeast", "tv", "autos", "movies", "weather"]
    matrix, found = glove_vectors.category_glove_matrix(names, 50, return_found=True)
    assert found == 7
    meta = CorpusMeta(vocab_size=5, category_num=len(names), subcategory_num=2, user_num=2, entity_num=1,
                      news_num=2, category_names=names, category_glove=matrix)
    from newsEncoders import make_category_embedding

    emb = make_category_embedding(make_config("unused", use_category_glove=True, category_embedding_dim=30), meta)
    assert not emb.weight.requires_grad and torch.equal(emb.weight[0], torch.zeros(30))
    assert torch.allclose(emb.weight[1:], torch.from_numpy(matrix[1:, :30]))  # truncated to the embedding dim
    cos = lambda a, b: F.cosine_similarity(emb.weight[names.index(a)], emb.weight[names.index(b)], dim=0)  # noqa
    assert cos("northamerica", "middleeast") > cos("northamerica", "autos")
    assert cos("tv", "movies") > cos("tv", "weather")
    assert cos("foodanddrink", "tv") < cos("tv", "movies")


def _plm_model(folder, **flags):
    cfg = make_config(folder, news_encoder="PLMNRMS", user_encoder="MHSA", plm_frozen_layers=2, **flags)
    ids, mask = tokens(folder, ["", "stock market falls", "team wins the game", "", "storm hits the coast new",
                                "new recipe for dinner", "the game", "market", "a storm"], 12)
    table = {"plm_ids": ids.numpy(), "plm_mask": mask.numpy()}
    torch.manual_seed(0)
    return Model(cfg, META, table), cfg


def test_frozen_layer_cache_reproduces_the_full_forward(tiny_bert):
    model, _ = _plm_model(tiny_bert)
    model.eval()
    index = torch.arange(9)
    full = model.encode_news(index)
    model.prepare(log=lambda *a: None)
    assert model.news_encoder.frozen_table is not None and model.news_encoder.frozen_table.dtype == torch.float16
    assert model.news_encoder.frozen_table.shape[:2] == (9, 12)
    cached = model.encode_news(index)
    assert torch.allclose(cached, full, atol=2e-3, rtol=1e-2)
    # the PLM is whole again after the split runs (no layer left out of the module tree)
    assert len(model.news_encoder.plm.encoder.layer) == 3


def test_training_on_the_cache_moves_only_the_top_layers(tiny_bert):
    from dataset import Batch

    model, cfg = _plm_model(tiny_bert, dropout_rate=0.0)
    uncached, _ = _plm_model(tiny_bert, dropout_rate=0.0, plm_cache=False)
    model.prepare(log=lambda *a: None)
    uncached.prepare(log=lambda *a: None)
    assert uncached.news_encoder.frozen_table is None  # --no-plm_cache
    batch = Batch(user=torch.tensor([1, 2]), history=torch.tensor([[1, 2, 0], [3, 4, 5]]),
                  history_mask=torch.tensor([[True, True, False], [True, True, True]]),
                  candidates=torch.tensor([[6, 7], [8, 1]]), candidate_mask=torch.ones(2, 2, dtype=torch.bool),
                  target=torch.tensor([0, 1]))
    for m in (model, uncached):  # PLM dropout off: the two paths must give the same loss
        m.news_encoder.plm.eval()
    loss = model(batch).loss
    assert loss.item() == pytest.approx(uncached(batch).loss.item(), rel=1e-2)
    plm = model.news_encoder.plm
    before = {n: p.detach().clone() for n, p in plm.named_parameters()}
    opt = build_optimizer(model, cfg)
    loss.backward()
    opt.step()
    for n, p in plm.named_parameters():
        moved = not torch.equal(p, before[n])
        if n.startswith("embeddings") or n.startswith("encoder.layer.0.") or n.startswith("encoder.layer.1."):
            assert not moved, n
    assert any(not torch.equal(p, before[n]) for n, p in plm.named_parameters() if n.startswith("encoder.layer.2."))


@needs_minilm
@pytest.mark.parametrize("name", PLM_ENCODERS)
def test_plm_encoders_with_offline_minilm_shapes_and_padding_invariance(name):
    """The real pretrained MiniLM (384-d): output shape, and extra padding tokens change nothing (eval mode)."""
    path = resolve_plm_path(OFFLINE_MINILM)
    enc = NEWS_ENCODERS[name](make_config(OFFLINE_MINILM, plm_frozen_layers=4), META).eval()
    short, longer = news_batch(path, length=12), news_batch(path, length=24)
    with torch.no_grad():
        a, b = enc(short), enc(longer)
    extra = 2 * 8 if name == "PLMNAML" else 0  # + category and subcategory embeddings (8-d in make_config)
    assert a.shape == (4, 384 + extra) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_model_records_the_frozen_layers_the_encoder_resolved(tiny_bert):
    """--plm_frozen_layers left out: the encoder picks 10/12 of the PLM's layers (2 of the tiny BERT's 3) and reports
    it through resolved_settings(); the model writes it into the run's config, so config.json and the checkpoint
    record the number used rather than None."""
    cfg = make_config(tiny_bert, news_encoder="PLMNRMS", user_encoder="MHSA", plm_frozen_layers=None, dataset="small")
    assert cfg.plm_frozen_layers is None
    ids, mask = tokens(tiny_bert, ["", "stock market falls", "team wins"], 12)
    model = Model(cfg, META, {"plm_ids": ids.numpy(), "plm_mask": mask.numpy()})
    assert model.news_encoder.frozen_layers == 2 and cfg.plm_frozen_layers == 2
    assert cfg.to_dict()["plm_frozen_layers"] == 2 and model.model_settings()["news"]["plm_frozen_layers"] == 2


def test_frozen_layers_run_in_eval_mode_so_cache_and_no_cache_train_alike(tiny_bert):
    """Dropout on (the PLM's own 0.1, --dropout_rate 0.2): in training mode the frozen bottom (embeddings + the
    lowest --plm_frozen_layers) runs without dropout, as the cache computes it, so a model trained with
    --no-plm_cache (or on the cache's fallback) is the model trained on the cache: same loss for the same seed."""
    from dataset import Batch

    cached, _ = _plm_model(tiny_bert, dropout_rate=0.2)
    uncached, _ = _plm_model(tiny_bert, dropout_rate=0.2, plm_cache=False)
    cached.prepare(log=lambda *a: None)
    uncached.prepare(log=lambda *a: None)
    assert cached.news_encoder.frozen_table is not None and uncached.news_encoder.frozen_table is None
    for model in (cached, uncached):
        model.train()
        enc = model.news_encoder
        assert enc.training and enc.plm.encoder.layer[2].training  # the trained top layer keeps its dropout
        assert enc.frozen_modules() and not any(m.training for m in enc.frozen_modules())
    enc = uncached.news_encoder
    ids, mask = uncached.news_plm_ids[1:5].long(), uncached.news_plm_mask[1:5].long()
    with torch.no_grad(), enc._layers(enc._all_layers[: enc.frozen_layers]):
        first = enc.plm(input_ids=ids, attention_mask=mask).last_hidden_state
        second = enc.plm(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(first, second)  # training mode, yet no dropout in the frozen part
    batch = Batch(user=torch.tensor([1, 2]), history=torch.tensor([[1, 2, 0], [3, 4, 5]]),
                  history_mask=torch.tensor([[True, True, False], [True, True, True]]),
                  candidates=torch.tensor([[6, 7], [8, 1]]), candidate_mask=torch.ones(2, 2, dtype=torch.bool),
                  target=torch.tensor([0, 1]))
    losses = []
    for model in (cached, uncached):
        torch.manual_seed(7)  # the same dropout masks in the layers that train
        losses.append(model(batch).loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=2e-3)  # the cache holds fp16 hidden states
    cached.eval()  # and back: eval everywhere, train() again keeps the frozen bottom in eval mode
    assert not any(m.training for m in cached.modules())
    cached.train()
    assert not any(m.training for m in cached.news_encoder.frozen_modules())
