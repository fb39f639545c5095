"""PP-Rec (issue 25) beyond the zoo checks of test_encoders.py / test_model_zoo.py / test_pretraining.py (which pick
every registered encoder up): the impression time, the time-aware popularity table and its legality rules, the score.

Legend: B impressions, H history, C candidates, D news dim, N news.

- the Time column: the vectorised parser equals datetime.strptime line by line; an unreadable Time is counted, and
  PP-Rec refuses the split naming the file and line (other models do not read it);
- Batch.time carries each impression's hour in training and evaluation;
- the CTR table: known counts on a hand-made split; only train hours strictly before the impression are read; the
  train share's labels only; dev labels never; first exposures over every split's impression lists;
- the score is 2η(u·n) + 2(1−η)(s_content + w·CTR), computed here directly from the encoder's parts;
- main() trains, evaluates dev and test, explains an impression; --mode=pretrain refuses PP-Rec; 2 DDP steps.
"""
from __future__ import annotations

from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import MIND_corpus as mc
from common import SMALL_MODEL, TINY_DEMO, train_pairings_under_ddp
from config import Config
from dataset import EvalDataset, TrainDataset, train_share_of
from main import cli, main
from MIND_corpus import Corpus, CorpusError, CorpusMeta
from model import Model, check_pairing
from popularity import NEVER_SHOWN, PopularityLookup, build_popularity, time_popularity_for
from userEncoders import USER_ENCODERS, UserInputs

HOUR0 = int(np.datetime64("2019-11-11T00", "h").astype(np.int64))  # hours since 1970 of 11/11/2019 0:00


def reference_hours(stamp: str) -> int | None:
    """The definition: datetime.strptime, hours since 1970-01-01 floored; None when the text does not parse."""
    try:
        return int((datetime.strptime(stamp, mc.TIME_FORMAT) - datetime(1970, 1, 1)).total_seconds()) // 3600
    except ValueError:
        return None


def test_vectorised_time_parser_equals_strptime_per_line():
    rng = np.random.default_rng(0)
    stamps = []
    for _ in range(400):  # every hour of the day in 12-hour form (12 AM = 0h, 12 PM = noon), unpadded fields
        month, day, year = int(rng.integers(1, 13)), int(rng.integers(1, 29)), int(rng.integers(1990, 2030))
        h = int(rng.integers(1, 13))
        stamps.append(f"{month}/{day}/{year} {h}:{int(rng.integers(60)):02d}:{int(rng.integers(60)):02d} "
                      f"{'AM' if rng.random() < .5 else 'PM'}")
    stamps += ["11/15/2019 8:55:22 AM", "11/15/2019 12:00:00 AM", "11/15/2019 12:59:59 PM", "01/05/2019 08:05:09 PM",
               "yesterday", "", "13/15/2019 8:55:22 AM", "11/15/2019 13:55:22 PM", "11/15/2019 8:55:22",
               "2019-11-15 08:55:22", "11/31/2019 8:55:22 AM"]
    hours, bad = mc.parse_times(np.array(stamps, dtype=object))
    want = [reference_hours(s) for s in stamps]
    assert hours.dtype == np.int32
    assert [None if h == mc.BAD_TIME else int(h) for h in hours] == want
    assert list(bad) == [i for i, w in enumerate(want) if w is None] and len(bad) == 7
    assert reference_hours("11/15/2019 12:30:00 AM") == reference_hours("11/15/2019 12:00:00 AM")  # midnight hour


# ------------------------------------------------------------------------------------------------------------
# A hand-made corpus: times, the Batch, bad times
# ------------------------------------------------------------------------------------------------------------

def news_row(nid: str) -> str:
    return f"{nid}\tsports\tfootball\tThe team wins the game {nid}\tFans cheer\thttps://x/{nid}\t[]\t[]"


NEWS = [news_row(f"N{i}") for i in range(1, 7)]
# Train: N1 shown at hours 9, 9, 10 (clicked at 9 once, at 10 once); N2 at 9 and 10, clicked at 10; N3 at 11.
TRAIN = ["1\tU1\t11/11/2019 9:05:58 AM\tN4\tN1-1 N2-0",
         "2\tU2\t11/11/2019 9:40:00 AM\tN5\tN1-0 N3-0 N4-1",
         "3\tU1\t11/11/2019 10:07:58 AM\tN4 N5\tN1-1 N2-1 N5-0",
         "4\tU2\t11/11/2019 11:00:00 AM\t\tN3-1 N6-0"]
