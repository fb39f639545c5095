"""GLORY (issue 25) beyond the zoo checks every encoder passes (test_encoders.py, test_model_zoo.py, the DDP steps of
test_recent_models.py):

- the global click graph on a hand-made history set: directed edges between consecutive clicks, weights = users,
  each user once (their first impression's history), padding and repeated clicks add nothing, top-k by weight with
  ties to the smaller news index;
- from a corpus: only the train split is read, dev histories never add an edge, the cache is reused and rebuilt
  when the train file changes;
- the ego graph of a news, the gated graph convolution against the formula (and its pruned layers), a graph vector
  that depends on the news' own neighbourhood only, the user side (click fusion, candidate encoder);
- refusals: no graph attached, a graph of another width, other partners, --category_fusion, --mode=pretrain;
- main() train -> dev -> test on a tiny generated demo.

Legend: N news, k neighbours kept, M ego slots, R ego nodes, B users, H history, C candidates, d local news size.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from click_graph import build_click_graph
from config import Config
from demo_corpus import ensure_demo
from main import cli, main
from MIND_corpus import CorpusMeta, Corpus
from model import check_pairing
from newsEncoders import NEWS_ENCODERS, GatedGraphConv
from userEncoders import USER_ENCODERS, UserInputs

SMALL = {"word_embedding_dim": 12, "head_num": 2, "head_dim": 4, "attention_dim": 6, "dropout_rate": 0}
META = CorpusMeta(vocab_size=40, category_num=5, subcategory_num=7, user_num=9, entity_num=6, news_num=12)
SIZES = dict(num_news=150, num_users=60, num_train_impressions=60, num_dev_impressions=24, num_test_impressions=6)


def close(a, b, what: str, atol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5, msg=lambda m: f"{what}\n{m}")


# ------------------------------------------------------------------------------------------------------------
# The graph
# ------------------------------------------------------------------------------------------------------------

def toy_graph(k: int):
    """Five users over news 1..9. History rows (H = 5, left-aligned, length per row):
    r0 [1 2 3] user 1's first impression; r1 [2 3] users 2 and 4 (one row: MIND histories are de-duplicated by text,
    but each user counts); r2 [5 4 4 3] user 3 (4 -> 4 adds nothing); r3 [8 9] user 1's later impression (ignored:
    each user once); r4 [7 3 | 6 ...] user 5, length 2 (the 3 -> 6 after its length is padding)."""
    histories = np.array([[1, 2, 3, 0, 0], [2, 3, 0, 0, 0], [5, 4, 4, 3, 0], [8, 9, 0, 0, 0], [7, 3, 6, 0, 0]])
    length = np.array([3, 2, 4, 2, 2])
    # Impressions in file order: user 5 first, so 7 -> 3 is counted before 4 -> 3 (the tie must not follow that).
    user = np.array([5, 1, 2, 3, 1, 4])
    history_row = np.array([4, 0, 1, 2, 3, 1])
    return build_click_graph(user, history_row, histories, length, news_num=10, k=k)


def test_click_graph_of_hand_made_histories_edges_weights_each_user_once_top_k_ties():
    arrays, stats = toy_graph(k=2)
    table, weights = arrays["click_graph"], arrays["click_weights"]
    assert table.shape == (10, 3) and weights.shape == (10, 2)
    assert table[:, 0].tolist() == list(range(10)), "column 0 is each news' own index"
    # 3's in-neighbours: 2 (users 1, 2 and 4: weight 3), then 4 and 7 (weight 1 each; the tie goes to 4, the smaller
    # index, although 7 -> 3 was counted first); k = 2 keeps two.
    assert table[3, 1:].tolist() == [2, 4] and weights[3].tolist() == [3, 1]
    assert table[2, 1:].tolist() == [1, 0] and weights[2].tolist() == [1, 0]
    assert table[4, 1:].tolist() == [5, 0], "4 -> 4 (a repeated click) is no edge"
    assert table[9, 1:].tolist() == [0, 0], "user 1's second history is not read"
    assert table[6, 1:].tolist() == [0, 0], "slots after a history's length are padding"
    for news in (0, 1, 5, 7, 8):
        assert table[news, 1:].tolist() == [0, 0]
    assert stats == dict(users=5, edges=5, news_with_neighbours=3)  # 1->2, 2->3, 5->4, 4->3, 7->3
    wide, _ = toy_graph(k=4)
    assert wide["click_graph"][3, 1:].tolist() == [2, 4, 7, 0], "k = 4: the third neighbour, then none"


@pytest.fixture()
def demo(tmp_path):
    data = tmp_path / "data"
    ensure_demo(data, **SIZES)
    return data


def corpus_of(data: Path, logs: list | None = None) -> Corpus:
    config = Config.from_args(["--dataset=demo", f"--data_dir={data}", "--max_history_num=10"])
    return Corpus(config, need_glove=False, log=(logs.append if logs is not None else lambda *a: None))


def test_corpus_graph_reads_only_the_train_split_and_matches_the_builder(demo, monkeypatch):
    corpus = corpus_of(demo)
    read = []
    original = Corpus.behaviors
    monkeypatch.setattr(Corpus, "behaviors", lambda self, split: read.append(split) or original(self, split))
    corpus.add_click_graph(3)
    assert read == ["train"]
    train = original(corpus, "train")
    expected, _ = build_click_graph(train["user"], train["history_row"], train["histories"], train["history_length"],
                                    corpus.meta.news_num, 3)
    assert np.array_equal(corpus.news["click_graph"], expected["click_graph"])
    assert np.array_equal(corpus.news["click_weights"], expected["click_weights"])
    assert (corpus.news["click_graph"][:, 1:] > 0).any(), "the demo's train histories give edges"


def reversed_histories(path: Path) -> None:
    """Rewrite a behaviors.tsv with every history reversed (same size; every edge turned round)."""
    lines = path.read_text().splitlines()
    out = []
    for line in lines:
        cols = line.split("\t")
        cols[3] = " ".join(reversed(cols[3].split()))
        out.append("\t".join(cols))
    path.write_text("\n".join(out) + "\n")


def test_graph_cache_is_reused_ignores_dev_and_is_rebuilt_when_the_train_file_changes(demo):
    logs: list = []
    first = corpus_of(demo, logs)
    first.add_click_graph(3)
    table = np.array(first.news["click_graph"])
    assert "(built)" in logs[-1]
    # Dev histories reversed: the graph neither changes nor is rebuilt (dev is not in its key, nor read).
    reversed_histories(demo / "MIND-demo" / "dev" / "behaviors.tsv")
    logs.clear()
    again = corpus_of(demo, logs)
    again.add_click_graph(3)
    assert "(cache)" in logs[-1] and np.array_equal(again.news["click_graph"], table)
    # The train file changed (its edges reversed): rebuilt, and different.
    train_file = demo / "MIND-demo" / "train" / "behaviors.tsv"
    reversed_histories(train_file)
    os.utime(train_file, ns=(train_file.stat().st_atime_ns, train_file.stat().st_mtime_ns + 10 ** 9))
    logs.clear()
    changed = corpus_of(demo, logs)
    changed.add_click_graph(3)
    assert "(built)" in logs[-1]
    assert not np.array_equal(changed.news["click_graph"], table)
    # Another k is another cache entry.
    logs.clear()
    changed.add_click_graph(2)
    assert "(built)" in logs[-1] and changed.news["click_graph"].shape[1] == 3


# ------------------------------------------------------------------------------------------------------------
# The encoders
# ------------------------------------------------------------------------------------------------------------

def news_encoder(**flags):
    torch.manual_seed(0)
    config = Config.from_args([f"--{k}={v}" for k, v in {**SMALL, "glory_neighbors": 2, **flags}.items()])
    return NEWS_ENCODERS["GLORY"](config, META).eval()


# Hand table over 12 news, k = 2: 1 <- {2, 3}; 2 <- {3}; 3 <- {1, 2}; 4 <- {5}; 5 <- {6}; 6 <- {7}.
HAND = torch.tensor([[0, 0, 0], [1, 2, 3], [2, 3, 0], [3, 1, 2], [4, 5, 0], [5, 6, 0], [6, 7, 0], [7, 0, 0],
                     [8, 0, 0], [9, 0, 0], [10, 0, 0], [11, 0, 0]])


def titles(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    out = torch.randint(1, META.vocab_size, (META.news_num, 6), generator=gen)
    out[:, 4:] = 0
    out[0] = 0
    return out


def test_ego_graph_keeps_each_news_once_with_the_table_edges_among_them():
    enc = news_encoder(glory_hops=2)
    enc.attach_graph(HAND, titles())
    nodes, real, adj = enc.ego_graphs(torch.tensor([1, 4]))
    assert nodes[0].tolist() == [1, 2, 3, 3, 0, 1, 2]  # 1; its neighbours 2, 3; theirs: 3, none; 1, 2
    assert real[0].tolist() == [True, True, True, False, False, False, False]
    edges = {(a, b) for a, b in adj[0].nonzero().tolist()}  # (a, b): edge b -> a
    assert edges == {(0, 1), (0, 2), (1, 2), (2, 0), (2, 1)}
    assert nodes[1].tolist() == [4, 5, 0, 6, 0, 0, 0] and real[1].tolist() == [True, True, False, True] + [False] * 3
    assert {(a, b) for a, b in adj[1].nonzero().tolist()} == {(0, 1), (1, 3)}  # 5 -> 4, 6 -> 5 (7 is 3 hops away)


def gru_formula(gru: torch.nn.GRUCell, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """torch.nn.GRUCell written out: r, z gates, n candidate, h' = (1 - z) n + z h."""
    wi, wh = gru.weight_ih.chunk(3), gru.weight_hh.chunk(3)
    bi, bh = gru.bias_ih.chunk(3), gru.bias_hh.chunk(3)
    r = torch.sigmoid(x @ wi[0].T + bi[0] + h @ wh[0].T + bh[0])
    z = torch.sigmoid(x @ wi[1].T + bi[1] + h @ wh[1].T + bh[1])
    n = torch.tanh(x @ wi[2].T + bi[2] + r * (h @ wh[2].T + bh[2]))
    return (1 - z) * n + z * h


