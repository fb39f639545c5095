"""The NNR zoo user encoders and click predictors beyond the generic checks of test_encoders.py: each test names
the behaviour it guards, and most fail on a known bug of the reference code (README: Where we differ).

Legend: B users, H history, C candidates, D news dim, K archives (OMAP), G categories (SUE), N = H + G nodes.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from config import Config, build_parser
from dataset import Batch
from layers import masked_softmax
from MIND_corpus import CorpusMeta
from model import CLICK_PREDICTORS, Model, check_pairing, get_click_predictor
from newsEncoders import NEWS_ENCODERS
from userEncoders import USER_ENCODERS, UserInputs, scatter_softmax, sue_graph

META = CorpusMeta(vocab_size=40, category_num=5, subcategory_num=7, user_num=9, entity_num=6, news_num=12)
FLAGS = {
    "word_embedding_dim": 12, "attention_dim": 6, "cnn_kernel_num": 8, "category_embedding_dim": 4,
    "subcategory_embedding_dim": 4, "dropout_rate": 0, "head_num": 2, "head_dim": 4, "max_title_length": 6,
    "max_abstract_length": 8, "max_history_num": 6, "user_embedding_dim": 4, "personalized_embedding_dim": 5,
    "HDC_filter_num": 2, "gcn_layer_num": 2, "OMAP_head_num": 3, "conv3D_filter_num_first": 3,
    "conv3D_kernel_size_first": 2, "conv3D_filter_num_second": 2, "conv3D_kernel_size_second": 2,
    "maxpooling3D_size": 2, "maxpooling3D_stride": 1,
}
D = 10


def make_config(**flags) -> Config:
    return Config.from_args([f"--{k}={v}" for k, v in {**FLAGS, **flags}.items()])


def build_user(name: str, news_encoder=None, **flags):
    torch.manual_seed(0)
    stub = news_encoder or SimpleNamespace(output_dim=D, category_embedding=None, user_embedding=None)
    return USER_ENCODERS[name](make_config(**flags), META, stub).eval()


def inputs(lengths, h: int, c: int, seed: int = 0, users=None, categories=None, dim: int = D) -> UserInputs:
    """Left-aligned histories (lengths[i] real items of h), c real candidates each; padded slots hold garbage."""
    gen = torch.Generator().manual_seed(seed)
    b = len(lengths)
    mask = torch.arange(h)[None, :] < torch.tensor(lengths)[:, None]
    history = torch.where(mask[..., None], torch.randn(b, h, dim, generator=gen),
                          100 * torch.randn(b, h, dim, generator=gen))
    category = torch.randint(1, META.category_num, (b, h), generator=gen) if categories is None else categories
    return UserInputs(history=history, history_mask=mask,
                      user_id=torch.arange(1, b + 1) if users is None else torch.tensor(users),
                      history_category=category, candidates=torch.randn(b, c, dim, generator=gen),
                      candidate_mask=torch.ones(b, c, dtype=torch.bool),
                      candidate_category=torch.randint(1, META.category_num, (b, c), generator=gen))


def close(a, b, what: str, atol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5, msg=lambda m: f"{what}\n{m}")


def news_table(n: int = META.news_num, seed: int = 0) -> dict[str, np.ndarray]:
    """Row 0 is the padding news; rows 1.. have titles, abstracts, categories."""
    gen = torch.Generator().manual_seed(seed)
    width = FLAGS["max_title_length"]
    lengths = [0] + torch.randint(1, width + 1, (n - 1,), generator=gen).tolist()
    title = torch.zeros(n, width, dtype=torch.long)
    for i, k in enumerate(lengths):
        title[i, :k] = torch.randint(1, META.vocab_size, (k,), generator=gen)
    category = torch.randint(1, META.category_num, (n,), generator=gen)
    subcategory = torch.randint(1, META.subcategory_num, (n,), generator=gen)
    category[0] = subcategory[0] = 0
    abstract = torch.zeros(n, FLAGS["max_abstract_length"], dtype=torch.long)
    table = dict(title=title, abstract=abstract, category=category, subcategory=subcategory,
                 title_entity=torch.zeros_like(title), abstract_entity=torch.zeros_like(abstract))
    return {k: v.numpy().astype(np.int32) for k, v in table.items()}


def build_model(news: str, user: str, **flags) -> Model:
    torch.manual_seed(0)
    return Model(make_config(news_encoder=news, user_encoder=user, **flags), META, news_table())


def make_batch() -> Batch:
    history = torch.tensor([[1, 2, 3, 0], [4, 5, 2, 6], [0, 0, 0, 0]])
    candidates = torch.tensor([[7, 8, 9], [10, 11, 0], [3, 4, 5]])
    return Batch(user=torch.tensor([1, 2, 3]), history=history, history_mask=history > 0, candidates=candidates,
                 candidate_mask=candidates > 0, target=torch.zeros(3, dtype=torch.long))


# ------------------------------------------------------------------------------------------------------------
# OMAP (Hi-Fi Ark)
# ------------------------------------------------------------------------------------------------------------

def test_omap_constant_matrices_are_buffers_that_move_with_the_model():
    """The reference keeps J and I as plain tensors created on one device: .to() leaves them behind."""
    enc = build_user("OMAP")
    buffers = dict(enc.named_buffers())
    assert "off_diagonal" in buffers, "the J - I mask must be a registered buffer"
    close(buffers["off_diagonal"], 1 - torch.eye(FLAGS["OMAP_head_num"]), "J - I")
    assert all(not isinstance(v, torch.Tensor) or k in buffers or isinstance(v, torch.nn.Parameter)
               for k, v in vars(enc).items() if not k.startswith("_")), "a tensor attribute that .to() would not move"
    on_meta = build_user("OMAP").to("meta")  # a device move without a GPU: every tensor must follow
    assert all(t.device.type == "meta" for t in [*on_meta.buffers(), *on_meta.parameters()])
    wide = build_user("OMAP").double().train()
    assert wide.off_diagonal.dtype == torch.float64
    inp = inputs([3, 2], 4, 2)
    inp.history, inp.candidates = inp.history.double(), inp.candidates.double()
    out = wide(inp)
    assert out.user.dtype == torch.float64 and out.aux["hifi_ark_orthogonality"].dtype == torch.float64
    if torch.cuda.is_available():
        gpu = build_user("OMAP").cuda().train()
        cuda_inp = UserInputs(**{k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in vars(inputs([3], 4, 2)).items()})
        assert torch.isfinite(gpu(cuda_inp).aux["hifi_ark_orthogonality"]).all()


def test_omap_archive_softmax_runs_over_history_not_heads():
    """Each archive is a weighted average of the REAL history items: weights over H sum to 1 per head, padded
    items get exactly 0 (the reference softmaxes over the heads, so each item's weights sum to 1 instead)."""
    enc = build_user("OMAP")
    inp = inputs([4, 1, 0], 6, 2)
    with torch.no_grad():
        beta = enc(inp).attention["archives"]  # [B, H, K]
    mask = inp.history_mask
    assert beta.shape == (3, 6, FLAGS["OMAP_head_num"])
    assert (beta[~mask] == 0).all(), "padded history must get exactly zero weight"
    close(beta[:2].sum(1), torch.ones(2, FLAGS["OMAP_head_num"]), "weights over real history items sum to 1")
    assert torch.equal(beta[2], torch.zeros(6, FLAGS["OMAP_head_num"])), "empty history: no weight anywhere"
    assert not torch.allclose(beta[0, :4].sum(-1), torch.ones(4)), "weights must not be normalised over heads"


def test_omap_regulariser_reaches_model_output_weighted_by_the_flag():
    batch = make_batch()
    results = {}
    for coefficient in (0.25, 0.5):
        model = build_model("CNN", "OMAP", HiFi_Ark_regularizer_coefficient=coefficient).train()
        out = model(batch)
        heads = model.user_encoder.heads.detach()
        off = (heads.t() @ heads) * (1 - torch.eye(heads.shape[1]))
        close(out.aux["hifi_ark_orthogonality"], coefficient * torch.linalg.matrix_norm(off), "aux = coef * Omega")
        close(out.loss, F.cross_entropy(out.logits, batch.target) + out.aux["hifi_ark_orthogonality"],
              "the regulariser is added to the loss inside Model.forward")
        results[coefficient] = out.aux["hifi_ark_orthogonality"].item()
    assert results[0.5] == pytest.approx(2 * results[0.25], rel=1e-5)
    model = build_model("CNN", "OMAP", HiFi_Ark_regularizer_coefficient=0).train()
    assert "hifi_ark_orthogonality" not in model(batch).aux
    assert "hifi_ark_orthogonality" not in model.eval()(batch).aux, "no regulariser outside training"


# ------------------------------------------------------------------------------------------------------------
# SUE (CNE-SUE) and its ablations
# ------------------------------------------------------------------------------------------------------------

def hand_built_graph(categories, real, groups, normalization):
    """NNR's per-impression graph, written the slow obvious way (numpy loops)."""
    h = len(categories)
    n = h + groups
    a = np.eye(n, dtype=np.float64)
    present = {categories[i] for i in range(h) if real[i]}
    for i in range(h):
        if not real[i]:
            continue
        a[i, h + categories[i]] = a[h + categories[i], i] = 1
        for j in range(h):
            if j != i and real[j] and categories[j] == categories[i]:
                a[i, j] = 1
    for p in present:
        for q in present:
            a[h + p, h + q] = 1
    deg = a.sum(1)
    if normalization == "asymmetric":
        return a / deg[:, None]
    return a / np.sqrt(deg)[:, None] / np.sqrt(deg)[None, :]


@pytest.mark.parametrize("normalization", ["symmetric", "asymmetric"])
def test_sue_graph_is_built_per_batch_from_category_ids_and_matches_a_hand_built_one(normalization):
    categories = torch.tensor([[2, 1, 2, 3, 4], [1, 1, 1, 0, 0], [3, 0, 2, 1, 4]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    graph = sue_graph(categories, mask, META.category_num, normalization)
    assert graph.shape == (3, 5 + META.category_num, 5 + META.category_num)
    for row in range(3):
        expected = hand_built_graph(categories[row].tolist(), mask[row].tolist(), META.category_num, normalization)
        close(graph[row].double(), torch.from_numpy(expected), f"row {row}")
        close(sue_graph(categories[row:row + 1], mask[row:row + 1], META.category_num, normalization)[0],
              graph[row], f"row {row} alone")
    # Padded slots (whatever category id they carry) are isolated; an empty history gives the identity.
    assert torch.equal(graph[0, 3], F.one_hot(torch.tensor(3), 10).float())
    close(graph[2], torch.eye(10), "empty history")


def test_scatter_softmax_equals_a_dense_masked_softmax_per_group():
    torch.manual_seed(0)
    groups = 4
    logits = (3 * torch.randn(3, 2, 7)).requires_grad_(True)
    index = torch.randint(0, groups, (3, 2, 7))
    mask = torch.rand(3, 2, 7) > 0.3
    mask[2, 1] = False  # a row without real items
    got = scatter_softmax(logits, index, mask, groups)
    dense = sum(masked_softmax(logits, mask & (index == g), dim=-1) for g in range(groups))
    close(got, dense, "scatter softmax vs per-group dense masked softmax")
    assert (got[~mask] == 0).all() and torch.equal(got[2, 1], torch.zeros(7))
    for g in range(groups):  # weights of each non-empty group sum to 1
        in_group = mask & (index == g)
        sums = (got * in_group).sum(-1)
        close(sums[in_group.any(-1)], torch.ones(int(in_group.any(-1).sum())), f"group {g}")
    (got * torch.randn(3, 2, 7)).sum().backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad[~mask] == 0).all()
    huge = logits.detach().masked_fill(~mask, 1e30)  # what sits at padded slots must not matter
    assert torch.equal(scatter_softmax(huge, index, mask, groups), got.detach())


def test_sue_cluster_attention_is_within_category_then_over_present_categories():
    enc = build_user("SUE")
    categories = torch.tensor([[2, 1, 2, 3, 4, 1], [1, 1, 4, 4, 4, 4]])
    inp = inputs([4, 2], 6, 3, categories=categories)
    with torch.no_grad():
        out = enc(inp)
    intra, inter = out.attention["intra"], out.attention["inter"]  # [B, C, H], [B, C, G]
    assert (intra[~inp.history_mask.unsqueeze(1).expand_as(intra)] == 0).all()
    close(intra[0, :, 0] + intra[0, :, 2], torch.ones(3), "category 2 cluster of user 0 (items 0, 2)")
    close(intra[0, :, 1], torch.ones(3), "a one-item cluster")
    close(intra[1, :, 0] + intra[1, :, 1], torch.ones(3), "user 1: categories 4 are padded, not a cluster")
    present = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    assert (inter[~present.unsqueeze(1).expand_as(inter)] == 0).all(), "absent categories (and padding) form no cluster"
    close(inter.sum(-1), torch.ones(2, 3), "inter-cluster weights sum to 1")


def test_sue_wo_hca_attention_is_masked_and_sue_wo_gcn_has_no_graph():
    """The reference's SUE_wo_HCA pools over padded history too."""
    enc = build_user("SUE_wo_HCA")
    assert not enc.candidate_aware and enc.needs_category
    inp = inputs([3, 1, 0], 5, 2)
    with torch.no_grad():
        out = enc(inp)
    w = out.attention["history"]
    assert (w[~inp.history_mask] == 0).all()
    close(w[:2].sum(-1), torch.ones(2), "weights over real history items sum to 1")
    assert torch.equal(out.user[2], torch.zeros(D))
    no_gcn = build_user("SUE_wo_GCN")
    assert not any("gcn" in n or "proxy" in n for n, _ in no_gcn.named_parameters())
    assert any("gcn" in n for n, _ in build_user("SUE").named_parameters())
    # Without a graph, an item's cluster is all that matters: changing another category's items does not move
    # the intra-cluster weights of category 2 in user 0.
    categories = torch.tensor([[2, 1, 2], [1, 1, 1]])
    a, b = inputs([3, 2], 3, 2, categories=categories), inputs([3, 2], 3, 2, categories=categories)
    b.history[0, 1] += 5.0
    with torch.no_grad():
        wa, wb = no_gcn(a).attention["intra"], no_gcn(b).attention["intra"]
    close(wa[0, :, [0, 2]], wb[0, :, [0, 2]], "intra-cluster weights depend on the cluster's items only")


def test_sue_trains_and_evaluates_through_the_model_with_category_ids_from_the_corpus():
    model = build_model("CNN", "SUE").train()
    batch = make_batch()
    out = model(batch)
    out.loss.backward()
    assert model.user_encoder.proxy.grad is not None and model.user_encoder.proxy.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        table = model.encode_all_news(torch.arange(META.news_num))
        close(model.score_cached(batch, table), model(batch).logits, "cached evaluation path")


# ------------------------------------------------------------------------------------------------------------
# CATT (DKN) and PUE (NPA)
# ------------------------------------------------------------------------------------------------------------

def test_catt_gives_padded_history_zero_weight_per_candidate():
    enc = build_user("CATT")
    inp = inputs([3, 1, 0], 5, 4)
    with torch.no_grad():
        out = enc(inp)
        w = out.attention["history"]  # [B, C, H]
        assert w.shape == (3, 4, 5)
        assert (w[~inp.history_mask.unsqueeze(1).expand_as(w)] == 0).all()
        close(w[:2].sum(-1), torch.ones(2, 4), "per-candidate weights sum to 1 over real history")
        assert not torch.allclose(w[0, 0], w[0, 1]), "the weights depend on the candidate"
        close(out.user, w @ inp.history, "user vector per candidate = weighted history")
        enc.max_elements = 1  # one candidate per chunk: same result
        close(enc(inp).user, out.user, "chunked candidates")


def test_pue_query_comes_from_each_users_id():
    enc = build_user("PUE")
    inp = inputs([4, 4, 4], 5, 1, users=[2, 5, 2])
    inp.history[1] = inp.history[0]  # users 2 and 5 with the same history
    inp.history[2] = inp.history[0]
    with torch.no_grad():
        w = enc(inp).attention["history"]
        close(w[2], w[0], "same user, same history -> same weights")
        assert not torch.allclose(w[1], w[0]), "different users attend differently"
        alone = enc(UserInputs(history=inp.history[1:2], history_mask=inp.history_mask[1:2],
                               user_id=torch.tensor([5]))).attention["history"]
        close(alone, w[1:2], "user 5 alone vs in the batch")
    assert torch.equal(enc.user_embedding.weight[0], torch.zeros(FLAGS["user_embedding_dim"])), "unknown user = 0"


def test_pue_shares_pnes_user_embedding_and_works_with_any_news_encoder():
    """NNR has no pairing rule for PUE; with PNE both read one user-ID embedding (NNR's model-level one)."""
    check_pairing("CNN", "PUE", "dot_product")
    model = build_model("PNE", "PUE")
    assert model.user_encoder.user_embedding is model.news_encoder.user_embedding
    out = model.train()(make_batch())
    out.loss.backward()
    assert model.news_encoder.user_embedding.weight.grad[1:3].abs().sum() > 0


# ------------------------------------------------------------------------------------------------------------
# FIM
# ------------------------------------------------------------------------------------------------------------

def fim_stub(length=5, embedding_dim=2, levels=3, filters=2):
    return SimpleNamespace(output_dim=length * (embedding_dim + levels * filters), category_embedding=None,
                           hdc_length=length, hdc_embedding_dim=embedding_dim, hdc_levels=levels, hdc_filters=filters)


def test_fim_scores_do_not_change_when_candidates_are_chunked():
    stub = fim_stub()
    enc = build_user("FIM", news_encoder=stub)
    inp = inputs([4, 2, 0], 5, 7, dim=stub.output_dim)
    calls = []
    enc.conv_first.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        whole = enc(inp).logits
        assert len(calls) == 1
        enc.max_elements = 1
        chunked = enc(inp).logits
    assert len(calls) == 1 + 7, "one candidate per chunk"
    assert whole.shape == (3, 7)
    close(chunked, whole, "chunked vs whole")
    assert not torch.allclose(whole[0], whole[0, :1].expand(7)), "candidates get different scores"


def test_fim_reads_the_hdc_layout_and_refuses_other_news_encoders():
    if "HDC" not in NEWS_ENCODERS:
        pytest.skip("HDC news encoder not registered")
    config = make_config(news_encoder="HDC", user_encoder="FIM")
    torch.manual_seed(0)
    hdc = NEWS_ENCODERS["HDC"](config, META)
    fim = USER_ENCODERS["FIM"](config, META, hdc)
    vectors = torch.randn(3, hdc.output_dim)
    ours, theirs = fim.split_levels(vectors), hdc.split(vectors)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    with pytest.raises(ValueError, match="--news_encoder HDC"):
        USER_ENCODERS["FIM"](config, META, SimpleNamespace(output_dim=12, hdc_embedding_dim=0))
    bad = fim_stub()
    bad.output_dim += 1
    with pytest.raises(ValueError, match="HDC output dim"):
        USER_ENCODERS["FIM"](config, META, bad)
    with pytest.raises(ValueError, match="--conv3D_kernel_size_first"):
        USER_ENCODERS["FIM"](make_config(conv3D_kernel_size_first=9), META, hdc)


def test_hdc_fim_model_trains_and_evaluates_with_the_fim_click_predictor():
    if "HDC" not in NEWS_ENCODERS:
        pytest.skip("HDC news encoder not registered")
    config = make_config(news_encoder="HDC", user_encoder="FIM")  # --click_predictor not typed -> FIM, noted
    assert config.click_predictor == "FIM" and any("--click_predictor=FIM" in n for n in config.notes)
    torch.manual_seed(0)
    model = Model(config, META, news_table()).train()
    batch = make_batch()
    out = model(batch)
    assert out.logits.shape == (3, 3) and torch.isinf(out.logits[1, 2])
    out.loss.backward()
    assert model.user_encoder.out.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        table = model.encode_all_news(torch.arange(META.news_num))
        close(model.score_cached(batch, table), model(batch).logits, "cached evaluation path", atol=1e-4)


# ------------------------------------------------------------------------------------------------------------
# Click predictors and pairing
# ------------------------------------------------------------------------------------------------------------

def test_click_predictor_registry_drives_the_config_choices():
    assert {"dot_product", "mlp", "FIM"} <= set(CLICK_PREDICTORS)
    choices = {a.dest: a.choices for a in build_parser()._actions}
    assert choices["click_predictor"] == sorted(CLICK_PREDICTORS)
    with pytest.raises(ValueError, match=r"unknown --click_predictor 'nope'"):
        get_click_predictor("nope")


def test_mlp_click_predictor_shapes_gradients_and_concat_form():
    torch.manual_seed(0)
    mlp = get_click_predictor("mlp")(make_config(), D)
    candidates = torch.randn(2, 4, D, requires_grad=True)
    shared_user = torch.randn(2, D, requires_grad=True)
    per_candidate = torch.randn(2, 4, D, requires_grad=True)
    s1, s2 = mlp(shared_user, candidates), mlp(per_candidate, candidates)
    assert s1.shape == s2.shape == (2, 4)
    close(s1, mlp(shared_user.unsqueeze(1).expand(2, 4, D), candidates), "[B, D] user = the same user per candidate")
    # The split first layer is NNR's Linear over the concatenation [user; candidate].
    w = torch.cat([mlp.user_proj.weight, mlp.candidate_proj.weight], 1)
    concat = torch.cat([per_candidate, candidates], -1)
    close(s2, mlp.out(F.relu(concat @ w.t() + mlp.user_proj.bias)).squeeze(-1), "MLP([user; candidate])")
    (s1.sum() + s2.sum()).backward()
    for name, p in mlp.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(t.grad.abs().sum() > 0 for t in (candidates, shared_user, per_candidate))


@pytest.mark.parametrize("user", ["ATT", "CATT"])
def test_mlp_click_predictor_trains_in_the_model(user):
    model = build_model("CNN", user, click_predictor="mlp").train()
    out = model(make_batch())
    assert torch.isinf(out.logits[1, 2]) and torch.isfinite(out.logits[0]).all()
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.click_predictor.parameters())


def test_pairing_errors_name_the_valid_partners():
    with pytest.raises(ValueError, match=r"--user_encoder FIM works only with --news_encoder in \['HDC'\]"):
        check_pairing("CNN", "FIM", "FIM")
    if "HDC" in NEWS_ENCODERS:
        with pytest.raises(ValueError, match=r"--user_encoder FIM works only with --click_predictor in \['FIM'\]"):
            check_pairing("HDC", "FIM", "dot_product")
        check_pairing("HDC", "FIM", "FIM")
    with pytest.raises(ValueError, match=r"only --user_encoder in \['FIM'\].*\['dot_product', 'mlp'\]"):
        check_pairing("CNN", "ATT", "FIM")
    max_config = make_config(user_encoder="MINER", miner_aggregation="max")
    with pytest.raises(ValueError, match=r"--user_encoder MINER works only with --click_predictor in \['dot_product'\]"):
        check_pairing("CNN", "MINER", "mlp", max_config)
    check_pairing("CNN", "MINER", "mlp", make_config(user_encoder="MINER"))  # weighted: user vectors
    # A typed contradicting value is kept by the config (no silent override) and rejected when the model is built.
    typed = make_config(news_encoder="CNN", user_encoder="FIM", click_predictor="mlp")
    assert typed.click_predictor == "mlp" and not any("click_predictor" in n for n in typed.notes)
    with pytest.raises(ValueError, match="--news_encoder in"):
        Model(typed, META, news_table())
    assert make_config(user_encoder="SUE").click_predictor == "dot_product"
