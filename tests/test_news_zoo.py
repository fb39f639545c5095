"""The NNR zoo news encoders beyond the generic checks of test_encoders.py: what each one must get right.

Legend: N news, L title tokens, La abstract tokens, B users, H history, C candidates, D news dim.

- PNE: every news row is encoded with its own user's query, inside one call and through Model._gather_news
  (NNR's `repeat` instead of `repeat_interleave` would pair news with the wrong users);
- DAE: the reconstruction loss covers real news only and reaches ModelOutput through Model.forward, weighted by
  --Alpha;
- KCNN: entity channels follow the token alignment, entities without a vector count as no entity;
- HDC: D is constant whatever the batch's longest title, and the layout FIM reads is what `split` says;
- CNE / NAML ablations read (and only read) what their names say.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from config import Config
from dataset import Batch
from MIND_corpus import CorpusMeta
from model import Model, check_pairing
from newsEncoders import NEWS_ENCODERS

META = CorpusMeta(vocab_size=40, category_num=5, subcategory_num=7, user_num=9, entity_num=6, news_num=12)
FLAGS = {
    "word_embedding_dim": 12, "attention_dim": 6, "cnn_kernel_num": 8, "category_embedding_dim": 4,
    "subcategory_embedding_dim": 4, "dropout_rate": 0, "hidden_dim": 5, "user_embedding_dim": 4,
    "personalized_embedding_dim": 6, "HDC_filter_num": 4, "entity_embedding_dim": 7, "KCNN_window_sizes": "1,2",
    "KCNN_filter_num": 3, "max_title_length": 10, "max_abstract_length": 14, "head_num": 2, "head_dim": 4,
}


def make_config(**flags) -> Config:
    return Config.from_args([f"--{k}={v}" for k, v in {**FLAGS, **flags}.items()])


def build(name: str, meta: CorpusMeta = META, **flags):
    torch.manual_seed(0)
    return NEWS_ENCODERS[name](make_config(**flags), meta).eval()


def tokens(lengths, width, vocab=META.vocab_size, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    out = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        out[i, :n] = torch.randint(1, vocab, (n,), generator=gen)
    return out


def news_table(n: int = META.news_num, seed: int = 0) -> dict[str, np.ndarray]:
    """A corpus news table: row 0 is the padding news (all zeros), rows 1.. have titles, abstracts, categories."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [0] + torch.randint(1, FLAGS["max_title_length"] + 1, (n - 1,), generator=gen).tolist()
    title = tokens(lengths, FLAGS["max_title_length"], seed=seed)
    abstract = tokens([0] + [k + 2 for k in lengths[1:]], FLAGS["max_abstract_length"], seed=seed + 1)
    entity = torch.randint(0, META.entity_num, title.shape, generator=gen).masked_fill(title == 0, 0)
    category = torch.randint(1, META.category_num, (n,), generator=gen)
    subcategory = torch.randint(1, META.subcategory_num, (n,), generator=gen)
    category[0] = subcategory[0] = 0
    table = dict(title=title, abstract=abstract, title_entity=entity, abstract_entity=torch.zeros_like(abstract),
                 category=category, subcategory=subcategory, title_length=torch.tensor(lengths))
    return {k: v.numpy().astype(np.int32) for k, v in table.items()}


def build_model(news: str, user: str = "ATT", **flags) -> Model:
    torch.manual_seed(0)
    config = make_config(news_encoder=news, user_encoder=user, **flags)
    return Model(config, META, news_table()).eval()


def make_batch(users=(3, 7)) -> Batch:
    """Two users, 3 history slots (user 0 has one padded slot: news 0), 2 candidates, clicked = candidate 0."""
    history = torch.tensor([[1, 2, 0], [4, 2, 5]])
    candidates = torch.tensor([[6, 7], [8, 2]])
    return Batch(user=torch.tensor(users), history=history, history_mask=history > 0, candidates=candidates,
                 candidate_mask=candidates > 0, target=torch.zeros(2, dtype=torch.long))


def close(a, b, what: str) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}\n{m}")


# ------------------------------------------------------------------------------------------------------------
# PNE (NPA)
# ------------------------------------------------------------------------------------------------------------