DEV = ["10\tU1\t11/12/2019 8:05:58 AM\tN1 N2\tN1-1 N2-1 N3-1 N6-1",  # every dev label a click: never counted
       "11\tU3\t11/11/2019 7:15:00 AM\tN1\tN5-1 N6-0"]  # before train: N5 and N6 first shown here


def write_corpus(data: Path, train=TRAIN, dev=DEV) -> None:
    for split, rows in (("train", train), ("dev", dev)):
        d = data / "MIND-small" / split
        d.mkdir(parents=True, exist_ok=True)
        (d / "news.tsv").write_text("".join(r + "\n" for r in NEWS))
        (d / "behaviors.tsv").write_text("".join(r + "\n" for r in rows))


def toy_config(data: Path, *extra: str) -> Config:
    return Config.from_args([f"--data_dir={data}", "--dataset=small", "--word_threshold=1", "--max_history_num=3",
                             "--max_title_length=8", "--word_embedding_dim=8", "--news_encoder=MHSA",
                             "--user_encoder=PPRec", "--head_num=2", "--head_dim=4", "--attention_dim=4",
                             "--pprec_ctr_dim=4", "--pprec_age_dim=3", "--no-progress", *extra])


def toy_corpus(data: Path, *extra: str) -> tuple[Config, Corpus]:
    cfg = toy_config(data, *extra)
    return cfg, Corpus(cfg, need_glove=False, log=lambda *a: None)


def test_batches_carry_the_impression_hour(tmp_path):
    write_corpus(tmp_path)
    _, corpus = toy_corpus(tmp_path)
    train, dev = corpus.behaviors("train"), corpus.behaviors("dev")
    assert list(train["time"]) == [HOUR0 + 9, HOUR0 + 9, HOUR0 + 10, HOUR0 + 11]
    assert list(dev["time"]) == [HOUR0 + 24 + 8, HOUR0 + 7]
    batch = TrainDataset(train, 2, seed=0)[np.arange(4)]
    assert torch.equal(batch.time, torch.from_numpy(train["time"][batch.impression_index.numpy()]).long())
    evaluation = EvalDataset(dev, batch_size=8)[0]
    assert torch.equal(evaluation.time, torch.from_numpy(dev["time"][evaluation.impression_index.numpy()]).long())


@pytest.mark.parametrize("version, lacks", [(2, ("time", "user_key")), (3, ("user_key",))])
def test_behaviors_cached_before_a_column_was_added_are_rebuilt(tmp_path, monkeypatch, version, lacks):
    """A behaviors cache of reader version 2 has no `time`, one of version 3 no `user_key` (beyond-accuracy
    personalization reads it): the current reader builds anew instead of loading either."""
    write_corpus(tmp_path)
    monkeypatch.setattr(mc, "BEHAVIORS_READER_VERSION", version)
    result = mc._BehaviorsBuilder.result

    def old_result(self):  # the arrays that version wrote
        arrays, stats = result(self)
        return {k: v for k, v in arrays.items() if k not in lacks}, stats

    monkeypatch.setattr(mc._BehaviorsBuilder, "result", old_result)
    assert not set(lacks) & set(toy_corpus(tmp_path)[1].behaviors("train"))
    before = {p.name for p in (tmp_path / "cache").iterdir()}
    monkeypatch.undo()
    train = toy_corpus(tmp_path)[1].behaviors("train")
    assert [p.name.rsplit("-", 1)[0] for p in (tmp_path / "cache").iterdir() if p.name not in before] == [
        "behaviors-train"]
    assert set(lacks) <= set(train)


