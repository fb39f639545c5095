"""Get MIND into `data/MIND-<dataset>/{train,dev,test}`, or generate the demo corpus; the one set-up script for
every dataset: EB-NeRD, xMIND and Adressa are got and converted into the same MIND-format folders by their entries
in the dataset registry (news_data/, docs/data.md).

    python prepare_MIND_dataset.py --dataset {small,200k,large,demo} [--data_dir data] [--no-download]
    python prepare_MIND_dataset.py --dataset {ebnerd_demo,ebnerd_small,ebnerd_large,ebnerd_testset}
        [--ebnerd_abstract {subtitle,body}] [--ebnerd_artifact FOLDER ...]
    python prepare_MIND_dataset.py --dataset {xmind_small,xmind_large} --news_language=swh
    python prepare_MIND_dataset.py --dataset {adressa_1w,adressa_10w}

Every protocol folder holds `train/`, `dev/` and `test/`, each with `news.tsv`, `behaviors.tsv`,
`entity_embedding.vec` and `relation_embedding.vec` in the MIND format (docs/MIND.md §1). The protocols (label
them in every result table):

- small: train = a deterministic 95% of the MINDsmall_train impressions, dev = the other 5% (the first 5% of a
  numpy `default_rng(0)` permutation of the sorted impression ids), test = the official MINDsmall_dev. train and
  dev read MINDsmall_train's news.tsv, test reads MINDsmall_dev's. "MIND-small results" are therefore results
  on the official dev set.
- 200k: 200,000 users sampled from MIND-large: the unique user ids of train+dev behaviors, sorted, then
  `default_rng(0).choice(n, 200_000, replace=False)`. train = their MIND-large train impressions; their
  MIND-large dev impressions go alternately (in file order: 1st to dev, 2nd to test, ...) to dev and test.
  train reads MINDlarge_train's news.tsv, dev and test MINDlarge_dev's.
- large: the official MIND-large train / dev / test (test has no labels: it is the leaderboard split).
- demo: a seeded MIND-format corpus written by `generate_demo` (this project's code, no MIND rows: MIND's
  licence forbids redistributing them), used by the quick start, the tests and size benchmarks.

Zips: a zip the user put in `--data_dir` (e.g. from the gated Hugging Face dataset yjw1029/MIND) is used as is;
otherwise it is downloaded (news_data/download.py) from the official mirror `MIND_URL` into `<zip>.part`
(resumed with an HTTP Range request after an interruption), its size checked against the server's, and renamed
when complete. Each zip is CRC-checked and unpacked once into `data_dir/raw/<zip stem>/`. Offline, preparation
fails within seconds with a message naming the zips, the folder to put them in and where to get them. Protocol
folders are built in a temp folder and renamed into place, with a `.prepared` marker; a folder built by the
current `PROTOCOL_VERSION` is not rebuilt, and a folder without the marker (a corpus the user put there) is never
replaced: an error.

Demo corpus extras (not in MIND): `<split>/click_probabilities.tsv` (`ImpressionID \\t p1 p2 ...`, the true
click probability of each candidate, in order), `test/labels_hidden.tsv` (`ImpressionID \\t 0 1 0 ...`, the
test labels, written whether or not behaviors.tsv carries them) and `oracle.json` (per split the mean
per-impression AUC of scoring with the true probabilities, and of the two ingredients alone; sizes; seed).
"""
from __future__ import annotations

import argparse
import csv
import http.client
import json
import os
import shutil
import sys
import time
import zipfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from demo_corpus import DEMO_SEED, DEMO_SIZES, MIN_DEMO_NEWS, ensure_demo
from MIND_corpus import BEHAVIOR_COLUMNS, DATASETS, SPLITS
from news_data import dataset_names, ebnerd, get_dataset, is_mind
from news_data.download import download
from util import check_folder, replace_dir_atomically, writing_into

MIND_URL = "https://recodatasets.z20.web.core.windows.net/newsrec/"
HF_DATASET = "yjw1029/MIND"
ZIPS = {
    "small": ("MINDsmall_train.zip", "MINDsmall_dev.zip"),
    "200k": ("MINDlarge_train.zip", "MINDlarge_dev.zip"),
    "large": ("MINDlarge_train.zip", "MINDlarge_dev.zip", "MINDlarge_test.zip"),
}
SPLIT_FILES = ("news.tsv", "behaviors.tsv", "entity_embedding.vec", "relation_embedding.vec")
PROTOCOL_VERSION = 2
USERS_200K = 200_000  # users the 200k protocol samples (the CLI's --num_users; tests use a handful)