def test_pne_each_news_row_uses_its_own_users_query():
    enc = build("PNE")
    title = tokens([5, 5, 3, 3], 6).clone()
    title[1] = title[0]  # rows 0/1 and 2/3: the same title for two different users
    title[3] = title[2]
    users = torch.tensor([2, 5, 2, 5])
    with torch.no_grad():
        batch = enc({"title": title}, user_id=users)
        for i in range(4):
            close(batch[i], enc({"title": title[i:i + 1]}, user_id=users[i:i + 1])[0], f"row {i} vs its own user")
        swapped = enc({"title": title}, user_id=users.flip(0))
    assert not torch.allclose(batch[0], batch[1]), "the same title for two users must give two vectors"
    assert not torch.allclose(batch[2], batch[3])
    close(swapped[0], batch[1], "user 5 on row 0 gives user 5's vector")
    with pytest.raises(ValueError, match="user_id must be"):
        enc({"title": title})
    with pytest.raises(ValueError, match="user_id must be"):
        enc({"title": title}, user_id=users[:2])  # one id per user, not per news: the NNR shape mistake


def test_pne_through_the_model_pairs_every_news_with_its_batch_user():
    """Model._gather_news encodes user b's history and candidates with user b's query. With the users expanded by
    `repeat` (NNR) instead of `repeat_interleave`, user 3's news would get user 7's query and vice versa."""
    model = build_model("PNE")
    batch = make_batch(users=(3, 7))
    with torch.no_grad():
        history, candidates, _ = model._gather_news(batch)
        enc = model.news_encoder
        for b, user in enumerate(batch.user.tolist()):
            for name, ids, got in (("history", batch.history, history), ("candidates", batch.candidates, candidates)):
                expected = enc(model.news_features(ids[b]), user_id=torch.full_like(ids[b], user))
                close(got[b], expected, f"{name} of user {user}")
        wrong = enc(model.news_features(batch.candidates[0]), user_id=torch.full_like(batch.candidates[0], 7))
        assert not torch.allclose(candidates[0], wrong), "user 3's candidates must not use user 7's query"
        # Evaluation goes through the same per-user path (no shared news table for a personalized encoder).
        assert model.encode_all_news(torch.arange(1, META.news_num)).numel() == 0
        close(model.score_cached(batch, torch.zeros(0)), model(batch).logits, "cached vs training logits")


# ------------------------------------------------------------------------------------------------------------
# DAE (EBNR)
# ------------------------------------------------------------------------------------------------------------

def dae_news(lengths, seed=0):
    return {"title": tokens(lengths, 8, seed=seed), "abstract": tokens([k * 2 for k in lengths], 12, seed=seed + 1)}


def test_dae_reconstruction_loss_is_the_mean_over_real_news_only():
    enc = build("DAE", Alpha=0.3)
    real = dae_news([4, 2, 6])
    padded = {k: torch.cat([v, torch.zeros(3, v.shape[1], dtype=v.dtype)]) for k, v in real.items()}  # + 3 empty
    with torch.no_grad():
        h, aux = enc.forward_with_aux(real)
        h_padded, aux_padded = enc.forward_with_aux(padded)
        h_wide, aux_wide = enc.forward_with_aux({k: F.pad(v, (0, 5)) for k, v in real.items()})
    assert set(aux) == {"dae_reconstruction"}
    close(aux_padded["dae_reconstruction"], aux["dae_reconstruction"], "padding news changed the loss")
    close(aux_wide["dae_reconstruction"], aux["dae_reconstruction"], "padding tokens changed the loss")
    close(h_padded[:3], h, "padding news changed the real codes")
    close(enc(real), h, "forward returns the code forward_with_aux returns")
    # The formula, by hand: x = sigmoid(mean of the real words of title + abstract); Alpha * mean ||x - x^||^2.
    with torch.no_grad():
        xs = []
        for i in range(3):
            words = torch.cat([real["title"][i][real["title"][i] > 0], real["abstract"][i][real["abstract"][i] > 0]])
            xs.append(torch.sigmoid(enc.embedding(words).mean(0)))
        x = torch.stack(xs)
        code = torch.sigmoid(enc.encoder(x))
        expected = 0.3 * (torch.sigmoid(enc.decoder(code)) - x).pow(2).sum(-1).mean()
    close(h, code, "code")
    close(aux["dae_reconstruction"], expected, "reconstruction loss")
    # Only padding: no real news, a zero loss (not NaN).
    with torch.no_grad():
        _, empty = enc.forward_with_aux(dae_news([0, 0]))
    assert empty["dae_reconstruction"].item() == 0.0