def test_gated_graph_convolution_equals_the_formula_and_pruned_layers_keep_the_read_nodes():
    torch.manual_seed(0)
    gnn = GatedGraphConv(4, 3)
    h = torch.randn(6, 4)
    # 0 <- 1, 0 <- 2, 1 <- 3, 2 <- 3, 3 <- 4, 4 <- 5 (node 5 is 4 hops from node 0), plus 5 <- 0
    src = torch.tensor([1, 2, 3, 3, 4, 5, 0])
    dst = torch.tensor([0, 0, 1, 2, 3, 4, 5])
    expected = h
    for w in gnn.weight:
        message = torch.zeros_like(expected)
        for s, d in zip(src.tolist(), dst.tolist()):
            message[d] += expected[s] @ w  # add aggregation of W_l h_j over the edges j -> i
        expected = gru_formula(gnn.gru, message, expected)
    with torch.no_grad():
        full = gnn(h, src, dst)
        close(full, expected, "GatedGraphConv vs m_i = sum_j W h_j, h_i = GRU(m_i, h_i)")
        depth = torch.tensor([0, 1, 1, 2, 3, 4])
        pruned = gnn(h, src, dst, depth=depth)
    close(pruned[0], full[0], "updating only the nodes that still reach node 0 changes node 0's output")