class MINDNotFoundError(FileNotFoundError):
    """A MIND zip is neither in the data folder nor downloadable; the message says where to get it."""


# ==========================================================================================================
# Real MIND: zips
# ==========================================================================================================

def _where_to_get(names: Sequence[str], data_dir: Path, base_url: str) -> str:
    folder = Path(data_dir).resolve()
    urls = ", ".join(base_url + n for n in names)
    return (f"Put {', '.join(names)} into {folder}/ and run this again. Get them from {urls} "
            f"(or from the Hugging Face dataset {HF_DATASET}, after accepting its licence, with an HF_TOKEN).")


def _raw_dir(data_dir: Path, name: str) -> Path:
    return Path(data_dir) / "raw" / Path(name).stem


def _is_unpacked(folder: Path) -> bool:
    return all((folder / f).exists() for f in ("news.tsv", "behaviors.tsv"))


def obtain_zip(name: str, data_dir, download_missing: bool = True, base_url: str | None = None) -> Path:
    """Path of a checked `data_dir/<name>`: the user's file, or downloaded from `base_url` (default MIND_URL)."""
    data_dir = Path(data_dir)
    base_url = base_url or MIND_URL
    path = data_dir / name
    if path.exists():
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path} is not a valid zip (an interrupted copy or download?); delete it and run again. "
                             + _where_to_get([name], data_dir, base_url))
        return path
    if not download_missing:
        raise MINDNotFoundError(f"{name} is not in {data_dir.resolve()}/ and downloading is off (--no-download). "
                                + _where_to_get([name], data_dir, base_url))
    print(f"downloading {base_url + name} -> {path}", flush=True)
    try:
        return download(base_url + name, path)
    except (OSError, ValueError, http.client.HTTPException) as e:
        raise MINDNotFoundError(f"could not download {name} ({e}). " + _where_to_get([name], data_dir, base_url)
                                + f" A partial download is kept in {path.name}.part and resumes next time.") from None