def test_an_unreadable_time_is_counted_and_pprec_refuses_the_split_naming_its_line(tmp_path, capsys):
    bad = [TRAIN[0], TRAIN[1].replace("11/11/2019 9:40:00 AM", "yesterday"), *TRAIN[2:]]
    write_corpus(tmp_path, train=bad)
    cfg, corpus = toy_corpus(tmp_path)
    train = corpus.behaviors("train")
    assert train["stats"]["bad_times"] == 1 and train["time"][1] == mc.BAD_TIME
    assert "1 impressions whose Time is not" in Corpus.describe("train", train["stats"])
    train_path = tmp_path / "MIND-small" / "train" / "behaviors.tsv"
    with pytest.raises(CorpusError, match=rf"{train_path}:2: Time 'yesterday' is not 'M/D/YYYY h:mm:ss AM'"):
        time_popularity_for(cfg, corpus)
    # A model that does not read the time builds no table and trains as before.
    assert time_popularity_for(toy_config(tmp_path, "--user_encoder=MHSA"), corpus) is None
    # Through the command line: one line naming the file and line, no traceback.
    assert cli(["--mode=train", *toy_argv(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert f"{train_path}:2: Time 'yesterday'" in err and "Traceback" not in err


def toy_argv(data: Path) -> list[str]:
    return [f"--data_dir={data}", "--dataset=small", "--word_threshold=1", "--max_history_num=3",
            "--news_encoder=MHSA", "--user_encoder=PPRec", "--head_num=2", "--head_dim=4", "--no-progress",
            f"--output_dir={data / 'out'}", "--epoch=1"]


# ------------------------------------------------------------------------------------------------------------
# The popularity table: known counts and the legality rules
# ------------------------------------------------------------------------------------------------------------

def lookup(data: Path, *extra: str, share=None) -> tuple[PopularityLookup, Corpus]:
    cfg, corpus = toy_corpus(data, *extra)
    if share is None:
        table = time_popularity_for(cfg, corpus)
    else:
        splits = [corpus.behaviors(s) for s in corpus.splits]
        table = build_popularity(corpus.behaviors("train"), splits, len(corpus.news["category"]), share,
                                 cfg.pprec_ctr_window)
    return PopularityLookup(table), corpus


def ctr_at(pop: PopularityLookup, corpus: Corpus, news: list[str], hour: int) -> list[float]:
    index = [corpus.news_index.get_loc(n) + 1 for n in news]
    return pop.ctr(torch.tensor([index]), torch.tensor([HOUR0 + hour])).squeeze(0).tolist()


def test_ctr_counts_train_clicks_strictly_before_the_impression_hour(tmp_path):
    write_corpus(tmp_path)
    pop, corpus = lookup(tmp_path)
    c = lambda clicks, shown: pytest.approx(clicks / (shown + 0.01))  # noqa: E731
    # At hour 9 nothing is before: the impression's own hour (its own label, its neighbours') is not read.
    assert ctr_at(pop, corpus, ["N1", "N2", "N3"], 9) == [0, 0, 0]
    assert ctr_at(pop, corpus, ["N1", "N2", "N3"], 10) == [c(1, 2), c(0, 1), c(0, 1)]
    assert ctr_at(pop, corpus, ["N1", "N2", "N3"], 11) == [c(2, 3), c(1, 2), c(0, 1)]
    # Dev (a day later) reads every train hour, and none of dev's own labels (all clicks there).
    assert ctr_at(pop, corpus, ["N1", "N2", "N3", "N6"], 32) == [c(2, 3), c(1, 2), c(1, 2), c(0, 1)]
    assert ctr_at(pop, corpus, ["N5"], 7) == [0]  # before any train hour
    # Padding (news 0) has no CTR.
    assert pop.ctr(torch.tensor([[0]]), torch.tensor([HOUR0 + 40])).item() == 0


def test_ctr_window_reads_only_the_last_hours(tmp_path):
    write_corpus(tmp_path)
    pop, corpus = lookup(tmp_path, "--pprec_ctr_window=1")  # the paper's: the hour before the impression
    c = lambda clicks, shown: pytest.approx(clicks / (shown + 0.01))  # noqa: E731
    assert ctr_at(pop, corpus, ["N1", "N2"], 10) == [c(1, 2), 0]
    assert ctr_at(pop, corpus, ["N1", "N2"], 11) == [c(1, 1), c(1, 1)]  # hour 10 only
    assert ctr_at(pop, corpus, ["N1", "N3"], 32) == [0, 0]  # dev, a day after train: nothing in the hour before


def test_ctr_reads_the_train_share_only_and_never_dev_labels(tmp_path):
    write_corpus(tmp_path)
    pop, corpus = lookup(tmp_path, share=np.array([True, False, True, True]))  # impression 2 left out
    c = lambda clicks, shown: pytest.approx(clicks / (shown + 0.01))  # noqa: E731
    assert ctr_at(pop, corpus, ["N1", "N3"], 11) == [c(2, 2), 0]
    # Other dev labels change nothing.
    flipped = tmp_path / "flipped"
    write_corpus(flipped, dev=[r.replace("-1", "-0") for r in DEV])
    pop2, corpus2 = lookup(flipped)
    pop1, _ = lookup(tmp_path)
    for name in ("keys", "impressions", "clicks", "first_seen"):
        assert torch.equal(getattr(pop1, name), getattr(pop2, name)), name
    # --train_fraction chooses the share (dataset.train_share).
    cfg, corpus = toy_corpus(tmp_path, "--train_fraction=0.5", "--seed=3")
    share = train_share_of(cfg, corpus.behaviors("train"))
    assert share.sum() == 2
    expected = lookup(tmp_path, share=share)[0]
    got = PopularityLookup(time_popularity_for(cfg, corpus))
    assert torch.equal(got.clicks, expected.clicks) and torch.equal(got.keys, expected.keys)


def test_first_exposure_is_the_earliest_impression_of_any_split_and_age_counts_from_it(tmp_path):
    write_corpus(tmp_path)
    pop, corpus = lookup(tmp_path)
    row = {n: corpus.news_index.get_loc(n) + 1 for n in ("N1", "N2", "N3", "N4", "N5", "N6")}
    first = pop.first_seen
    assert first[row["N1"]] == HOUR0 + 9 and first[row["N3"]] == HOUR0 + 9 and first[row["N2"]] == HOUR0 + 9
    assert first[row["N5"]] == HOUR0 + 7 and first[row["N6"]] == HOUR0 + 7  # shown first in dev, before train
    assert first[row["N4"]] == HOUR0 + 9  # a candidate of impression 2; its history clicks are not exposures
    assert first[0] == NEVER_SHOWN
    ages = pop.age(torch.tensor([[row["N1"], row["N5"], 0]]), torch.tensor([HOUR0 + 12])).tolist()
    assert ages == [[3, 5, 0]]


# ------------------------------------------------------------------------------------------------------------
# The score
# ------------------------------------------------------------------------------------------------------------

def test_score_is_the_activity_gated_sum_of_interest_and_popularity():
    cfg = Config.from_args(["--head_num=2", "--head_dim=3", "--attention_dim=5", "--dropout_rate=0",
                            "--pprec_ctr_dim=4", "--pprec_age_dim=3", "--pprec_age_buckets=10",
                            "--pprec_ctr_buckets=20"])
    meta = CorpusMeta(vocab_size=10, category_num=3, subcategory_num=3, user_num=4, entity_num=1, news_num=9)
    torch.manual_seed(0)
    enc = USER_ENCODERS["PPRec"](cfg, meta, SimpleNamespace(output_dim=6, category_embedding=None)).eval()
    gen = torch.Generator().manual_seed(1)
    inp = UserInputs(history=torch.randn(2, 4, 6, generator=gen),
                     history_mask=torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]]).bool(), user_id=torch.tensor([1, 2]),
                     candidates=torch.randn(2, 3, 6, generator=gen), candidate_mask=torch.ones(2, 3, dtype=torch.bool),
                     history_ctr=torch.tensor([[.0, .26, .999, .5], [.1, 0, 0, 0]]),
                     candidate_ctr=torch.tensor([[.3, 0, .05], [.2, .9, 0]]),
                     candidate_age=torch.tensor([[0, 4, 99], [9, 1, 2]]))
    with torch.no_grad():
        logits = enc(inp).logits
        h = enc.project(enc.mhsa(inp.history, inp.history_mask))
        buckets = torch.tensor([[0, 5, 19, 10], [2, 0, 0, 0]])  # floor(CTR x 20), capped at 19
        att = enc.attention(torch.cat([h, enc.ctr_embedding(buckets)], -1)).squeeze(-1)
        att = att.masked_fill(~inp.history_mask, float("-inf")).softmax(-1)
        u = (att.unsqueeze(-1) * h).sum(1)
        eta = torch.sigmoid(enc.activity_gate(u))  # [B, 1]
        age = enc.age_embedding(torch.tensor([[0, 4, 9], [9, 1, 2]]))  # capped at 10 - 1
        content = enc.content_popularity(inp.candidates).squeeze(-1)
        recency = enc.recency_popularity(age).squeeze(-1)
        gate = torch.sigmoid(enc.recency_gate(torch.cat([inp.candidates, age], -1))).squeeze(-1)
        s_content = (1 - gate) * content + gate * recency
        s_ctr = 19.0 * inp.candidate_ctr
        want = 2 * eta * (inp.candidates @ u.unsqueeze(-1)).squeeze(-1) + 2 * (1 - eta) * (s_content + s_ctr)
    torch.testing.assert_close(logits, want)
    assert enc.ctr_weight.item() == 19.0  # w starts at 19 (--pprec_ctr_weight)


