"""Adressa (news_data/adressa.py): generated event logs in Adressa's JSON-lines format drive prepare -> train -> dev
-> test -> prediction.zip -> compare; the impressions follow the stated protocol; malformed logs are one-line
errors or counted skips."""
from __future__ import annotations

import json
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import pytest

from main import main
from MIND_corpus import CorpusError
from news_data import get_dataset
from news_data.adressa import ADRESSA_PROTOCOL, write_adressa_demo

from common import SMALL_MODEL  # noqa: E402

TINY = ["--epoch=1", "--batch_size=32", "--max_title_length=8", "--max_abstract_length=4", "--word_threshold=1",
        *SMALL_MODEL]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    data = tmp_path_factory.mktemp("ad") / "data"
    write_adressa_demo(data / "adressa" / "one_week", seed=4)
    return data


def _events(data: Path) -> list[dict]:
    return [json.loads(line) for p in sorted((data / "adressa" / "one_week").iterdir())
            for line in p.read_text().splitlines() if line]


def test_impressions_follow_the_protocol(data):
    root = get_dataset("adressa_1w").prepare(data, download=False)
    events = [e for e in _events(data) if e.get("id")]
    clicks: dict[str, set] = {}
    for e in events:
        clicks.setdefault(e["userId"], set()).add(e["id"])
    day = lambda t: datetime.fromtimestamp(t, timezone.utc).day  # noqa: E731 (the demo starts on January 1)
    first_time = {}
    for split in ("train", "dev", "test"):
        for line in (root / split / "behaviors.tsv").read_text().splitlines():
            _, user, stamp, history, cands = line.split("\t")
            t = datetime.strptime(stamp, "%m/%d/%Y %I:%M:%S %p").replace(tzinfo=timezone.utc)
            assert (t.day == ADRESSA_PROTOCOL["train_period"]) == (split == "train")
            labels = [c.rsplit("-", 1) for c in cands.split()]
            assert len(labels) == 1 + ADRESSA_PROTOCOL["negatives"] and sum(y == "1" for _, y in labels) == 1
            assert all(n not in clicks[user] for n, y in labels if y == "0")  # negatives: never clicked by the user
            first_day = {}
            for e in events:
                if e["userId"] == user:
                    first_day[e["id"]] = min(first_day.get(e["id"], 99), day(e["time"]))
            assert history and all(first_day[h] < (7 if split != "train" else 6) for h in history.split())
            first_time.setdefault(split, t)
    marker = json.loads((root / ".prepared").read_text())
    n_eval = marker["impressions"]["dev"] + marker["impressions"]["test"]
    assert marker["impressions"]["dev"] == round(ADRESSA_PROTOCOL["dev_share"] * n_eval)


def test_train_dev_test_and_compare(data, capsys):
    common = [f"--data_dir={data}", f"--output_dir={data.parent / 'best_model'}"]
    result = main(["--mode=train", "--dataset=adressa_1w", *TINY, *common])
    assert "Norwegian" in capsys.readouterr().out
    ckpt = result["checkpoint"]
    main(["--mode=dev", f"--dev_model_path={ckpt}", *common])
    test = main(["--mode=test", f"--test_model_path={ckpt}", *common])
    assert test["metrics"]["labelled"]
    with zipfile.ZipFile(test["prediction"]) as z:
        assert len(z.read("prediction.txt").decode().splitlines()) == test["metrics"]["impressions"]
    cmp = main(["--mode=compare", "--runs", f"popularity:{Path(ckpt).parent}", str(Path(ckpt).parent),
                "--resamples=50", *common])
    assert cmp["rows"]


def test_malformed_logs(tmp_path):
    folder = write_adressa_demo(tmp_path / "adressa" / "one_week", seed=5)
    day1 = folder / "20170101"
    lines = day1.read_text().splitlines()
    e = json.loads(lines[0])
    del e["userId"]
    day1.write_text("\n".join([json.dumps(e)] + lines[1:]) + "\n")
    root = get_dataset("adressa_1w").prepare(tmp_path, download=False)
    assert json.loads((root / ".prepared").read_text())["skipped"] == {
        "article events without userId or time (skipped)": 1}
    day1.write_text("\n".join(lines[:3] + ["{not json"] + lines[3:]) + "\n")
    with pytest.raises(CorpusError, match=rf"{day1}:4: not a JSON object"):
        get_dataset("adressa_1w").prepare(tmp_path, download=False)


def test_too_few_days_and_missing_logs(tmp_path):
    write_adressa_demo(tmp_path / "adressa" / "one_week", days=6)
    with pytest.raises(CorpusError, match="the dev split got no impressions from 6 daily files"):
        get_dataset("adressa_1w").prepare(tmp_path, download=False)
    with pytest.raises(FileNotFoundError, match="three_month.tar.gz"):
        get_dataset("adressa_10w").prepare(tmp_path, download=False)