def unpack(zip_path, data_dir) -> Path:
    """Unpack the MIND files of a zip once into `data_dir/raw/<zip stem>/` (CRC-checked; files may sit in a
    sub-folder of the zip; other members are ignored, so no path can escape the folder)."""
    zip_path = Path(zip_path)
    out = _raw_dir(data_dir, zip_path.name)
    if (out / ".unpacked").exists():
        return out
    with zipfile.ZipFile(zip_path) as z:
        members = {}
        for info in sorted(z.infolist(), key=lambda i: (i.filename.count("/"), i.filename)):
            base = info.filename.rsplit("/", 1)[-1]
            if base in SPLIT_FILES and not info.is_dir():
                members.setdefault(base, info)
        if "behaviors.tsv" not in members or "news.tsv" not in members:
            raise ValueError(f"{zip_path} holds no behaviors.tsv / news.tsv: not a MIND zip")
        print(f"unpacking {zip_path.name} -> {out}", flush=True)
        bad = z.testzip()
        if bad is not None:
            raise ValueError(f"{zip_path}: member {bad} is corrupt; delete the zip and get it again")

        def build(tmp: Path) -> None:
            for base, info in members.items():
                with z.open(info) as src, open(tmp / base, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
            (tmp / ".unpacked").write_text(f"{zip_path.name}\n")

        replace_dir_atomically(out, build)
    return out


def obtain_raw(names: Sequence[str], data_dir, *, download: bool = True, base_url: str | None = None
               ) -> dict[str, Path]:
    """`{zip name: data_dir/raw/<stem>}` for every zip, unpacking zips found in (or downloaded to) data_dir.

    A raw folder that already holds news.tsv and behaviors.tsv is used without its zip. With download=False
    every missing zip is reported at once, before any work."""
    data_dir = Path(data_dir)
    base_url = base_url or MIND_URL
    need = [n for n in names if not _is_unpacked(_raw_dir(data_dir, n))]
    missing = [n for n in need if not (data_dir / n).exists()]
    if missing and not download:
        raise MINDNotFoundError(f"missing {', '.join(missing)} in {data_dir.resolve()}/ and downloading is off "
                                f"(--no-download). " + _where_to_get(missing, data_dir, base_url))
    for name in need:
        unpack(obtain_zip(name, data_dir, download, base_url), data_dir)
    return {n: _raw_dir(data_dir, n) for n in names}


# ==========================================================================================================
# Real MIND: protocols
# ==========================================================================================================

def read_behaviors(path, usecols: Sequence[str] | None = None, chunksize: int | None = None):
    """behaviors.tsv as strings (no header, no quoting, empty history = ''); a reader of frames if chunksize."""
    if Path(path).stat().st_size == 0:  # pandas refuses an empty file
        empty = pd.DataFrame({c: pd.Series([], dtype=object) for c in (usecols or BEHAVIOR_COLUMNS)})
        return iter([empty]) if chunksize else empty
    return pd.read_csv(path, sep="\t", header=None, names=list(BEHAVIOR_COLUMNS), usecols=usecols, dtype=str,
                       quoting=csv.QUOTE_NONE, keep_default_na=False, na_filter=False, chunksize=chunksize,
                       encoding="utf-8", engine="c")


def _behavior_lines(frame: pd.DataFrame) -> str:
    if frame.empty:
        return ""
    line = frame[BEHAVIOR_COLUMNS[0]].str.cat([frame[c] for c in BEHAVIOR_COLUMNS[1:]], sep="\t")
    return "\n".join(line.tolist()) + "\n"


def route_behaviors(source, outputs: dict[str, Path], route: Callable[[pd.DataFrame], np.ndarray],
                    chunksize: int = 500_000) -> dict[str, int]:
    """Stream `source` in chunks and append each row to the output `route(chunk)` names for it ('' drops it).
    Rows keep their file order and text; returns the row count written per output."""
    handles = {k: open(p, "w", encoding="utf-8", newline="\n") for k, p in outputs.items()}
    counts = dict.fromkeys(outputs, 0)
    try:
        for chunk in read_behaviors(source, chunksize=chunksize):
            target = np.asarray(route(chunk))
            for key, f in handles.items():
                mask = target == key
                if mask.any():
                    f.write(_behavior_lines(chunk[mask]))
                    counts[key] += int(mask.sum())
    finally:
        for f in handles.values():
            f.close()
    return counts


def _sorted_ids(values: np.ndarray) -> np.ndarray:
    """Unique ids, numerically sorted when they are all integers (MIND impression ids), else as strings."""
    values = np.unique(np.asarray(values, dtype=str))
    if len(values) and all(v.isdigit() for v in values.tolist()):
        return values[np.argsort(values.astype(np.int64), kind="stable")]
    return values


def small_dev_ids(impression_ids, dev_fraction: float = 0.05, seed: int = 0) -> np.ndarray:
    """The `small` protocol's dev impression ids: the first round(5%) of a default_rng(seed) permutation of
    the sorted unique impression ids."""
    ids = _sorted_ids(impression_ids)
    perm = np.random.default_rng(seed).permutation(len(ids))
    return np.sort(ids[perm[: int(round(len(ids) * dev_fraction))]])


def sample_users(user_ids, num_users: int = USERS_200K, seed: int = 0) -> np.ndarray:
    """The `200k` protocol's users: `default_rng(seed).choice` without replacement over the sorted unique ids."""
    users = np.unique(np.asarray(user_ids, dtype=str))
    if num_users > len(users):
        raise ValueError(f"asked for {num_users} users but the behaviors hold only {len(users)}")
    chosen = np.random.default_rng(seed).choice(len(users), size=num_users, replace=False)
    return np.sort(users[chosen])


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link when the file system allows it (MIND-large files are GBs), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _news_files(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("news.tsv", "entity_embedding.vec", "relation_embedding.vec"):
        if (src / name).exists():
            _link_or_copy(src / name, dst / name)
        else:  # an empty file keeps the split folder complete; readers treat it as "no vectors"
            (dst / name).write_text("")


def prepare(dataset: str, data_dir="data", *, download: bool = True, num_users: int = USERS_200K, seed: int = 0,
            base_url: str | None = None) -> Path:
    """Build `<data_dir>/MIND-<dataset>/{train,dev,test}` for a protocol (see the module docstring).

    Args:
        dataset: small, 200k, large or demo (demo: `ensure_demo(data_dir)`).
        download: fetch missing zips from `base_url` (default MIND_URL); False: only use zips in data_dir.
        num_users: users sampled by the 200k protocol (tests use a handful).
        seed: seed of the small split's permutation and of the 200k user sample.
    Returns:
        The protocol folder. Nothing is rebuilt if its `.prepared` marker matches this version and arguments.
    """
    data_dir = Path(data_dir)
    if dataset == "demo":
        return ensure_demo(data_dir)
    if dataset not in ZIPS:
        raise ValueError(f"unknown --dataset {dataset!r}; choose from {list(DATASETS)}")
    target = data_dir / f"MIND-{dataset}"
    marker = {"protocol": dataset, "version": PROTOCOL_VERSION, "seed": seed,
              "num_users": num_users if dataset == "200k" else None}
    done = target / ".prepared"
    if done.exists():
        try:
            saved = json.loads(done.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, OSError):
            saved = {}
        if {k: saved.get(k) for k in marker} == marker:
            print(f"{target} is ready (protocol {dataset}, version {PROTOCOL_VERSION})")
            return target
    elif target.is_dir() and any(target.iterdir()):
        # Not built here (no marker): a corpus the user put there. Rebuilding would delete it.
        raise FileExistsError(f"{target} holds files that prepare_MIND_dataset.py did not build (no .prepared marker); "
                              f"it was left as it is. main.py --dataset={dataset} reads it as it is; to have the "
                              f"protocol built, move the folder away or pass another --data_dir")
    raw = obtain_raw(ZIPS[dataset], data_dir, download=download, base_url=base_url)
    t0 = time.time()

    def build(tmp: Path) -> None:
        for split in SPLITS:
            (tmp / split).mkdir()
        counts: dict[str, int] = {}
        if dataset == "small":
            train, dev = raw["MINDsmall_train.zip"], raw["MINDsmall_dev.zip"]
            ids = read_behaviors(train / "behaviors.tsv", usecols=["ImpressionID"])["ImpressionID"].to_numpy()
            dev_ids = small_dev_ids(ids, seed=seed)
            counts.update(route_behaviors(
                train / "behaviors.tsv", {"train": tmp / "train" / "behaviors.tsv", "dev": tmp / "dev" / "behaviors.tsv"},
                lambda chunk: np.where(np.isin(chunk["ImpressionID"].to_numpy(dtype=str), dev_ids), "dev", "train")))
            _news_files(train, tmp / "train")
            _news_files(train, tmp / "dev")
            _news_files(dev, tmp / "test")
            _link_or_copy(dev / "behaviors.tsv", tmp / "test" / "behaviors.tsv")
        elif dataset == "200k":
            train, dev = raw["MINDlarge_train.zip"], raw["MINDlarge_dev.zip"]
            all_users = np.concatenate([read_behaviors(p / "behaviors.tsv", usecols=["UserID"])["UserID"].to_numpy()
                                        for p in (train, dev)])
            users = sample_users(all_users, num_users, seed)
            counts.update(route_behaviors(
                train / "behaviors.tsv", {"train": tmp / "train" / "behaviors.tsv"},
                lambda chunk: np.where(np.isin(chunk["UserID"].to_numpy(dtype=str), users), "train", "")))
            taken = [0]  # selected dev rows so far: alternation continues across chunks

            def alternate(chunk: pd.DataFrame) -> np.ndarray:
                mine = np.isin(chunk["UserID"].to_numpy(dtype=str), users)
                rank = taken[0] + np.cumsum(mine) - 1
                taken[0] += int(mine.sum())
                return np.where(mine, np.where(rank % 2 == 0, "dev", "test"), "")

            counts.update(route_behaviors(dev / "behaviors.tsv", {"dev": tmp / "dev" / "behaviors.tsv",
                                                                   "test": tmp / "test" / "behaviors.tsv"}, alternate))
            _news_files(train, tmp / "train")
            _news_files(dev, tmp / "dev")
            _news_files(dev, tmp / "test")
        else:
            for split in SPLITS:
                src = raw[f"MINDlarge_{split}.zip"]
                _news_files(src, tmp / split)
                _link_or_copy(src / "behaviors.tsv", tmp / split / "behaviors.tsv")
        (tmp / ".prepared").write_text(json.dumps({**marker, "impressions": counts}, sort_keys=True) + "\n",
                                       encoding="utf-8")

    replace_dir_atomically(target, build)
    print(f"prepared {target} (protocol {dataset}) in {time.time() - t0:.0f}s")
    return target


# ==========================================================================================================
# CLI
# ==========================================================================================================

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", required=True, choices=dataset_names(),
                   help="protocol to build (see above); EB-NeRD, xMIND and Adressa: docs/data.md")
    g.add_argument("--news_language", default=None, help="xMIND: the news language (ISO 639-3 code, e.g. swh)")
    g.add_argument("--data_dir", default="data", help="where the zips are / go, and where MIND-<dataset>/ is built")
    g.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                   help="download missing zips (--no-download: only use zips already in --data_dir)")
    g.add_argument("--num_users", type=int, default=USERS_200K, help="200k protocol: number of users sampled")
    e = p.add_argument_group("EB-NeRD")
    e.add_argument("--ebnerd_abstract", default=None, choices=list(ebnerd.ABSTRACT_COLUMNS),
                   help="the articles' column that becomes the news' abstract: subtitle (a sentence or two) or body "
                   "(the whole text); not typed: what the existing conversion used, else subtitle")
    e.add_argument("--ebnerd_artifact", action="append", default=None, choices=list(ebnerd.ARTIFACTS),
                   metavar="FOLDER", help="also get one of the organisers' article-vector artifacts (artifacts/"
                   "<FOLDER>.zip, unzipped into <data_dir>/ebnerd_artifacts/<FOLDER>/) for --news_encoder=Vectors "
                   "--news_vectors=<its parquet>; repeat the flag for several. Choices: " + ", ".join(ebnerd.ARTIFACTS))
    d = p.add_argument_group("demo")
    d.add_argument("--demo_news", type=int, default=DEMO_SIZES["num_news"], help="demo: number of news")
    d.add_argument("--demo_users", type=int, default=DEMO_SIZES["num_users"], help="demo: number of users")
    d.add_argument("--demo_train_impressions", type=int, default=DEMO_SIZES["num_train_impressions"],
                   help="demo: train impressions")
    d.add_argument("--demo_dev_impressions", type=int, default=DEMO_SIZES["num_dev_impressions"],
                   help="demo: dev impressions")
    d.add_argument("--demo_test_impressions", type=int, default=DEMO_SIZES["num_test_impressions"],
                   help="demo: test impressions")
    d.add_argument("--demo_seed", "--seed", dest="seed", type=int, default=DEMO_SEED,
                   help="demo generator seed (real protocols always use 0)")
    return p