def test_dae_loss_reaches_model_output_weighted_by_alpha():
    outputs = {}
    for alpha in (0.1, 0.4):
        model = build_model("DAE", Alpha=alpha).train()
        outputs[alpha] = model(make_batch())
    low, high = outputs[0.1], outputs[0.4]
    assert set(low.aux) == {"dae_reconstruction"} and low.aux["dae_reconstruction"].item() > 0
    close(high.aux["dae_reconstruction"], 4 * low.aux["dae_reconstruction"], "aux scales with --Alpha")
    ce = F.cross_entropy(low.logits, make_batch().target)
    close(low.loss, ce + low.aux["dae_reconstruction"], "loss = cross-entropy + weighted reconstruction")
    low.loss.backward()
    model = build_model("DAE", Alpha=0.0).train()
    out = model(make_batch())
    assert out.aux == {} and torch.allclose(out.loss, F.cross_entropy(out.logits, make_batch().target))


def test_dae_loss_in_the_model_ignores_the_padding_news():
    """The batch's padded history slot is news 0 (all padding); a batch without it gives the same loss when the
    real news are the same."""
    model = build_model("DAE", Alpha=0.5)
    with torch.no_grad():
        ids = torch.tensor([1, 2, 4, 5, 6])
        _, with_pad = model.news_encoder.forward_with_aux(model.news_features(torch.cat([torch.zeros(1).long(), ids])))
        _, without = model.news_encoder.forward_with_aux(model.news_features(ids))
    close(with_pad["dae_reconstruction"], without["dae_reconstruction"], "news 0 changed the loss")


# ------------------------------------------------------------------------------------------------------------
# KCNN (DKN)
# ------------------------------------------------------------------------------------------------------------

def kcnn_meta(missing=(3,)) -> CorpusMeta:
    gen = np.random.default_rng(0)
    matrix = gen.normal(size=(META.entity_num, FLAGS["entity_embedding_dim"])).astype(np.float32)
    matrix[0] = 0
    for i in missing:  # entity ids with no vector in entity_embedding.vec: zero rows (MIND_corpus.read_entity_vectors)
        matrix[i] = 0
    return CorpusMeta(**{**vars(META), "entity_embeddings": matrix})


def test_kcnn_uses_the_corpus_entity_vectors_frozen_and_counts_missing_ones():
    meta = kcnn_meta(missing=(3, 5))
    enc = build("KCNN", meta=meta)
    assert enc.missing_entity_vectors == 2
    assert not enc.entity_embedding.weight.requires_grad
    assert torch.equal(enc.entity_embedding.weight, torch.from_numpy(meta.entity_embeddings))
    assert enc.output_dim == 2 * 3  # two window sizes x 3 filters
    with pytest.raises(ValueError, match="--entity_embedding_dim=7"):
        build("KCNN", meta=meta, entity_embedding_dim=100)
    random = build("KCNN")  # no entity matrix (unit tests, corpora without entity_embedding.vec)
    assert random.missing_entity_vectors == 0 and random.entity_embedding.weight.requires_grad


def test_kcnn_entity_channels_follow_the_token_alignment():
    enc = build("KCNN", meta=kcnn_meta(missing=(3,)))
    with torch.no_grad():  # as after training: g(0) = tanh(b) != 0, so "no entity" must be masked, not implied
        enc.entity_transform.bias.uniform_(0.5, 1.0)
        enc.context_transform.bias.uniform_(-1.0, -0.5)
    title = tokens([5], 7)

    def encode(entities, t=title):
        with torch.no_grad():
            return enc({"title": t, "title_entity": torch.tensor([entities])})

    none = encode([0, 0, 0, 0, 0, 0, 0])
    on_token_2 = encode([0, 0, 2, 0, 0, 0, 0])
    assert not torch.allclose(none, on_token_2), "an entity on a real token must change the vector"
    assert not torch.allclose(on_token_2, encode([0, 0, 0, 0, 2, 0, 0])), "where the entity sits matters"
    close(encode([0, 0, 2, 0, 0, 4, 1]), on_token_2, "entity ids on padding positions must be ignored")
    close(encode([0, 0, 3, 0, 0, 0, 0]), none, "an entity without a vector must count as no entity")
    # Trimming the padding away (as Model.news_features does) changes nothing.
    close(enc({"title": title[:, :5], "title_entity": torch.tensor([[0, 0, 2, 0, 0]])}), on_token_2, "trimmed")
    # The no-entity channels are exactly zero, the word channel is the word embedding.
    channels, _ = enc.channels({"title": title, "title_entity": torch.tensor([[0, 0, 2, 0, 3, 0, 0]])})
    assert channels.shape == (1, 7, 3, FLAGS["word_embedding_dim"])
    assert channels[0, [0, 1, 3, 4, 5, 6], 1:].abs().sum() == 0 and channels[0, 2, 1:].abs().sum() > 0
    close(channels[0, :, 0], enc.embedding(title[0]), "word channel")