def test_pprec_scores_itself_with_the_dot_product_only():
    check_pairing("MHSA", "PPRec", "dot_product")
    with pytest.raises(ValueError, match=r"--user_encoder PPRec works only with --click_predictor in \['dot_product'"):
        check_pairing("MHSA", "PPRec", "mlp")
    cfg = Config.from_args(["--user_encoder=PPRec"])
    assert not USER_ENCODERS["PPRec"].returns_user_vectors(cfg)


def test_model_without_the_table_or_batch_without_time_is_an_error(tmp_path):
    write_corpus(tmp_path)
    cfg, corpus = toy_corpus(tmp_path)
    with pytest.raises(ValueError, match="reads time-aware news popularity"):
        Model(cfg, corpus.meta, corpus.news)
    model = Model(cfg, corpus.meta, corpus.news, time_popularity_for(cfg, corpus))
    batch = EvalDataset(corpus.behaviors("dev"), 8)[0]
    batch.time = None
    with pytest.raises(ValueError, match="reads the impression time, and this batch carries none"):
        model(batch)


def test_dev_scores_read_the_table_of_train_counts(tmp_path):
    """The model's candidate CTRs are the table's at the batch's hour (the inputs the encoder got)."""
    write_corpus(tmp_path)
    cfg, corpus = toy_corpus(tmp_path)
    model = Model(cfg, corpus.meta, corpus.news, time_popularity_for(cfg, corpus)).eval()
    seen = []
    model.user_encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    batch = EvalDataset(corpus.behaviors("dev"), 8)[0]
    with torch.no_grad():
        model(batch)
    inp = seen[0]
    torch.testing.assert_close(inp.candidate_ctr, model.popularity.ctr(batch.candidates, batch.time))
    torch.testing.assert_close(inp.history_ctr, model.popularity.ctr(batch.history, batch.time))
    assert torch.equal(inp.candidate_age, model.popularity.age(batch.candidates, batch.time))
    assert inp.candidate_ctr.max() > 0  # train counts reach dev


