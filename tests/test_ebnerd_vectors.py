"""--news_encoder=Vectors (newsEncoders.VectorsNewsEncoder, news_vectors.py): EB-NeRD's precomputed article vectors,
in the organisers' artifact layout written by news_data/ebnerd_synth.write_artifact, drive prepare (the artifact
unzipped by --ebnerd_artifact) -> train -> dev -> test -> predictions.zip; the table is the file's vectors on the
corpus's news index, news without one are counted, and malformed files give one-line errors naming the file."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import prepare_MIND_dataset
from config import Config
from main import cli, main
from MIND_corpus import Corpus, CorpusError
from model import Model
from news_data import ebnerd
from news_data.ebnerd_synth import write_artifact, write_ebnerd
from news_vectors import read_vector_table


FOLDER = "Ekstra_Bladet_contrastive_vector"
TINY = ["--epoch=1", "--batch_size=32", "--max_history_num=20", "--max_title_length=12", "--max_abstract_length=16",
        "--word_threshold=1", "--no-progress", "--attention_dim=16", "--vectors_dim=24"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """An EB-NeRD demo bundle and the contrastive-vector artifact as the zip the organisers publish."""
    data = tmp_path_factory.mktemp("ebv") / "data"
    write_ebnerd(data / "ebnerd_demo", articles=200, users=80, train=240, validation=100, seed=4)
    parquet = write_artifact(data / "ebnerd_demo" / "articles.parquet", data / "staging" / "contrastive_vector.parquet",
                             column="contrastive_vector", dim=16, seed=4, without=0.1, foreign=5)
    zip_path = ebnerd.artifact_folder(data, FOLDER).with_name(f"{FOLDER}.zip")
    zip_path.parent.mkdir(parents=True)
    with zipfile.ZipFile(zip_path, "w") as z:
        z.write(parquet, f"{FOLDER}/contrastive_vector.parquet")
    return data


@pytest.fixture(scope="module")
def trained(data):
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        prepare_MIND_dataset.main(["--dataset=ebnerd_demo", f"--data_dir={data}", "--no-download",
                                   f"--ebnerd_artifact={FOLDER}"])
    vectors = ebnerd.artifact_folder(data, FOLDER) / "contrastive_vector.parquet"  # the zip's top folder dropped
    common = [f"--data_dir={data}", f"--output_dir={data.parent / 'best_model'}"]
    with redirect_stdout(out):
        result = main(["--mode=train", "--dataset=ebnerd_demo", "--news_encoder=Vectors", "--user_encoder=ATT",
                       f"--news_vectors={vectors}", *TINY, *common])
    return vectors, common, result, out.getvalue()


def test_prepare_unzips_the_artifact_and_says_how_to_use_it(data, trained):
    vectors, _, _, printed = trained
    assert vectors.is_file()
    assert f"--news_encoder=Vectors --news_vectors={vectors}" in printed
    assert ebnerd.fetch_artifact(data, FOLDER, download_missing=False) == vectors  # unzipped once, then reused


def test_train_dev_test_and_submission_on_the_vectors(trained):
    vectors, common, result, printed = trained
    articles = pq.read_table(Path(vectors).parents[2] / "ebnerd_demo" / "articles.parquet").num_rows
    file_rows = pq.read_table(vectors).num_rows
    with_vector = file_rows - 5  # 5 rows name no article
    assert (f"{with_vector} of {articles} news have one; {articles - with_vector} without one get the learned "
            f"'missing' input; 5 rows for news not in this corpus (ignored)") in printed
    assert 0 <= result["dev_metrics"]["auc"] <= 1
    ckpt = result["checkpoint"]
    dev = main(["--mode=dev", f"--dev_model_path={ckpt}", *common])
    assert dev["metrics"]["auc"] == pytest.approx(result["dev_metrics"]["auc"], abs=1e-9)
    test = main(["--mode=test", f"--test_model_path={ckpt}", *common])
    with zipfile.ZipFile(test["submission"]) as z:
        assert z.namelist() == ["predictions.txt"]
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert not any("vector_table" in k for k in state["model"]), "the table is read from the file, not saved"


def test_the_table_is_the_files_vectors_on_the_corpus_news_index(trained):
    vectors, common, _, _ = trained
    config = Config.from_args(["--dataset=ebnerd_demo", "--news_encoder=Vectors", f"--news_vectors={vectors}", *TINY,
                               *common])
    corpus = Corpus(config, root=Path(common[0].split("=", 1)[1]) / "MIND-ebnerd_demo", need_glove=False,
                    log=lambda *a: None)
    enc = Model(config, corpus.meta, corpus.news).news_encoder
    rows = pq.read_table(vectors).to_pylist()
    by_id = {str(r["article_id"]): r["contrastive_vector"] for r in rows}
    ids = corpus.meta.news_ids
    for i in range(1, len(ids)):
        if ids[i] in by_id:
            np.testing.assert_allclose(enc.vector_table[i].numpy(), by_id[ids[i]], rtol=1e-6)
            assert enc.vector_missing[i] == 0
        else:
            assert not enc.vector_table[i].any() and enc.vector_missing[i] == 1
    assert enc.vector_missing[0] == 0 and not enc.vector_table[0].any()  # padding is no "missing" news


def test_a_missing_news_gets_the_learned_missing_input(trained):
    vectors, common, result, _ = trained
    config = Config.from_args(["--dataset=ebnerd_demo", "--news_encoder=Vectors", f"--news_vectors={vectors}", *TINY,
                               *common])
    corpus = Corpus(config, root=Path(common[0].split("=", 1)[1]) / "MIND-ebnerd_demo", need_glove=False,
                    log=lambda *a: None)
    model = Model(config, corpus.meta, corpus.news).eval()
    missing = torch.nonzero(model.news_encoder.vector_missing).flatten()
    assert len(missing) >= 2
    out = model.encode_news(missing[:2])
    torch.testing.assert_close(out[0], out[1])  # the same learned vector for every news without one
    project = model.news_encoder.project
    torch.testing.assert_close(out[0], project.weight[:, -1] + project.bias)


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------

IDS = ["", "N1", "N2", "N3"]


def _write(path: Path, columns: dict) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def _vectors(rows: list, width_type=pa.float32()):
    return pa.array(rows, pa.list_(width_type))


def test_a_mind_file_with_string_ids_maps_and_counts(tmp_path):
    path = _write(tmp_path / "v.parquet", {"news_id": ["N3", "N1", "N9"], "vec": _vectors([[3, 3], [1, 1], [9, 9]])})
    t = read_vector_table(path, IDS)
    np.testing.assert_array_equal(t.vectors, [[0, 0], [1, 1], [0, 0], [3, 3]])
    assert t.has_vector.tolist() == [False, True, False, True] and t.missing == 1 and t.unmatched == 1


def test_a_null_vector_is_counted_as_without_one(tmp_path):
    path = _write(tmp_path / "v.parquet", {"article_id": pa.array([1, 2], pa.int32()), "v": _vectors([[1.0], None])})
    t = read_vector_table(path, ["", "1", "2"])
    assert t.has_vector.tolist() == [False, True, False] and t.null_vectors == 1
    assert "1 rows with a null vector" in t.describe()


@pytest.mark.parametrize("columns,expected", [
    ({"id": ["N1"], "a": _vectors([[1.0]]), "b": _vectors([[1.0]])}, "3 columns"),
    ({"id": ["N1"]}, "1 columns"),
    ({"id": ["N1"], "v": pa.array([["x"]], pa.list_(pa.string()))},
     "columns 'id' (string), 'v' (list<element: string>)"),
    ({"id": [1.5], "v": _vectors([[1.0]])}, "columns 'id' (double)"),
])
def test_wrong_columns_name_the_file_and_what_a_vector_file_holds(tmp_path, columns, expected):
    path = _write(tmp_path / "v.parquet", columns)
    with pytest.raises(CorpusError) as e:
        read_vector_table(path, IDS)
    msg = str(e.value)
    assert f"--news_vectors={path}" in msg and expected in msg and "two columns" in msg and "\n" not in msg


@pytest.mark.parametrize("ids,vectors,expected", [
    (["N1", "N2"], [[1.0, 2.0], [1.0]], "row 1: a vector of 1 values, but the first vector has 2"),
    (["N1", "N2"], [[1.0], [float("nan")]], "row 1: NaN or infinite values"),
    (["N1", "N1"], [[1.0], [2.0]], "news id N1 appears in rows 0 and 1"),
    (["X1", "X2"], [[1.0], [2.0]], "none of its 2 news ids (X1, X2, ...) is a news of this corpus (N1, N2, N3, ...)"),
    (["N1", "N2"], [None, None], "every vector of 'v' is null"),
])
def test_bad_rows_are_one_line_errors(tmp_path, ids, vectors, expected):
    path = _write(tmp_path / "v.parquet", {"id": ids, "v": _vectors(vectors)})
    with pytest.raises(CorpusError) as e:
        read_vector_table(path, IDS)
    assert expected in str(e.value) and str(path) in str(e.value)


def test_not_parquet_and_missing_file(tmp_path):
    (tmp_path / "v.parquet").write_text("id,v\n")
    with pytest.raises(CorpusError, match="not a readable parquet file"):
        read_vector_table(tmp_path / "v.parquet", IDS)
    with pytest.raises(FileNotFoundError, match="--ebnerd_artifact"):
        read_vector_table(tmp_path / "none.parquet", IDS)
    (tmp_path / "artifact" / "sub").mkdir(parents=True)
    (tmp_path / "artifact" / "sub" / "x.parquet").write_text("")
    with pytest.raises(CorpusError, match=r"is a folder; give the parquet file of vectors \(inside: .*x.parquet\)"):
        read_vector_table(tmp_path / "artifact", IDS)


def test_main_without_or_with_a_bad_file_is_one_line(trained, tmp_path, capsys):
    _, common, _, _ = trained
    base = ["--mode=train", "--dataset=ebnerd_demo", "--news_encoder=Vectors", *TINY, *common]
    assert cli(base) == 2
    assert "--news_vectors is needed by --news_encoder=Vectors" in capsys.readouterr().err
    bad = _write(tmp_path / "bad.parquet", {"article_id": pa.array([1], pa.int32()), "x": [1], "y": _vectors([[1.0]])})
    assert cli([*base, f"--news_vectors={bad}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --news_vectors=") and "3 columns" in err and "\n" not in err
    assert cli(["--mode=train", "--dataset=ebnerd_demo", f"--news_vectors={bad}", *TINY, *common]) == 2
    assert "--news_vectors is a setting of news encoder Vectors" in capsys.readouterr().err


def test_unknown_artifact_and_missing_zip_without_download(tmp_path):
    with pytest.raises(SystemExit):
        prepare_MIND_dataset.main(["--dataset=ebnerd_demo", f"--data_dir={tmp_path}", "--ebnerd_artifact=nope"])
    with pytest.raises(FileNotFoundError, match=f"artifacts/{FOLDER}.zip"):
        ebnerd.fetch_artifact(tmp_path, FOLDER, download_missing=False)
    assert ebnerd.ARTIFACT_URL.format(folder=FOLDER) == \
        f"https://ebnerd-dataset.s3.eu-west-1.amazonaws.com/artifacts/{FOLDER}.zip"


def test_explain_pretrain_and_fine_tune_with_vectors(trained):
    """The other modes take the Vectors encoder like any news encoder: --mode=explain (no words to show),
    --mode=pretrain on the converted corpus and --init_from."""
    vectors, common, result, _ = trained
    root = Path(common[0].split("=", 1)[1]) / "MIND-ebnerd_demo"
    impression = (root / "dev" / "behaviors.tsv").read_text().split("\t", 1)[0]
    shown = main(["--mode=explain", f"--dev_model_path={result['checkpoint']}", f"--impression_id={impression}",
                  *common])
    assert any(str(v).endswith(".png") and Path(v).is_file() for v in shown.values()), shown.keys()
    flags = ["--dataset=ebnerd_demo", "--news_encoder=Vectors", "--user_encoder=ATT", f"--news_vectors={vectors}",
             *TINY, *common]
    pre = main(["--mode=pretrain", "--pretrain_tasks=contrastive,next_click", *flags])
    tuned = main(["--mode=train", f"--init_from={pre['run_dir']}", *flags])
    assert 0 <= tuned["dev_metrics"]["auc"] <= 1


def test_dev_with_other_vectors_than_the_checkpoints_is_an_error(trained, tmp_path, capsys):
    """The table is not in the checkpoint (it is read from the file again), but its signature is: a file rewritten
    since training would otherwise give a silently different model."""
    vectors, common, result, _ = trained
    saved = Path(vectors).read_bytes()
    table = pq.read_table(vectors)
    column = table.column("contrastive_vector").to_pylist()
    column[0] = [v + 1.0 for v in column[0]]
    pq.write_table(table.set_column(1, "contrastive_vector", pa.array(column, pa.list_(pa.float32()))), vectors)
    try:
        assert cli(["--mode=dev", f"--dev_model_path={result['checkpoint']}", *common]) == 2
    finally:
        Path(vectors).write_bytes(saved)
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert f"--news_vectors={vectors}" in err and "differ from the ones the checkpoint was trained with" in err
    assert cli(["--mode=dev", f"--dev_model_path={result['checkpoint']}", *common]) == 0  # the same file again: fine


def test_dev_reads_the_vector_file_from_where_it_is_now(trained, tmp_path, capsys):
    """The file's path is stored as typed (often relative to where training ran); after a move, or from another
    folder, dev names the file it cannot find and `--news_vectors` points it at the same file's new place: its
    signature, not its path, is what must match."""
    vectors, common, result, _ = trained
    moved = tmp_path / "moved.parquet"
    moved.write_bytes(Path(vectors).read_bytes())
    Path(vectors).rename(tmp_path / "away.parquet")
    try:
        assert cli(["--mode=dev", f"--dev_model_path={result['checkpoint']}", *common]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"--news_vectors={vectors}: no such file" in err, err
        assert cli(["--mode=dev", f"--dev_model_path={result['checkpoint']}", *common, f"--news_vectors={moved}"]) == 0
        assert capsys.readouterr().err.strip() == ""
    finally:
        (tmp_path / "away.parquet").rename(vectors)