# ------------------------------------------------------------------------------------------------------------
# HDC (FIM)
# ------------------------------------------------------------------------------------------------------------

def test_hdc_output_length_is_constant_under_title_trimming():
    enc = build("HDC")
    lh, e, f = FLAGS["max_title_length"] + 2, FLAGS["word_embedding_dim"], FLAGS["HDC_filter_num"]
    assert (enc.hdc_levels, enc.hdc_length, enc.hdc_embedding_dim, enc.hdc_filters) == (3, lh, e, f)
    assert enc.output_dim == lh * e + 3 * lh * f
    assert enc.layout(make_config()) == {"levels": 3, "length": lh, "embedding_dim": e, "filters": f}
    title = tokens([4, 2, 0], FLAGS["max_title_length"])
    news = {"title": title, "category": torch.tensor([1, 2, 0]), "subcategory": torch.tensor([3, 1, 0])}
    with torch.no_grad():
        full = enc(news)
        assert full.shape == (3, enc.output_dim)
        # What Model.news_features leaves after trimming to the longest title of a batch.
        for width in (4, 6):
            close(enc({**news, "title": title[:, :width]}), full, f"trimmed to {width}")
        alone = enc({k: v[1:2] if v.dim() == 1 else v[1:2, :2] for k, v in news.items()})
        close(alone, full[1:2], "a batch whose longest title has 2 tokens")
    with pytest.raises(ValueError, match="max_title_length"):
        enc({**news, "title": F.pad(title, (0, 1))})


def test_hdc_layout_is_what_split_says():
    enc = build("HDC")
    title = tokens([4, 1], 5)
    news = {"title": title, "category": torch.tensor([1, 2]), "subcategory": torch.tensor([3, 0])}
    with torch.no_grad():
        d0, dl = enc.split(enc(news))
    lh = enc.hdc_length
    assert d0.shape == (2, lh, enc.hdc_embedding_dim) and dl.shape == (2, 3, lh, enc.hdc_filters)
    close(d0[0, 0], enc.category_embedding.weight[1], "position 0 = category")
    close(d0[0, 1], enc.subcategory_embedding.weight[3], "position 1 = subcategory")
    close(d0[0, 2:6], enc.embedding(title[0, :4]), "positions 2.. = title words")
    # Padded positions (and the missing subcategory of news 1) are zero at every level; real ones are not.
    assert d0[0, 6:].abs().sum() == 0 and dl[0, :, 6:].abs().sum() == 0
    assert dl[1, :, 1].abs().sum() == 0 and dl[1, :, 3:].abs().sum() == 0
    assert (dl[0, :, :6].abs().sum(-1) > 0).all(), "every real position carries features at every level"
    # Level 2 sees further than level 1: changing word 4 moves level 3 at position 0 (dilations 1+2+3 reach it).
    changed = title.clone()
    changed[0, 3] = (changed[0, 3] % (META.vocab_size - 1)) + 1
    with torch.no_grad():
        _, dl2 = enc.split(enc({**news, "title": changed}))
    assert torch.allclose(dl2[0, 0, 0], dl[0, 0, 0]) and not torch.allclose(dl2[0, 2, 0], dl[0, 2, 0])


def test_hdc_pairs_only_with_fim():
    with pytest.raises(ValueError, match="FIM"):
        check_pairing("HDC", "MHSA")


# ------------------------------------------------------------------------------------------------------------
# CNE and the ablations (CNE-SUE), NAML ablations
# ------------------------------------------------------------------------------------------------------------

