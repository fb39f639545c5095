"""xMIND (Iana et al., 2024: MIND's news machine-translated into 14 languages) -> the MIND-format corpus.

xMIND replaces only the news texts: each language has, per MIND size and split, a zip `xMIND<size>_<split>.zip`
holding a headerless tsv `news.tsv` with three columns, the MIND news id, the translated title and the translated
abstract. The impressions are MIND's. So an xMIND corpus is a MIND protocol folder (prepare_MIND_dataset.py builds
it first) whose news.tsv files get the language's title and abstract, joined on the news id; behaviors.tsv is
MIND's file (linked). The entity columns are emptied: their character offsets point into the English text.
Docs: docs/data.md#xmind. Download: the authors' repository (`URL`), CC BY-NC-SA 4.0 on top of MIND's terms.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import time
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from MIND_corpus import NEWS_COLUMNS, SPLITS, CorpusError, file_signature
from news_data.download import download as fetch_url  # `download` is the converters' switch
from news_data.registry import MARKER, NewsDataset, SkipCounts, read_marker, register, up_to_date
from util import atomic_write, replace_dir_atomically

URL = "https://github.com/andreeaiana/xMIND/raw/main/xMIND/{lang}/{name}"
LANGUAGES = ("cmn", "fin", "grn", "hat", "ind", "jpn", "kat", "ron", "som", "swh", "tam", "tha", "tur", "vie")
SPLITS_OF_SIZE = {"small": ("train", "dev"), "large": ("train", "dev", "test"), "demo": ("train", "dev", "test")}
TITLE, ABSTRACT, TITLE_ENTITIES, ABSTRACT_ENTITIES = (NEWS_COLUMNS.index(c) for c in
                                                      ("Title", "Abstract", "TitleEntities", "AbstractEntities"))


def language_file(data_dir: Path, lang: str, size: str, split: str) -> Path:
    return Path(data_dir) / "xMIND" / lang / f"xMIND{size}_{split}.zip"


def read_translations(path: Path) -> Iterator[tuple[int, str, str, str]]:
    """(line, nid, title, abstract) of one xMIND language zip (its news.tsv member), or of an unzipped news.tsv;
    a line without exactly 3 tab-separated fields is an error naming the file and line."""
    if path.suffix == ".zip":
        try:
            z = zipfile.ZipFile(path)
        except zipfile.BadZipFile:
            raise CorpusError(f"{path}: not a zip file; download it again")
        members = [m for m in z.namelist() if m.endswith(".tsv")]
        if len(members) != 1:
            raise CorpusError(f"{path}: expected one .tsv file (news.tsv) inside, found {members or 'none'}")
        stream = io.TextIOWrapper(z.open(members[0]), encoding="utf-8", newline="\n")
        where = f"{path}:{members[0]}"
    else:
        stream, where = open(path, encoding="utf-8", newline="\n"), str(path)
    with stream:
        for n, line in enumerate(stream, 1):
            fields = line.rstrip("\r\n").split("\t")
            if len(fields) != 3 or not fields[0]:
                raise CorpusError(f"{where}:{n}: expected 3 tab-separated columns (nid, title, abstract), got "
                                  f"{len(fields)}{' (an empty nid)' if fields and not fields[0] else ''}; download "
                                  f"the file again")
            yield n, fields[0], " ".join(fields[1].split()), " ".join(fields[2].split())


def translate_news(src: Path, dst: Path, table: dict[str, tuple[str, str]], skips: SkipCounts) -> None:
    """MIND news.tsv `src` -> `dst` with the translated title/abstract; news without a translation keep MIND's
    English text (counted); entity columns emptied."""
    missing = 0
    with open(src, encoding="utf-8", newline="\n") as f, open(dst, "w", encoding="utf-8", newline="\n") as out:
        for line in f:
            fields = line.rstrip("\n").split("\t")
            if len(fields) != len(NEWS_COLUMNS):
                out.write(line)  # the corpus reports the malformed line with its number
                continue
            text = table.get(fields[0])
            if text is None:
                missing += 1
            else:
                fields[TITLE], fields[ABSTRACT] = text
            fields[TITLE_ENTITIES] = fields[ABSTRACT_ENTITIES] = "[]"
            out.write("\t".join(fields) + "\n")
    skips.add(f"news of {src.parent.name}/news.tsv without a translation (English kept)", missing)


class XmindDataset(NewsDataset):
    """xMIND: a MIND protocol (`base`) with the news of one language (--news_language)."""

    family = "xMIND"
    languages = LANGUAGES

    def __init__(self, name: str, description: str, base: str, size: str):
        super().__init__(name, description)
        self.base, self.size = base, size
        self.requires = base  # prepare_MIND_dataset.py builds this MIND protocol first

    def corpus_folder(self, data_dir, language=None) -> Path:
        return Path(data_dir) / f"MIND-{self.name}-{self.check_language(language)}"

    def word_vector_note(self, language: str | None) -> str:
        return (f"the news are in {language} (xMIND): GloVe's English vectors fit few of its words; give vectors "
                f"for {language} as --glove_path (a text file: a word and its values per line, e.g. a fastText "
                f".vec without its first line), or use a PLM news encoder with a multilingual backbone "
                f"(--plm_model_name=xlm-roberta-base or another multilingual model)")

    def raw_files(self, data_dir: Path, language: str, download: bool, log: Callable) -> dict[str, Path]:
        base = Path(data_dir) / f"MIND-{self.base}"
        if self.base == "demo":
            import demo_corpus

            base = demo_corpus.ensure_demo(data_dir, seed=None)
        if not (base / "train" / "behaviors.tsv").is_file():
            raise FileNotFoundError(f"{base} not found: xMIND keeps MIND's impressions; build them with python "
                                    f"prepare_MIND_dataset.py --dataset={self.name} --news_language={language} "
                                    f"(which prepares MIND-{self.base} first)")
        files = {}
        for split in SPLITS_OF_SIZE[self.size]:
            path = language_file(data_dir, language, self.size, split)
            if not path.is_file() and download and self.size != "demo":
                url = URL.format(lang=language, name=path.name)
                log(f"downloading {url} ...")
                fetch_url(url, path, log=log, hint=f"Put xMIND's {path.name} for {language} in {path.parent} "
                         f"yourself (github.com/andreeaiana/xMIND).")
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: put xMIND's {path.name} for {language} there "
                                        f"(github.com/andreeaiana/xMIND) or run python prepare_MIND_dataset.py "
                                        f"--dataset={self.name} --news_language={language}")
            files[f"xmind_{split}"] = path
        for split in SPLITS:
            for name in ("news.tsv", "behaviors.tsv"):
                if (base / split / name).is_file():
                    files[f"{split}_{name}"] = base / split / name
        return files

    def prepare(self, data_dir, *, download=True, language=None, log=print) -> Path:
        language = self.check_language(language)
        return self._convert(Path(data_dir), language, self.raw_files(Path(data_dir), language, download, log), log)

    def ensure(self, data_dir, language=None, log=print) -> Path:
        language = self.check_language(language)
        target = self.corpus_folder(data_dir, language)
        try:
            raw = self.raw_files(Path(data_dir), language, download=False, log=log)
        except FileNotFoundError:
            if read_marker(target) is not None:
                return target
            raise
        return self._convert(Path(data_dir), language, raw, log)

    def _convert(self, data_dir: Path, language: str, raw: dict[str, Path], log: Callable) -> Path:
        target = self.corpus_folder(data_dir, language)
        source = {k: file_signature(p) for k, p in raw.items()}
        if up_to_date(target, self.name, source=source):
            return target
        t0 = time.time()

        def build(tmp: Path) -> None:
            skips = SkipCounts()
            table: dict[str, tuple[str, str]] = {}
            for key in sorted(k for k in raw if k.startswith("xmind_")):
                for _, nid, title, abstract in read_translations(raw[key]):
                    table.setdefault(nid, (title, abstract))
            for split in SPLITS:
                if f"{split}_behaviors.tsv" not in raw:
                    continue
                (tmp / split).mkdir(parents=True)
                translate_news(raw[f"{split}_news.tsv"], tmp / split / "news.tsv", table, skips)
                _link_or_copy(raw[f"{split}_behaviors.tsv"], tmp / split / "behaviors.tsv")
            log(f"xMIND ({language}): {len(table)} translated news; {skips.describe()}")
            (tmp / MARKER).write_text(json.dumps({"source": source, "language": language, "skipped": skips.counts},
                                                 sort_keys=True) + "\n")
        replace_dir_atomically(target, build)
        log(f"built {target} in {time.time() - t0:.1f}s")
        return target


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def write_demo_translations(data_dir: str | Path, language: str, seed: int = 0) -> list[Path]:
    """xMIND-format zips for the generated MIND demo (this project's code; not a translation: each word is
    replaced by a made-up word of the 'language', the same word always by the same one, so a model can learn),
    with a few news left out to exercise the 'English kept' count."""
    import demo_corpus

    root = demo_corpus.ensure_demo(data_dir, seed=None)
    rng = np.random.default_rng(seed)
    letters = list("aeiouklmnprstvyzåøæ")
    vocab: dict[str, str] = {}

    def word(w: str) -> str:
        if w not in vocab:
            vocab[w] = "".join(rng.choice(letters, 3 + len(w) % 5))
        return vocab[w]
    out = []
    for split in SPLITS_OF_SIZE["demo"]:
        lines = []
        for line in (root / split / "news.tsv").read_text(encoding="utf-8").splitlines():
            f = line.split("\t")
            if zlib.crc32(f[0].encode()) % 25 == 0:  # the same news left out of every split
                continue
            lines.append("\t".join([f[0], " ".join(word(w) for w in f[TITLE].split()),
                                    " ".join(word(w) for w in f[ABSTRACT].split())]))
        path = language_file(Path(data_dir), language, "demo", split)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = ("\n".join(lines) + "\n").encode("utf-8")

        def write(tmp, text=text):
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
                z.writestr("news.tsv", text)
        atomic_write(path, write)
        out.append(path)
    return out


register(XmindDataset("xmind_demo", "xMIND format on the generated demo (made-up words)", "demo", "demo"))
register(XmindDataset("xmind_small", "xMIND on the MIND-small protocol", "small", "small"))
register(XmindDataset("xmind_large", "xMIND on MIND-large (leaderboard test)", "large", "large"))