def test_graph_vector_depends_only_on_the_news_own_ego_graph():
    """Changing the title of a news outside a news' ego graph leaves its vector; one inside changes its graph half
    only; and the batch around it never matters (also checked for every encoder in test_encoders.py)."""
    base = titles()
    # News 4's ego graph: 1 hop {4, 5}; 2 hops {4, 5, 6} (7 is 3 hops away).
    for hops, inside, outside in ((1, 5, 6), (2, 6, 7)):
        enc = news_encoder(glory_hops=hops)
        news = {"title": base[[4, 1]], "click_graph": HAND[[4, 1]]}

        def encode(table_titles, batch=news):
            enc.attach_graph(HAND, table_titles)
            with torch.no_grad():
                return enc(batch)

        ref = encode(base)
        alone = encode(base, {k: v[:1] for k, v in news.items()})
        changed = {}
        for node in (inside, outside):
            other = base.clone()
            other[node] = torch.tensor([3, 9, 4, 1, 0, 0])
            changed[node] = encode(other)
        d = enc.local_dim
        close(alone, ref[:1], f"hops {hops}: news 4 alone vs with news 1")
        close(changed[outside][0], ref[0], f"hops {hops}: news {outside} is outside news 4's ego graph")
        close(changed[inside][0, :d], ref[0, :d], "the local half is the news' own")
        assert not torch.allclose(changed[inside][0, d:], ref[0, d:]), f"hops {hops}: news {inside} is in the ego graph"