def cne_news(title_lengths=(5, 3, 1, 0), abstract_lengths=(9, 0, 4, 0), seed=0):
    n = len(title_lengths)
    return {"title": tokens(title_lengths, 7, seed=seed), "abstract": tokens(abstract_lengths, 11, seed=seed + 1),
            "category": torch.tensor([1, 2, 3, 0][:n]), "subcategory": torch.tensor([4, 1, 2, 0][:n])}


def encode_reading(name, news):
    enc = build(name)
    with torch.no_grad():
        return enc(news), enc


@pytest.mark.parametrize("name, reads, ignores", [
    ("CNE_Title", "title", "abstract"), ("CNE_Content", "abstract", "title"),
    ("NAML_Title", "title", "abstract"), ("NAML_Content", "abstract", "title"),
])
def test_single_view_ablations_read_only_their_view(name, reads, ignores):
    news = cne_news(abstract_lengths=(9, 2, 4, 0))
    base, enc = encode_reading(name, news)
    assert reads in enc.features and ignores not in enc.features
    other = cne_news(abstract_lengths=(9, 2, 4, 0), seed=5)
    with torch.no_grad():
        close(enc({**news, ignores: other[ignores]}), base, f"{name} must not read the {ignores}")
        moved = enc({**news, reads: other[reads]})
    assert not torch.allclose(moved[:3], base[:3]), f"{name} must read the {reads}"


def test_cne_dims_and_components_of_each_ablation():
    h, ec = FLAGS["hidden_dim"], FLAGS["category_embedding_dim"] + FLAGS["subcategory_embedding_dim"]
    parts = {}
    for name in ("CNE", "CNE_Title", "CNE_Content", "CNE_wo_CS", "CNE_wo_CA"):
        enc = build(name)
        parts[name] = {n.split(".")[0] for n, _ in enc.named_parameters()}
        assert enc.output_dim == 2 * h * len(enc.views) + ec
    assert {"gate_h", "gate_m", "cross"} <= parts["CNE"]
    assert "cross" in parts["CNE_wo_CS"] and not {"gate_h", "gate_m"} & parts["CNE_wo_CS"]
    assert {"gate_h", "gate_m"} <= parts["CNE_wo_CA"] and "cross" not in parts["CNE_wo_CA"]
    assert not {"gate_h", "gate_m", "cross"} & (parts["CNE_Title"] | parts["CNE_Content"])


def title_part(vectors):
    return vectors[:, : 2 * FLAGS["hidden_dim"]]


def test_cne_title_vector_depends_on_the_abstract_through_each_component():
    """A one-token title: cross-attention over one position returns it whatever the query, so only the
    cross-selective gate lets the abstract move the title vector -> CNE and CNE_wo_CA move, CNE_wo_CS does not.
    With the gate's abstract input switched off (W_m = 0, bias kept), only cross-attention is left -> for a longer
    title CNE and CNE_wo_CS move, CNE_wo_CA does not."""
    news = cne_news(title_lengths=(1, 4), abstract_lengths=(6, 6))
    other = {**news, "abstract": cne_news(title_lengths=(1, 4), abstract_lengths=(5, 8), seed=9)["abstract"]}

    def moves(enc, row):
        with torch.no_grad():
            return not torch.allclose(title_part(enc(news))[row], title_part(enc(other))[row], atol=1e-6)

    assert moves(build("CNE"), 0) and moves(build("CNE_wo_CA"), 0) and not moves(build("CNE_wo_CS"), 0)
    no_memory = {}
    for name in ("CNE", "CNE_wo_CS", "CNE_wo_CA"):
        enc = build(name)
        if enc.cross_selective:
            with torch.no_grad():
                for layer in enc.gate_m.values():
                    layer.weight.zero_()
        no_memory[name] = moves(enc, 1)
    assert no_memory == {"CNE": True, "CNE_wo_CS": True, "CNE_wo_CA": False}


def test_cne_empty_abstract_gives_finite_vectors_and_zero_abstract_part():
    enc = build("CNE_Content")
    with torch.no_grad():
        out = enc(cne_news())
    assert torch.isfinite(out).all()
    assert out[1, : 2 * FLAGS["hidden_dim"]].abs().sum() == 0, "an empty abstract has nothing to attend to"
