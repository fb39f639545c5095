"""The dataset registry: every `--dataset` name, where its files come from, how it becomes a corpus, its protocol
and its submission file.

Every dataset is converted once into the MIND-format folder that `MIND_corpus.Corpus` reads
(`<root>/{train,dev,test}/{news.tsv,behaviors.tsv}`), so the corpus cache, `Batch`, the models, the evaluation,
the records, pretraining and the statistics never learn which dataset they run on. What a format needs beyond
MIND's columns (EB-NeRD's original impression ids, its beyond-accuracy rows) is kept beside the converted files
and read back only by that dataset's own submission writer.

`config.py` reads the names for `--dataset`'s choices; pyarrow is imported only when a dataset is converted.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

from MIND_corpus import DATASETS as MIND_DATASETS
from MIND_corpus import PREPARED as MARKER  # written last into a converted folder: what it was built from (a stale
# one is rebuilt), and the news texts' language (MIND_corpus.corpus_language)


class NewsDataset:
    """One `--dataset` name. Subclasses say where the raw files are, how they are converted, and what the
    leaderboard wants.

    `name`: the --dataset value; `family`: the format (one module per format); `languages`: the --news_language
    values it accepts (empty: the flag must stay unset)."""

    family: ClassVar[str] = ""
    languages: ClassVar[tuple[str, ...]] = ()
    default_language: ClassVar[str | None] = None

    def __init__(self, name: str, description: str):
        self.name = name
        self.description = description

    # -- where ---------------------------------------------------------------------------------------------
    def corpus_folder(self, data_dir: str | Path, language: str | None = None) -> Path:
        """The converted MIND-format folder `Corpus` reads."""
        return Path(data_dir) / f"MIND-{self.name}"

    def check_language(self, language: str | None) -> str | None:
        if not self.languages:
            if language:
                raise ValueError(f"--news_language={language} is for xMIND; --dataset={self.name} has one language: "
                                 f"leave the flag out")
            return None
        language = language or self.default_language
        if language not in self.languages:
            raise ValueError(f"--dataset={self.name} needs --news_language, one of {', '.join(self.languages)} "
                             f"(ISO 639-3 codes); got {language!r}")
        return language

    def word_vector_note(self, language: str | None) -> str | None:
        """What word vectors a GloVe-based news encoder needs for this dataset's language (None: English)."""
        return None

    # -- how -----------------------------------------------------------------------------------------------
    def prepare(self, data_dir: str | Path, *, download: bool = True, language: str | None = None,
                log: Callable = print) -> Path:
        """Get the raw files (download, or those the user put in place) and build `corpus_folder`."""
        raise NotImplementedError

    def ensure(self, data_dir: str | Path, language: str | None = None, log: Callable = print) -> Path:
        """What `main.py` calls before a run: the converted folder, (re)built from raw files already in place when
        missing or stale; never downloads (prepare_MIND_dataset.py does)."""
        return self.corpus_folder(data_dir, language)

    def write_submission(self, root: Path, out_dir: Path, impression_ids: Sequence[int],
                         ranks_list: Sequence[Sequence[int]]) -> dict[str, str]:
        """Extra leaderboard files for the test split beyond MIND's prediction.zip; {} when there are none."""
        return {}


class MindDataset(NewsDataset):
    """MIND's protocols and the generated demo: built by prepare_MIND_dataset.py itself / demo_corpus."""

    family = "MIND"


NEWS_DATASETS: dict[str, NewsDataset] = {}  # --dataset name -> its entry, in registration order


def register(dataset: NewsDataset) -> NewsDataset:
    if dataset.name in NEWS_DATASETS:
        raise ValueError(f"dataset {dataset.name!r} registered twice")
    NEWS_DATASETS[dataset.name] = dataset
    return dataset


for _name in MIND_DATASETS:  # MIND's own names keep their home in MIND_corpus.py
    register(MindDataset(_name, "the generated MIND-format demo" if _name == "demo" else f"MIND protocol {_name}"))


def get_dataset(name: str) -> NewsDataset:
    _load_formats()
    if name not in NEWS_DATASETS:
        raise ValueError(f"unknown --dataset {name!r}; choose from {dataset_names()}")
    return NEWS_DATASETS[name]


def dataset_names() -> list[str]:
    _load_formats()
    return list(NEWS_DATASETS)


def is_mind(name: str) -> bool:
    return isinstance(get_dataset(name), MindDataset)


def corpus_root(config) -> Path:
    """`<data_dir>/MIND-<dataset>` (xMIND: one folder per language)."""
    ds = get_dataset(config.dataset)
    return ds.corpus_folder(config.data_dir, ds.check_language(getattr(config, "news_language", None)))


def _load_formats() -> None:
    """Each format module registers its names on import (light modules: pyarrow is imported inside them)."""
    from news_data import adressa, ebnerd, xmind  # noqa: F401


# -- shared by the converters ---------------------------------------------------------------------------------

def read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def check_replaceable(folder: Path, dataset: str) -> None:
    """A converted folder is ours to rebuild only if it carries our marker: a user's own folder stays."""
    if folder.exists() and read_marker(folder) is None:
        raise FileExistsError(f"{folder} exists but was not made by prepare_MIND_dataset.py --dataset={dataset} "
                              f"(no {MARKER} file): move it away, or use another --data_dir")


def up_to_date(folder: Path, dataset: str, **expected: Any) -> bool:
    """Whether `folder` holds a conversion whose marker records `expected` (its source files' signatures, the
    protocol's version); if not, it must be ours to rebuild (`check_replaceable`) and False is returned."""
    marker = read_marker(folder)
    if marker is not None and all(marker.get(k) == v for k, v in expected.items()):
        return True
    check_replaceable(folder, dataset)
    return False


def clean_text(value) -> str:
    """A text field as one tsv cell: tabs and line breaks become spaces (MIND files have none); None is ''."""
    if value is None:
        return ""
    return " ".join(str(value).split())


@dataclass
class SkipCounts:
    """Rows a converter skipped or repaired, by reason: printed, and kept in the folder's marker."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, reason: str, n: int) -> None:
        if n:
            self.counts[reason] = self.counts.get(reason, 0) + int(n)

    def describe(self) -> str:
        return "; ".join(f"{n} {reason}" for reason, n in self.counts.items()) or "nothing skipped"