# ------------------------------------------------------------------------------------------------------------
# Runs: main() train -> dev -> test -> explain; pretraining refuses; DDP
# ------------------------------------------------------------------------------------------------------------

def test_main_trains_evaluates_dev_and_test_and_explains(tmp_path):
    common = [f"--data_dir={tmp_path / 'data'}", f"--output_dir={tmp_path / 'out'}"]
    result = main(["--mode=train", "--epoch=1", "--max_steps_per_epoch=3", "--no-plot", "--no-tensorboard",
                   "--news_encoder=MHSA", "--user_encoder=PPRec", "--pprec_ctr_dim=8", *SMALL_MODEL, *TINY_DEMO,
                   *common])
    assert 0 < result["dev_metrics"]["auc"] < 1
    for split in ("dev", "test"):
        report = main([f"--mode={split}", f"--{split}_model_path={result['checkpoint']}", "--no-progress", *common])
        assert 0 < report["metrics"]["auc"] < 1
    dev = (tmp_path / "data" / "MIND-demo" / "dev" / "behaviors.tsv").read_text().splitlines()
    impression = dev[0].split("\t")[0]
    out = tmp_path / "explain.png"
    main(["--mode=explain", f"--dev_model_path={result['checkpoint']}", f"--impression_id={impression}",
          f"--explain_output={out}", "--no-progress", *common])
    assert out.exists()


def test_pretraining_refuses_pprec_with_the_reason(tmp_path, capsys):
    code = cli(["--mode=pretrain", "--dataset=demo", f"--data_dir={tmp_path / 'data'}",
                f"--output_dir={tmp_path / 'out'}", "--user_encoder=PPRec", *TINY_DEMO, *SMALL_MODEL])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert "--mode=pretrain: --user_encoder PPRec scores candidates itself" in err
    assert "pretraining's click sequences do not carry" in err


def test_pprec_trains_two_steps_under_ddp(tmp_path):
    pairings = ["CNN-PPRec", "MHSA-PPRec"]
    train_pairings_under_ddp(str(tmp_path), pairings)
