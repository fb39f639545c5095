"""EB-NeRD (news_data/ebnerd.py): a synthetic corpus in the real parquet format, made by news_data/ebnerd_synth.py,
drives prepare -> train -> dev -> test -> predictions.zip -> compare; malformed files give one-line errors naming
file, row or column and the fix, or counted skips."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prepare_MIND_dataset
import scorer
from main import main
from MIND_corpus import CorpusError
from news_data import ebnerd, get_dataset
from news_data.ebnerd_synth import write_ebnerd

from common import SMALL_MODEL  # noqa: E402

TINY = ["--epoch=1", "--batch_size=32", "--max_history_num=20", "--max_title_length=12", "--max_abstract_length=16",
        "--word_threshold=1", *SMALL_MODEL]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    data = tmp_path_factory.mktemp("eb") / "data"
    write_ebnerd(data / "ebnerd_demo", articles=300, users=100, train=300, validation=120, seed=1)
    return data


@pytest.fixture(scope="module")
def trained(bundle):
    common = [f"--data_dir={bundle}", f"--output_dir={bundle.parent / 'best_model'}"]
    prepared = prepare_MIND_dataset.main(["--dataset=ebnerd_demo", f"--data_dir={bundle}", "--no-download"])
    result = main(["--mode=train", "--dataset=ebnerd_demo", *TINY, *common])
    return prepared, common, result


def _read(path: Path) -> pa.Table:
    return pq.read_table(path)


def test_conversion_keeps_multi_clicks_order_and_ids(bundle, trained):
    prepared, _, _ = trained
    assert prepared == bundle / "MIND-ebnerd_demo"
    marker = json.loads((prepared / ".prepared").read_text())
    beh = _read(bundle / "ebnerd_demo" / "train" / "behaviors.parquet").to_pylist()
    assert marker["impressions"]["train"] + marker["impressions"]["dev"] == len(beh)
    assert marker["impressions"]["test"] == _read(bundle / "ebnerd_demo" / "validation" / "behaviors.parquet").num_rows
    # every train-week row is in train or dev (dev = its last day), with its original id, in file order
    ids = np.concatenate([np.load(prepared / s / ebnerd.IMPRESSION_IDS) for s in ("train", "dev")])
    assert sorted(ids.tolist()) == sorted(r["impression_id"] for r in beh)
    latest = max(r["impression_time"] for r in beh)
    dev_ids = set(np.load(prepared / "dev" / ebnerd.IMPRESSION_IDS).tolist())
    for r in beh:
        assert (r["impression_id"] in dev_ids) == ((latest - r["impression_time"]).total_seconds() <= 24 * 3600)
    by_id = {r["impression_id"]: r for r in beh}
    lines = (prepared / "train" / "behaviors.tsv").read_text().splitlines()
    history = {r["user_id"]: r["article_id_fixed"]
               for r in _read(bundle / "ebnerd_demo" / "train" / "history.parquet").to_pylist()}
    multi = 0
    for line, orig in zip(lines, np.load(prepared / "train" / ebnerd.IMPRESSION_IDS).tolist()):
        row, user, _, hist, cands = line.split("\t")
        r = by_id[orig]
        assert int(user) == r["user_id"]
        assert hist.split() == [str(a) for a in history[r["user_id"]][-ebnerd.HISTORY_KEPT:]]
        expected = [f"{a}-{int(a in r['article_ids_clicked'])}" for a in r["article_ids_inview"]]
        assert cands.split() == expected  # in-view order kept, every click labelled
        multi += sum(c.endswith("-1") for c in expected) > 1
    assert multi > 0  # the synthetic corpus has multi-click impressions, and they survive


def test_train_dev_test_submission_and_compare(trained):
    prepared, common, result = trained
    ckpt = result["checkpoint"]
    dev = main(["--mode=dev", f"--dev_model_path={ckpt}", *common])
    official = scorer.official_style_score(dev["truth"], dev["ranking"])
    assert dev["metrics"]["auc"] == pytest.approx(official["auc"], abs=1e-9)
    test = main(["--mode=test", f"--test_model_path={ckpt}", *common])
    assert test["metrics"]["labelled"]  # the bundle's validation week: labelled
    sub = Path(test["submission"])
    assert sub.name == "predictions.zip"
    with zipfile.ZipFile(sub) as z:
        assert z.namelist() == ["predictions.txt"]
        lines = z.read("predictions.txt").decode().splitlines()
    original = np.load(prepared / "test" / ebnerd.IMPRESSION_IDS)
    assert [int(x.split()[0]) for x in lines] == original.tolist()  # file order, original ids
    ranks = {int(x.split()[0]): json.loads(x.split()[1]) for x in lines}
    ids, rank_lists = scorer.read_prediction(Path(test["prediction"]))
    mine = {str(k): list(v) for k, v in zip(ids, rank_lists)}
    for row, orig in enumerate(original.tolist()):
        assert ranks[orig] == mine[str(row + 1)]
        assert " " not in lines[row].split(" ", 1)[1]
    cmp = main(["--mode=compare", "--runs", f"popularity:{Path(ckpt).parent}", str(Path(ckpt).parent),
                "--resamples=50", *common])
    assert {r["metric"] for r in cmp["rows"]} >= {"auc"}


def test_testset_without_labels_keeps_beyond_accuracy_rows_in_file_order(tmp_path):
    data = tmp_path / "data"
    write_ebnerd(data / "ebnerd_large", articles=200, users=60, train=200, validation=60, test=40, beyond_accuracy=6,
                 seed=2)
    common = [f"--data_dir={data}", f"--output_dir={tmp_path / 'best_model'}"]
    result = main(["--mode=train", "--dataset=ebnerd_testset", *TINY, *common])
    test = main(["--mode=test", f"--test_model_path={result['checkpoint']}", *common])
    assert not test["metrics"].get("labelled")
    with zipfile.ZipFile(test["submission"]) as z:
        lines = z.read("predictions.txt").decode().splitlines()
    rows = _read(data / "ebnerd_testset" / "test" / "behaviors.parquet").to_pylist()
    assert [int(x.split()[0]) for x in lines] == [r["impression_id"] for r in rows]
    assert [int(x.split()[0]) for x in lines][-6:] == [0] * 6
    for line, r in zip(lines, rows):
        ranks = json.loads(line.split()[1])
        assert sorted(ranks) == list(range(1, len(r["article_ids_inview"]) + 1))


# ----------------------------------------------------------------------------------------------------------
# Malformed files
# ----------------------------------------------------------------------------------------------------------

def _bundle(tmp_path, **kw) -> Path:
    data = tmp_path / "data"
    write_ebnerd(data / "ebnerd_demo", articles=80, users=30, train=60, validation=30, seed=3, **kw)
    return data


def _rewrite(path: Path, change) -> None:
    pq.write_table(change(pq.read_table(path)), path)


def _one_line_error(data: Path, exc=CorpusError) -> str:
    with pytest.raises(exc) as e:
        get_dataset("ebnerd_demo").prepare(data, download=False)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_column_names_file_and_column(tmp_path):
    data = _bundle(tmp_path)
    path = data / "ebnerd_demo" / "train" / "behaviors.parquet"
    _rewrite(path, lambda t: t.drop_columns(["article_ids_inview"]))
    msg = _one_line_error(data)
    assert str(path) in msg and "'article_ids_inview' is missing" in msg and "download the bundle again" in msg


def test_wrong_type_names_column_and_expected_kind(tmp_path):
    data = _bundle(tmp_path)
    path = data / "ebnerd_demo" / "articles.parquet"
    _rewrite(path, lambda t: t.set_column(t.schema.get_field_index("article_id"), "article_id",
                                          pa.array([str(v) for v in t.column("article_id").to_pylist()])))
    msg = _one_line_error(data)
    assert str(path) in msg and "'article_id' is string, expected int" in msg


@pytest.mark.parametrize("split", ["train", "validation"])
def test_a_labelled_split_without_labels_is_an_error_naming_the_column(tmp_path, split):
    data = _bundle(tmp_path)
    path = data / "ebnerd_demo" / split / "behaviors.parquet"
    _rewrite(path, lambda t: t.drop_columns(["article_ids_clicked"]))
    msg = _one_line_error(data)
    assert str(path) in msg and "'article_ids_clicked'" in msg and "no labels" in msg


def test_null_user_names_the_row(tmp_path):
    data = _bundle(tmp_path)
    path = data / "ebnerd_demo" / "validation" / "behaviors.parquet"

    def null_user(t):
        users = t.column("user_id").to_pylist()
        users[7] = None
        return t.set_column(t.schema.get_field_index("user_id"), "user_id", pa.array(users, pa.uint32()))
    _rewrite(path, null_user)
    msg = _one_line_error(data)
    assert f"{path}: row 7: user_id is null" in msg


def test_not_parquet_is_one_line(tmp_path):
    data = _bundle(tmp_path)
    path = data / "ebnerd_demo" / "train" / "history.parquet"
    path.write_text("user_id,article_id_fixed\n1,2\n")
    msg = _one_line_error(data)
    assert str(path) in msg and "not a readable parquet file" in msg


def test_empty_inview_and_unknown_articles_are_counted_skips(tmp_path):
    data = _bundle(tmp_path)
    path = data / "ebnerd_demo" / "train" / "behaviors.parquet"

    def change(t):
        inview = t.column("article_ids_inview").to_pylist()
        inview[0], inview[1] = [], None
        inview[2] = inview[2] + [99]  # no such article
        typ = t.schema.field("article_ids_inview").type
        return t.set_column(t.schema.get_field_index("article_ids_inview"), "article_ids_inview",
                            pa.array(inview, typ))
    _rewrite(path, change)
    target = get_dataset("ebnerd_demo").prepare(data, download=False)
    marker = json.loads((target / ".prepared").read_text())
    skipped = marker["skipped"]
    assert skipped["impressions with an empty in-view list (train; skipped)"] == 2
    assert skipped["in-view articles not in articles.parquet (kept: the corpus reports them)"] == 1
    assert marker["impressions"]["train"] + marker["impressions"]["dev"] == 58
    # the corpus counts the unknown candidate as usual (dropped from training, reported)
    assert "99-0" in (target / "train" / "behaviors.tsv").read_text() + (target / "dev" / "behaviors.tsv").read_text()


def test_missing_bundle_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ebnerd_small.zip.*recsys.eb.dk"):
        get_dataset("ebnerd_small").prepare(tmp_path, download=False)
    with pytest.raises(FileNotFoundError, match="prepare_MIND_dataset.py --dataset=ebnerd_small"):
        get_dataset("ebnerd_small").ensure(tmp_path)


def test_converted_folder_is_reused_and_a_users_folder_never_replaced(tmp_path):
    data = _bundle(tmp_path)
    ds = get_dataset("ebnerd_demo")
    target = ds.prepare(data, download=False)
    stamp = (target / "train" / "behaviors.tsv").stat().st_mtime_ns
    assert ds.ensure(data) == target and (target / "train" / "behaviors.tsv").stat().st_mtime_ns == stamp
    (target / ".prepared").unlink()
    with pytest.raises(FileExistsError, match="was not made by prepare_MIND_dataset.py"):
        ds.prepare(data, download=False)


def test_pretraining_and_fine_tuning_on_ebnerd(bundle, trained):
    """The other modes are dataset-blind too: --mode=pretrain on the converted corpus, then --init_from."""
    _, common, _ = trained
    pre = main(["--mode=pretrain", "--dataset=ebnerd_demo", "--pretrain_tasks=contrastive,next_click", *TINY,
                *common])
    assert Path(pre["run_dir"]).name == "pretrain#1"
    tuned = main(["--mode=train", "--dataset=ebnerd_demo", f"--init_from={pre['run_dir']}", *TINY, *common])
    assert 0 <= tuned["dev_metrics"]["auc"] <= 1
