"""The models since NNR (issue 25) beyond the generic registry checks of test_encoders.py / test_model_zoo.py /
test_pretraining.py (which pick every registered encoder up): what each one must get right.

Legend: N news, L tokens, B users, H history, C candidates, D news dim, Hd heads, Dh head dim, K channels.

- Fastformer: the additive attention computes the official formula per head with the query reused as the value,
  and padded tokens take no part in the global query or key;
- TANR: the topic loss is weight x the category cross-entropy over the batch's real news, reaches ModelOutput
  through Model.forward in training only, and weight 0 freezes the classifier;
- CAUM: one user vector per candidate; chunking the candidates changes nothing; the outer neighbours are zeros;
- MINS: K channels, each read by its own GRU; the user vector is their last real states;
- the three with a parameter used only sometimes (TANR under --topic_loss_weight=0) or candidate-dependent
  outputs train 2 steps under DDP.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from common import train_pairings_under_ddp
from config import Config
from dataset import Batch
from layers import FastformerAttention
from MIND_corpus import CorpusMeta
from model import Model
from newsEncoders import NEWS_ENCODERS
from userEncoders import USER_ENCODERS, UserInputs

META = CorpusMeta(vocab_size=40, category_num=5, subcategory_num=7, user_num=9, entity_num=6, news_num=12)
FLAGS = {"word_embedding_dim": 12, "attention_dim": 6, "cnn_kernel_num": 8, "dropout_rate": 0, "head_num": 2,
         "head_dim": 4, "max_title_length": 10, "max_abstract_length": 14, "fastformer_hidden_dim": 8,
         "fastformer_head_num": 2, "fastformer_ffn_dim": 8, "caum_dim": 6, "caum_attention_dim": 5,
         "mins_channel_num": 3, "mins_channel_dim": 4}
D = 10


def make_config(**flags) -> Config:
    return Config.from_args([f"--{k}={v}" for k, v in {**FLAGS, **flags}.items()])


def close(a, b, what: str) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}\n{m}")


def news_table(n: int = META.news_num) -> dict[str, np.ndarray]:
    """Row 0 is the padding news (no tokens, category 0); rows 1.. have titles and categories."""
    gen = torch.Generator().manual_seed(0)
    title = torch.randint(1, META.vocab_size, (n, FLAGS["max_title_length"]), generator=gen)
    title[:, 6:] = 0
    title[0] = 0
    category = torch.randint(1, META.category_num, (n,), generator=gen)
    subcategory = torch.randint(1, META.subcategory_num, (n,), generator=gen)
    category[0] = subcategory[0] = 0
    table = dict(title=title, abstract=title.clone(), category=category, subcategory=subcategory)
    return {k: v.numpy().astype(np.int32) for k, v in table.items()}


def build_model(news: str, user: str = "ATT", **flags) -> Model:
    torch.manual_seed(0)
    return Model(make_config(news_encoder=news, user_encoder=user, **flags), META, news_table())


def make_batch() -> Batch:
    history = torch.tensor([[1, 2, 0], [4, 2, 5]])
    candidates = torch.tensor([[6, 7], [8, 3]])
    return Batch(user=torch.tensor([3, 7]), history=history, history_mask=history > 0, candidates=candidates,
                 candidate_mask=candidates > 0, target=torch.zeros(2, dtype=torch.long))


def user_inputs(lengths, h: int, c: int, dim: int = D) -> UserInputs:
    """Left-aligned histories; padded slots hold large garbage, which must not matter."""
    gen = torch.Generator().manual_seed(0)
    mask = torch.arange(h)[None, :] < torch.tensor(lengths)[:, None]
    history = torch.where(mask[..., None], torch.randn(len(lengths), h, dim, generator=gen),
                          100 * torch.randn(len(lengths), h, dim, generator=gen))
    return UserInputs(history=history, history_mask=mask, user_id=torch.arange(1, len(lengths) + 1),
                      candidates=torch.randn(len(lengths), c, dim, generator=gen),
                      candidate_mask=torch.ones(len(lengths), c, dtype=torch.bool))


def build_user(name: str, **flags):
    torch.manual_seed(0)
    stub = SimpleNamespace(output_dim=D, category_embedding=None, user_embedding=None)
    return USER_ENCODERS[name](make_config(**flags), META, stub).eval()


# ------------------------------------------------------------------------------------------------------------
# Fastformer
# ------------------------------------------------------------------------------------------------------------

def test_fastformer_attention_is_the_official_formula_with_the_query_as_value_and_padding_left_out():
    """Per head h: alpha = softmax over real i of (w_q,h . q_i + b) / sqrt(Dh) (w_q,h reads all of q_i, as the
    official code's Linear(dim, heads) does), g_h = sum alpha q_i[h]; p_i = k_i * g; beta likewise from p;
    out_i = W_o(kbar * q_i) + q_i."""
    torch.manual_seed(0)
    heads, dim, length, real = 2, 6, 5, 3  # positions 3, 4 are padding
    att = FastformerAttention(dim, heads)
    assert not any("value" in name for name, _ in att.named_parameters()), "the query is the value (official code)"
    x = torch.randn(1, length, dim)
    mask = torch.arange(length)[None] < real
    with torch.no_grad():
        out = att(x, mask)[0]
        q, k = att.query(x)[0], att.key(x)[0]  # [L, dim]
        dh = dim // heads
        g = torch.empty(dim)
        for h in range(heads):
            alpha = torch.softmax((q[:real] @ att.query_att.weight[h] + att.query_att.bias[h]) / math.sqrt(dh), 0)
            g[h * dh:(h + 1) * dh] = (alpha[:, None] * q[:real, h * dh:(h + 1) * dh]).sum(0)
        p = k * g  # [L, dim]
        kbar = torch.empty(dim)
        for h in range(heads):
            beta = torch.softmax((p[:real] @ att.key_att.weight[h] + att.key_att.bias[h]) / math.sqrt(dh), 0)
            kbar[h * dh:(h + 1) * dh] = (beta[:, None] * p[:real, h * dh:(h + 1) * dh]).sum(0)
        expected = att.transform(kbar * q) + q
    close(out, expected, "Fastformer attention vs the formula")
    # Padded tokens changed (garbage) -> real outputs unchanged; a real token changed -> every output moves.
    y = x.clone()
    y[0, real:] = 1e3
    with torch.no_grad():
        close(att(y, mask)[0, :real], out[:real], "padding took part in the global vectors")
        y[0, 0] += 1
        assert not torch.allclose(att(y, mask)[0, 1], out[1]), "a real token must reach every position"


def test_fastformer_refuses_a_hidden_size_the_heads_do_not_divide():
    import pytest

    with pytest.raises(ValueError, match="--fastformer_hidden_dim 10 is not a multiple of --fastformer_head_num 4"):
        FastformerAttention(10, 4)


def test_plm_fastformer_keeps_the_plm_size_and_refuses_the_hidden_size_flag():
    """PLMFastformer runs at the PLM's hidden size (as PLMNRMS), so --fastformer_hidden_dim is not its setting."""
    plm = Config.from_args(["--news_encoder=PLMFastformer", "--user_encoder=ATT", "--fastformer_hidden_dim=128"])
    assert plm.stray_flags(plm.typed) == [  # what main.py refuses the run with
        "--fastformer_hidden_dim is a setting of news encoder Fastformer, user encoder Fastformer, not of "
        "--news_encoder=PLMFastformer --user_encoder=ATT --click_predictor=dot_product; drop it"]
    user = Config.from_args(["--news_encoder=PLMFastformer", "--user_encoder=Fastformer", "--fastformer_hidden_dim=128"])
    assert user.stray_flags(user.typed) == []


def test_fastformer_news_encoder_has_no_position_embedding_or_layer_norm():
    """The authors' advice for news recommendation: without LayerNorm and position embeddings."""
    enc = NEWS_ENCODERS["Fastformer"](make_config(fastformer_layer_num=3), META)
    kinds = {type(m).__name__ for m in enc.modules()}
    assert "LayerNorm" not in kinds and len(enc.fastformer.layers) == 3 and enc.output_dim == 8
    assert [n for n, _ in enc.named_parameters() if "position" in n] == []


# ------------------------------------------------------------------------------------------------------------
# TANR
# ------------------------------------------------------------------------------------------------------------

def test_tanr_topic_loss_is_weighted_cross_entropy_over_real_news_in_training_only():
    model = build_model("TANR", topic_loss_weight=0.2).train()
    enc = model.news_encoder
    ids = torch.tensor([0, 1, 2, 4, 5])  # news 0: the padding news, category 0
    features = model.news_features(ids)
    vectors, aux = enc.forward_with_aux(features)
    real = features["category"] > 0
    expected = 0.2 * F.cross_entropy(enc.topic(vectors[real]), features["category"][real])
    close(aux["tanr_topic"], expected, "weight x cross-entropy over the real news")
    _, without_pad = enc.forward_with_aux(model.news_features(ids[1:]))
    close(without_pad["tanr_topic"], aux["tanr_topic"], "the padding news changed the loss")
    _, only_pad = enc.forward_with_aux(model.news_features(torch.tensor([0, 0])))
    assert only_pad["tanr_topic"].item() == 0.0, "no real news: a zero loss, not NaN"
    enc.eval()
    assert enc.forward_with_aux(features)[1] == {}, "evaluation computes no topic loss"


def test_tanr_topic_loss_reaches_model_output_and_trains_the_classifier():
    outputs = {}
    for weight in (0.2, 0.8):
        outputs[weight] = build_model("TANR", topic_loss_weight=weight).train()(make_batch())
    low, high = outputs[0.2], outputs[0.8]
    assert set(low.aux) == {"tanr_topic"} and low.aux["tanr_topic"].item() > 0
    close(high.aux["tanr_topic"], 4 * low.aux["tanr_topic"], "aux scales with --topic_loss_weight")
    close(low.loss, F.cross_entropy(low.logits, make_batch().target) + low.aux["tanr_topic"], "loss = CE + topic")
    model = build_model("TANR", topic_loss_weight=0.2).train()
    model(make_batch()).loss.backward()
    assert model.news_encoder.topic.weight.grad.abs().sum() > 0
    off = build_model("TANR", topic_loss_weight=0).train()
    out = off(make_batch())
    assert out.aux == {} and not off.news_encoder.topic.weight.requires_grad, "weight 0: no loss, classifier frozen"


# ------------------------------------------------------------------------------------------------------------
# CAUM
# ------------------------------------------------------------------------------------------------------------

def test_caum_gives_one_user_vector_per_candidate_and_chunking_changes_nothing():
    enc = build_user("CAUM")
    inp = user_inputs([4, 2, 0], h=5, c=6)
    calls = []
    enc.mhsa.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        whole = enc(inp)
        enc.max_elements = 1
        chunked = enc(inp)
    assert len(calls) == 1 + 6, "one candidate per chunk"
    assert whole.user.shape == (3, 6, D) and whole.attention["history"].shape == (3, 6, 5)
    close(chunked.user, whole.user, "chunked vs whole")
    assert not torch.allclose(whole.user[0, 0], whole.user[0, 1]), "the user vector depends on the candidate"
    assert torch.equal(whole.user[2], torch.zeros(6, D)), "an empty history gives zero user vectors"
    close(whole.attention["history"][1, :, 2:], torch.zeros(6, 3), "padded history gets exactly zero weight")


def test_caum_outer_neighbours_are_zeros_not_a_wrap_around():
    """The first click's left neighbour is zero (the official code wraps to the last slot, i.e. padding)."""
    enc = build_user("CAUM")
    inp = user_inputs([3], h=3, c=1)
    seen = {}
    enc.cnn_history.register_forward_hook(lambda m, a, o: seen.update(x=a[0]))  # returns None: output kept
    with torch.no_grad():
        enc(inp)
    x = seen["x"][0]  # [H, 3D]: [h_{i-1}; h_i; h_{i+1}]
    assert torch.equal(x[0, :D], torch.zeros(D)) and torch.equal(x[2, 2 * D:], torch.zeros(D))
    close(x[1, :D], inp.history[0, 0], "left neighbour")
    close(x[1, 2 * D:], inp.history[0, 2], "right neighbour")


# ------------------------------------------------------------------------------------------------------------
# MINS
# ------------------------------------------------------------------------------------------------------------

def test_mins_user_vector_is_each_channels_gru_last_real_state():
    enc = build_user("MINS")
    assert len(enc.grus) == 3 and enc.grus[0] is not enc.grus[1], "one GRU per channel (not one shared)"
    inp = user_inputs([4, 2], h=5, c=2)
    with torch.no_grad():
        user = enc(inp).user
        x = enc.mhsa(inp.history, inp.history_mask).view(2, 5, 3, 4)
        expected = []
        for b, length in enumerate((4, 2)):
            states = [enc.grus[i](x[b:b + 1, :length, i])[0][0, -1] for i in range(3)]
            expected.append(enc.out(torch.cat(states)))
    close(user, torch.stack(expected), "concatenated last real GRU states, projected to D")


# ------------------------------------------------------------------------------------------------------------
# DDP
# ------------------------------------------------------------------------------------------------------------

def test_new_models_train_two_steps_under_ddp(tmp_path):
    """2 DDP steps (find_unused_parameters off) for TANR with and without its topic loss, the new user encoders and
    GLORY (its graph network and candidate encoder); DDP stops at step 2 on a trainable parameter that got no
    gradient."""
    pairings = ["TANR-ATT", "TANR-ATT:--topic_loss_weight=0", "Fastformer-Fastformer", "CNN-CAUM", "CNN-MINS",
                "GLORY-GLORY", "GLORY-GLORY:--glory_hops=2"]
    train_pairings_under_ddp(str(tmp_path), pairings)
