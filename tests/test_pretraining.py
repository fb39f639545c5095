"""Self-supervised pretraining (pretraining.py): each task's loss on a toy case against a direct computation, the
views, the sequences pretraining may read, --train_fraction, and --init_from loading exactly the encoder weights."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pretraining as P
from common import needs_glove50
from dataset import TrainDataset


# -- toy contexts: a task reads only ctx.batch, ctx.user(view), ctx.news(ids), ctx.model --------------------------

class ToyContext(P.Context):
    """A Context whose news vectors are a fixed table (news index -> row) and whose user vectors are given."""

    def __init__(self, model, batch, table: torch.Tensor, users: dict[str, torch.Tensor]):
        super().__init__(model, batch, torch.arange(len(table)), table)
        self.cache.update(users)


def toy_batch(history, user, **views):
    history = torch.tensor(history)
    return P.PretrainBatch(user=torch.tensor(user), history=history, history_mask=history > 0,
                           sample=torch.arange(len(user)), views={k: torch.tensor(v) for k, v in views.items()})


def test_info_nce_equals_the_cross_entropy_of_known_similarities():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    k = torch.tensor([[1.0, 1.0], [0.0, 1.0], [3.0, 0.0]])
    target = torch.tensor([0, 1])
    exclude = torch.tensor([[False, False, True], [False, False, False]])
    got = P.info_nce(q, k, target, exclude, scale=0.5)
    # query 0: similarities 1, 0 (3 excluded) * 0.5; query 1: 2, 2, 0 * 0.5
    want0 = -(0.5 - math.log(math.exp(0.5) + math.exp(0.0)))
    want1 = -(1.0 - math.log(math.exp(1.0) + math.exp(1.0) + math.exp(0.0)))
    torch.testing.assert_close(got, torch.tensor([want0, want1]))
    # the target itself is never excluded
    torch.testing.assert_close(P.info_nce(q, k, target, torch.ones(2, 3, dtype=torch.bool)), torch.zeros(2))


def test_contrastive_loss_is_symmetric_infonce_over_the_other_users():
    z1 = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    z2 = torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])
    users = [5, 7, 5]  # rows 0 and 2 are the same user: not each other's negatives
    task = P.ContrastiveTask(SimpleNamespace(contrastive_temperature=0.5), None, 2, {})
    ctx = ToyContext(None, toy_batch([[1], [2], [3]], users), torch.zeros(4, 2), {"view1": z1 * 3, "view2": z2})
    got = task(ctx)

    def one_side(a, b, i):
        others = [j for j in range(3) if j == i or users[j] != users[i]]
        sims = {j: float(a[i] @ b[j]) / 0.5 for j in others}
        return -(sims[i] - math.log(sum(math.exp(s) for s in sims.values())))

    want = [0.5 * (one_side(z1, z2, i) + one_side(z2, z1, i)) for i in range(3)]  # z1 normalised by the task
    torch.testing.assert_close(got, torch.tensor(want))


def test_next_click_scores_the_batch_next_clicks_and_skips_sequences_without_one():
    table = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # news 0..3
    user = torch.tensor([[2.0, 1.0], [1.0, 3.0], [5.0, 5.0]])
    batch = toy_batch([[1, 2], [3, 1], [2, 0]], [1, 2, 3], next=[2, 1, 0], prefix=[[1, 0], [3, 0], [0, 0]])
    got = P.NextClickTask(None, None, 2, {})(ToyContext(None, batch, table, {"prefix": user}))
    # row 0: keys news 2, 1 (news 0 = no next click: not a candidate): scores 1, 2, right one news 2
    # row 1: scores of news 2, 1: 3, 1, right one news 1
    want = [-(1 - math.log(math.exp(1) + math.exp(2))), -(1 - math.log(math.exp(3) + math.exp(1))), 0.0]
    torch.testing.assert_close(got, torch.tensor(want))


def toy_model(contextual=False, category=None, subcategory=None):
    return SimpleNamespace(contextual=contextual, attr_category=category, attr_subcategory=subcategory)


def test_masked_item_prediction_picks_the_masked_news_from_the_in_batch_masked_news():
    table = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [1.0, 2.0]])
    history = [[1, 2, 3], [4, 2, 0]]
    masked = [[False, True, True], [True, True, False]]  # masked news: 2, 3 (row 0); 4, 2 (row 1)
    user = torch.tensor([[1.0, 0.5], [0.0, 2.0]])  # no contextual outputs: the visible history's user vector
    batch = toy_batch(history, [1, 2], masked=masked)
    ctx = ToyContext(toy_model(), batch, table, {"history/masked": user})
    got = P.MIPTask(None, None, 2, {})(ctx)
    keys = [2, 3, 4, 2]

    def ce(u, right):  # the same news elsewhere (news 2 twice) is no negative
        scores = {}
        for j, n in enumerate(keys):
            if n != keys[right] or j == right:
                scores[j] = float(u @ table[n])
        return -(scores[right] - math.log(sum(math.exp(s) for s in scores.values())))

    want = [(ce(user[0], 0) + ce(user[0], 1)) / 2, (ce(user[1], 2) + ce(user[1], 3)) / 2]
    torch.testing.assert_close(got, torch.tensor(want))


def test_attribute_prediction_is_the_cross_entropy_of_category_and_subcategory():
    meta = SimpleNamespace(category_num=3, subcategory_num=2, entity_num=0)
    cfg = SimpleNamespace(pretrain_entities=False)
    cat, sub = torch.tensor([0, 1, 2, 1]), torch.tensor([0, 1, 0, 0])
    table = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    batch = toy_batch([[1, 2, 0], [3, 0, 0]], [1, 2], masked=[[True, False, False], [True, False, False]])
    aap = P.AAPTask(cfg, meta, 2, {})
    with torch.no_grad():
        aap.heads.category.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]))
        aap.heads.category.bias.zero_()
        aap.heads.subcategory.weight.copy_(torch.tensor([[1.0, 1.0], [0.0, -1.0]]))
        aap.heads.subcategory.bias.zero_()
    model = toy_model(category=cat, subcategory=sub)
    got = aap(ToyContext(model, batch, table, {}))

    def loss(n):
        x = table[n]
        lc = F.log_softmax(aap.heads.category.weight @ x, 0)[cat[n]]
        ls = F.log_softmax(aap.heads.subcategory.weight @ x, 0)[sub[n]]
        return float(-(lc + ls).detach())

    torch.testing.assert_close(got, torch.tensor([(loss(1) + loss(2)) / 2, loss(3)]), atol=1e-6, rtol=1e-6)
    # map: the same heads read the masked positions' queries (here the user vector of the visible history)
    mp = P.MAPTask(cfg, meta, 2, {})
    mp.heads.load_state_dict(aap.heads.state_dict())
    user = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    got = mp(ToyContext(model, batch, table, {"history/masked": user}))
    # row 0 masks news 1 (category 1, subcategory 1) and predicts it from user [0, 1] = the vector of news 2
    lc = F.log_softmax(aap.heads.category.weight @ user[0], 0)[1]
    ls = F.log_softmax(aap.heads.subcategory.weight @ user[0], 0)[1]
    torch.testing.assert_close(got[0], -(lc + ls))
    torch.testing.assert_close(got[1], torch.tensor(loss(3)))  # row 1 masks news 3, predicted from its own vector


def test_segment_prediction_is_the_binary_cross_entropy_against_the_next_sequences_segment():
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    p = torch.tensor([[2.0, 0.0], [0.0, -1.0], [0.5, 0.5]])
    batch = toy_batch([[1, 2], [2, 3], [3, 0]], [1, 2, 3], segment=[[2, 0], [3, 0], [0, 0]])
    got = P.SPTask(None, None, 2, {})(ToyContext(None, batch, torch.zeros(4, 2), {"context": u, "segment": p}))
    sig = (lambda x: 1 / (1 + math.exp(-x)))
    want0 = -math.log(sig(u[0] @ p[0])) - math.log(sig(-(u[0] @ p[1])))
    want1 = -math.log(sig(u[1] @ p[1]))  # the next sequence (row 2) has no segment: no negative term
    torch.testing.assert_close(got, torch.tensor([want0, want1, 0.0]))


# -- views and sequences ------------------------------------------------------------------------------------

SETTINGS = SimpleNamespace(contrastive_views="crop,mask,reorder", contrastive_crop_ratio=0.5, contrastive_mask_ratio=0.5,
                           contrastive_reorder_ratio=0.5, pretrain_mask_ratio=0.3, sp_max_ratio=0.5)


def test_views_keep_what_they_promise():
    items = np.arange(1, 11)
    rng = np.random.default_rng(0)
    for _ in range(50):
        crop = P.make_view(items, "crop", rng, SETTINGS, 12)
        kept = crop[crop > 0]
        assert len(kept) == 5 and (np.diff(kept) == 1).all()  # contiguous
        mask = P.make_view(items, "mask", rng, SETTINGS, 12)
        kept = mask[mask > 0]
        assert 1 <= len(kept) <= 10 and (np.diff(kept) > 0).all()  # a subsequence in order
        re = P.make_view(items, "reorder", rng, SETTINGS, 12)
        changed = np.flatnonzero(re[:10] != items)
        assert sorted(re[:10]) == list(items) and (len(changed) == 0 or changed[-1] - changed[0] < 5)
        v = P.sequence_views(items, {"prefix", "masked", "segment"}, rng, SETTINGS, 12)
        t = int((v["prefix"] > 0).sum())
        assert 1 <= t <= 9 and v["next"] == items[t]
        assert 1 <= v["masked"].sum() <= 9 and not v["masked"][10:].any()
        seg, ctx = v["segment"][v["segment"] > 0], v["context"][v["context"] > 0]
        assert 1 <= len(seg) <= 5 and sorted([*seg, *ctx]) == list(items)
    one = P.sequence_views(np.array([4]), {"prefix", "masked", "segment"}, rng, SETTINGS, 3)
    assert one["next"] == 0 and not one["masked"].any() and not one["segment"].any()


def test_a_sequences_views_depend_on_seed_epoch_and_row_only():
    seqs = P.Sequences(np.array([[1, 2, 3, 4, 5, 6], [7, 8, 9, 0, 0, 0], [2, 4, 6, 8, 0, 0]]), np.array([1, 2, 3]))
    ds = P.PretrainDataset(seqs, np.arange(3), {"pair", "prefix", "masked", "segment"}, SETTINGS, seed=3)
    whole, alone = ds[np.arange(3)], ds[np.array([2])]
    for k in whole.views:
        assert torch.equal(whole.views[k][2:], alone.views[k]), k
    ds.set_epoch(1)
    assert any(not torch.equal(whole.views[k], ds[np.arange(3)].views[k]) for k in whole.views)


def behaviours(histories, history_row, user, candidates=None, labels=None, offsets=None):
    out = {"histories": np.array(histories), "history_row": np.array(history_row), "user": np.array(user)}
    if candidates is not None:
        out.update(candidates=np.array(candidates), labels=np.array(labels, dtype=np.int8), offsets=np.array(offsets))
    return out


def test_sequences_are_train_histories_with_their_clicks_and_other_splits_histories_only():
    train = behaviours([[1, 2, 0], [3, 0, 0]], [0, 1, 0], [1, 2, 1],
                       candidates=[5, 6, 7, 8, 9], labels=[1, 0, 1, 1, 0], offsets=[0, 2, 4, 5])
    # dev arrays without candidates or labels at all: pretraining must not need them
    dev = behaviours([[2, 3, 4], [0, 0, 0]], [0, 1, 0], [2, 3, 2])
    seqs = P.build_sequences(train, [("dev", dev)], max_history=3)
    rows = {tuple(r) for r in seqs.news.tolist()}
    # impression 3: history 1 2 and no click; dev: its histories, the empty one dropped
    assert rows == {(1, 2, 5), (3, 7, 8), (1, 2, 0), (2, 3, 4)} and len(seqs.news) == 4
    assert seqs.user.tolist() == [1, 2, 1, 2]
    assert seqs.counts["empty (dropped)"] == 1 and seqs.counts["dev histories"] == 2


def test_holdout_takes_whole_users():
    seqs = P.Sequences(np.arange(1, 41).reshape(20, 2), np.repeat(np.arange(1, 11), 2))
    train, held = P.holdout_split(seqs, 0.2, seed=0)
    assert len(held) == 4 and not set(seqs.user[train]) & set(seqs.user[held])
    assert sorted([*train, *held]) == list(range(20))


def test_train_fraction_keeps_a_seeded_share_of_the_impressions():
    n = 50
    beh = {"labels": np.tile(np.array([1, 0, 0], dtype=np.int8), n), "offsets": np.arange(0, 3 * n + 1, 3),
           "candidates": np.arange(1, 3 * n + 1), "user": np.arange(n), "history_row": np.zeros(n, dtype=np.int64),
           "histories": np.zeros((1, 3), dtype=np.int64), "path": "x"}
    full = TrainDataset(beh, 2, seed=1)
    part = TrainDataset(beh, 2, seed=1, fraction=0.1)
    again = TrainDataset(beh, 2, seed=1, fraction=0.1)
    other = TrainDataset(beh, 2, seed=2, fraction=0.1)
    assert len(full) == n and len(part) == part.kept_impressions == 5
    assert set(part.sample_impression) <= set(full.sample_impression)
    assert np.array_equal(part.sample_impression, again.sample_impression)
    assert not np.array_equal(part.sample_impression, other.sample_impression)


def test_pretraining_flags_are_checked_and_belong_to_their_tasks():
    from config import Config

    cfg = Config.from_args(["--mode=pretrain", "--pretrain_tasks=sp,mip", "--sp_weight=2", "--pretrain_mask_ratio=0.5"])
    assert cfg.sp_weight == 2 and cfg.pretrain_mask_ratio == 0.5
    cases = [
        (["--mode=pretrain", "--pretrain_tasks=contrastive", "--sp_weight=2"], r"--sp_weight is a setting of "
         r"--mode=pretrain with --pretrain_tasks including sp; drop it"),
        (["--mode=train", "--contrastive_temperature=0.5"], r"--contrastive_temperature is a setting of"),
        (["--mode=train", "--pretrain_tasks=mip"], r"--pretrain_tasks is a setting of --mode=pretrain"),
        (["--mode=pretrain", "--pretrain_tasks=mip,cloze"], r"unknown --pretrain_tasks 'cloze'; choose from"),
        (["--mode=pretrain", "--pretrain_tasks=contrastive", "--contrastive_temperature=0"],
         r"--contrastive_temperature must be > 0"),
        (["--mode=pretrain", "--pretrain_tasks=contrastive", "--contrastive_views=crop,rotate"],
         r"--contrastive_views must be a comma-separated list of crop, mask, reorder"),
        (["--mode=pretrain", "--init_from=x"], r"--init_from .* use it with --mode=train"),
        (["--mode=train", "--train_fraction=1.5"], r"--train_fraction must be in \(0, 1\], got 1.5"),
    ]
    for argv, message in cases:
        with pytest.raises(ValueError, match=message):
            Config.from_args(argv)


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    from common import TINY_DEMO
    from config import Config
    from main import load_corpus

    data = tmp_path_factory.mktemp("pretrain_zoo") / "data"
    cfg = Config.from_args(["--mode=pretrain", "--dataset=demo", f"--data_dir={data}", *TINY_DEMO])
    return data, load_corpus(cfg, log=lambda *a, **k: None)


@pytest.mark.parametrize("user_encoder", sorted(__import__("userEncoders").USER_ENCODERS))
def test_every_user_encoder_with_user_vectors_pretrains_with_every_task(user_encoder, tiny_corpus):
    """One step of all tasks together: a finite loss, and a gradient for every trainable weight of the encoders and
    the heads; an encoder that returns no user vector (FIM) is refused at construction, as is GLORY (the only
    partner of its user encoder is a news encoder that cannot be pretrained; tests/test_glory.py)."""
    from common import SMALL_MODEL, TINY_DEMO
    from config import Config
    from model import get_user_encoder

    data, corpus = tiny_corpus
    news = {"FIM": "HDC", "GLORY": "GLORY"}.get(user_encoder, "MHSA")
    cfg = Config.from_args(["--mode=pretrain", "--dataset=demo", f"--data_dir={data}", f"--news_encoder={news}",
                            f"--user_encoder={user_encoder}", "--pretrain_tasks=contrastive,next_click,mip,map,aap,sp",
                            *TINY_DEMO, *SMALL_MODEL])
    if news == "GLORY":
        corpus.add_click_graph(cfg.glory_neighbors)  # as main.load_corpus does for GLORY
        with pytest.raises(ValueError, match="--news_encoder GLORY cannot be pretrained"):
            P.PretrainModel(cfg, corpus.meta, corpus.news)
        return
    if not get_user_encoder(user_encoder).returns_user_vectors(cfg):
        with pytest.raises(ValueError, match="returns no user vector"):
            P.PretrainModel(cfg, corpus.meta, corpus.news)
        return
    torch.manual_seed(0)
    model = P.PretrainModel(cfg, corpus.meta, corpus.news)
    seqs = P.build_sequences(corpus.behaviors("train"), [], cfg.max_history_num)
    data_set = P.PretrainDataset(seqs, np.arange(len(seqs.user)), model.view_kinds(), cfg, seed=0)
    out = model(data_set[np.arange(24)])
    assert torch.isfinite(out.loss) and set(out.aux) >= {"contrastive", "next_click", "mip", "map", "aap", "sp"}
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


@needs_glove50
def test_pretraining_starts_from_the_same_glove_words_as_training(tiny_corpus):
    """A word-based news encoder is pretrained from GloVe, as it is trained: --init_from must not hand fine-tuning
    word vectors that started random (they did: --mode=pretrain loaded no GloVe)."""
    from common import SMALL_MODEL, TINY_DEMO
    from config import Config
    from main import load_corpus

    data, _ = tiny_corpus
    tables = []
    for mode in ("train", "pretrain"):
        cfg = Config.from_args([f"--mode={mode}", "--dataset=demo", f"--data_dir={data}", *TINY_DEMO, *SMALL_MODEL])
        tables.append(load_corpus(cfg, log=lambda *a, **k: None).meta.word_embeddings)
    assert tables[0] is not None and tables[1] is not None
    np.testing.assert_array_equal(tables[0], tables[1])