def test_unprepared_encoder_and_a_graph_of_another_width_are_refused():
    enc = news_encoder()
    with pytest.raises(RuntimeError, match="no click graph attached; Model.prepare"):
        enc({"title": titles()[:2], "click_graph": HAND[:2]})
    with pytest.raises(ValueError, match="keeps 3 neighbours per news, but --glory_neighbors is 2"):
        enc.attach_graph(torch.zeros(12, 4, dtype=torch.long), titles())


def user_encoder():
    torch.manual_seed(0)
    config = Config.from_args([f"--{k}={v}" for k, v in SMALL.items()])
    return USER_ENCODERS["GLORY"](config, META, news_encoder()).eval()


def test_user_side_fuses_the_two_views_of_clicks_and_scores_the_local_half_of_candidates():
    enc = user_encoder()
    d = enc.output_dim
    assert d == 8 and enc.news_dim == 16
    gen = torch.Generator().manual_seed(0)
    inp = UserInputs(history=torch.randn(2, 3, 2 * d, generator=gen),
                     history_mask=torch.tensor([[1, 1, 0], [1, 0, 0]]).bool(),
                     user_id=torch.tensor([1, 2]), candidates=torch.randn(2, 4, 2 * d, generator=gen),
                     candidate_mask=torch.ones(2, 4, dtype=torch.bool))
    with torch.no_grad():
        out = enc(inp)
        close(out.candidates, F.leaky_relu(enc.candidate(inp.candidates[..., :d]), 0.2), "candidate encoder")
        # Click fusion: additive attention over the [local, graph] pair of each click.
        views = inp.history.view(2, 3, 2, d)
        weights = torch.softmax(torch.tanh(enc.fusion.proj(views)) @ enc.fusion.query, -1)  # [B, H, 2]
        close(enc.clicked(inp.history), (weights[..., None] * views).sum(2), "click fusion")
        graph_of_candidates = UserInputs(**{**vars(inp), "candidates": torch.cat(
            [inp.candidates[..., :d], 100 * torch.randn(2, 4, d, generator=gen)], -1)})
        close(enc(graph_of_candidates).candidates, out.candidates, "a candidate's graph half is never read")
        other_graph = UserInputs(**{**vars(inp), "history": torch.cat(
            [inp.history[..., :d], torch.randn(2, 3, d, generator=gen)], -1)})
        assert not torch.allclose(enc(other_graph).user, out.user), "a click's graph half is read"


def test_glory_pairs_only_with_itself_and_refuses_category_fusion():
    check_pairing("GLORY", "GLORY")
    with pytest.raises(ValueError, match=r"--news_encoder GLORY works only with --user_encoder in \['GLORY'\]"):
        check_pairing("GLORY", "MHSA")
    with pytest.raises(ValueError, match=r"--user_encoder GLORY works only with --news_encoder in \['GLORY'\]"):
        check_pairing("MHSA", "GLORY")
    with pytest.raises(ValueError, match="--category_fusion: --news_encoder GLORY returns two views"):
        Config.from_args(["--news_encoder=GLORY", "--user_encoder=GLORY", "--category_fusion"])


@pytest.mark.parametrize("predictor", ["dot_product", "mlp"])
def test_model_scores_the_user_encoders_candidate_vectors_with_either_predictor(predictor):
    """Through Model: the click predictor scores the user vector against the GLORY user encoder's candidate vectors
    (`UserOutput.candidates`, size d), a step moves the graph network, and the cached evaluation path (every news
    encoded once) gives the forward's logits."""
    from dataset import Batch
    from model import Model

    torch.manual_seed(0)
    config = Config.from_args([f"--{k}={v}" for k, v in {**SMALL, "glory_neighbors": 2, "glory_hops": 2,
                                                         "news_encoder": "GLORY", "user_encoder": "GLORY",
                                                         "click_predictor": predictor}.items()])
    model = Model(config, META, {"title": titles().numpy(), "click_graph": HAND.numpy()})
    model.prepare(log=lambda *a: None)
    history = torch.tensor([[1, 4, 0], [2, 3, 5]])
    candidates = torch.tensor([[6, 7, 1], [8, 3, 0]])
    batch = Batch(user=torch.tensor([1, 2]), history=history, history_mask=history > 0, candidates=candidates,
                  candidate_mask=candidates > 0, target=torch.zeros(2, dtype=torch.long))
    model.train()
    out = model(batch)
    out.loss.backward()
    assert model.news_encoder.gnn.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        history_vectors = model.encode_news(history.reshape(-1)).view(2, 3, -1)
        candidate_vectors = model.encode_news(candidates.reshape(-1)).view(2, 3, -1)
        logits, user_out = model.score(batch, history_vectors, candidate_vectors)
        expected = model.click_predictor(user_out.user, user_out.candidates)
        real = batch.candidate_mask
        close(logits[real], expected[real], "scored against the candidate encoder's vectors")
        table = model.encode_all_news(torch.arange(META.news_num))
        close(model.score_cached(batch, table)[batch.candidate_mask], model(batch).logits[batch.candidate_mask],
              "cached evaluation path")
    assert user_out.candidates.shape == (2, 3, 8) and table.shape == (META.news_num, 16)