def main(argv: Sequence[str] | None = None) -> Path:
    """Command line: build one protocol folder (or the demo corpus) and return its path."""
    p = build_parser()
    args = p.parse_args(argv)
    for flag, value, low in (("--demo_news", args.demo_news, MIN_DEMO_NEWS), ("--demo_users", args.demo_users, 1),
                             ("--demo_train_impressions", args.demo_train_impressions, 1),
                             ("--demo_dev_impressions", args.demo_dev_impressions, 1),
                             ("--demo_test_impressions", args.demo_test_impressions, 1),
                             ("--num_users", args.num_users, 1)):
        if value < low:
            p.error(f"{flag} must be >= {low}, got {value}")
    check_folder(args.data_dir, "--data_dir")
    if args.dataset == "demo":
        with writing_into(args.data_dir, "--data_dir", "the demo corpus"):
            return ensure_demo(args.data_dir, seed=args.seed, num_news=args.demo_news, num_users=args.demo_users,
                               num_train_impressions=args.demo_train_impressions,
                               num_dev_impressions=args.demo_dev_impressions,
                               num_test_impressions=args.demo_test_impressions)
    for flag in ("ebnerd_artifact", "ebnerd_abstract"):
        if getattr(args, flag) and get_dataset(args.dataset).family != "EB-NeRD":
            p.error(f"--{flag} is for the EB-NeRD datasets, not --dataset={args.dataset}")
    if not is_mind(args.dataset):  # the other formats: their registry entry downloads and converts
        base = getattr(get_dataset(args.dataset), "requires", None)  # xMIND: MIND's impressions first
        if base and base != "demo":
            prepare(base, args.data_dir, download=args.download, num_users=args.num_users)
        with writing_into(args.data_dir, "--data_dir", "the converted corpus"):
            options = {"abstract": args.ebnerd_abstract} if args.ebnerd_abstract else {}
            target = get_dataset(args.dataset).prepare(args.data_dir, download=args.download,
                                                       language=args.news_language, **options)
            for folder in args.ebnerd_artifact or ():
                vectors = ebnerd.fetch_artifact(args.data_dir, folder, args.download)
                print(f"EB-NeRD article vectors ({folder}): {vectors}; train on them with --news_encoder=Vectors "
                      f"--news_vectors={vectors}")
            return target
    return prepare(args.dataset, args.data_dir, download=args.download, num_users=args.num_users)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