# ------------------------------------------------------------------------------------------------------------
# main()
# ------------------------------------------------------------------------------------------------------------

DEMO_FLAGS = ["--dataset=demo", "--demo_news=150", "--demo_users=60", "--demo_train_impressions=60",
              "--demo_dev_impressions=24", "--demo_test_impressions=12"]
MODEL = ["--news_encoder=GLORY", "--user_encoder=GLORY", "--word_embedding_dim=16", "--head_num=2", "--head_dim=8",
         "--attention_dim=8", "--max_history_num=10", "--glory_hops=2", "--glory_neighbors=3", "--no-progress"]


def test_main_trains_evaluates_and_tests_glory_on_a_tiny_demo(tmp_path):
    common = [f"--data_dir={tmp_path / 'data'}", f"--output_dir={tmp_path / 'runs'}"]
    result = main(["--mode=train", "--epoch=1", "--batch_size=16", *DEMO_FLAGS, *MODEL, *common])
    ckpt = Path(result["checkpoint"])
    assert ckpt.name == "GLORY-GLORY" and 0 <= result["dev_metrics"]["auc"] <= 1
    dev = main(["--mode=dev", f"--dev_model_path={ckpt}", *common, "--no-progress"])
    assert dev["metrics"]["auc"] == pytest.approx(result["dev_metrics"]["auc"], abs=1e-9)
    test = main(["--mode=test", f"--test_model_path={ckpt}", *common, "--no-progress"])
    assert Path(test["prediction"]).exists() and 0 <= test["metrics"]["auc"] <= 1
    assert list((tmp_path / "data" / "cache").glob("click_graph-*")), "the graph has its own cache entry"
    # Explain mode: the word weights of the batch's own news (the neighbours are encoded in a call of their own).
    line = (tmp_path / "data" / "MIND-demo" / "dev" / "behaviors.tsv").read_text().splitlines()[0]
    explained = main(["--mode=explain", f"--dev_model_path={ckpt}", f"--impression_id={line.split(chr(9))[0]}",
                      *common, "--no-progress"])
    record = json.loads(Path(explained["json"]).read_text())
    assert record["word_attention"] == "news_encoder.attention/weights"
    assert all(abs(sum(news["weights"]) - 1) < 1e-4 for news in record["history"] if news["weights"])


def test_pretraining_glory_is_refused_with_one_line(tmp_path, capsys):
    code = cli(["--mode=pretrain", *DEMO_FLAGS, *MODEL, f"--data_dir={tmp_path / 'data'}",
                f"--output_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: --mode=pretrain: --news_encoder GLORY cannot be pretrained: its news vector is "
                              "two views")
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.pt"))


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_graph_network_runs_under_autocast(dtype):
    """Under AMP the matmuls and the GRU cell return the low-precision dtype; the node states stay one dtype, so the
    message sums and state updates do not mix dtypes (--amp=bf16 on CPU here, bf16/fp16 on a GPU alike)."""
    enc = news_encoder(glory_hops=2).train()
    enc.attach_graph(HAND, titles())
    with torch.autocast("cpu", dtype=dtype):
        out = enc({"title": titles()[[4, 1, 0]], "click_graph": HAND[[4, 1, 0]]})
    assert torch.isfinite(out.float()).all()
    out.float().sum().backward()
    assert enc.gnn.weight.grad is not None and torch.isfinite(enc.gnn.weight.grad).all()
