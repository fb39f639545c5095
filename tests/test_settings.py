"""Component settings (settings.py): each encoder's flags live beside it, the command line is generated from them,
checkpoints store them, and a component reads nothing else."""
from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch.nn as nn

from config import Config, architecture_flags, build_parser
from main import main
from model import all_components, flag_owners, model_settings
from newsEncoders import NEWS_ENCODERS, NewsEncoder, word_embedding
from settings import ComponentView, Settings, SharedDims, at_least, component_settings, setting
from common import SMALL_MODEL, TINY_DEMO  # noqa: E402

DATA = Path(__file__).parent / "data"
SETTINGS_CLASSES = sorted({s for _, _, cls in all_components() for s in component_settings(cls)},
                          key=lambda s: s.__name__)


def _other_value(f, value):
    """A valid value different from the default, per field type (for round trips that would miss a dropped field)."""
    meta = f.metadata
    if meta.get("choices"):
        return next(c for c in meta["choices"] if c != value)
    if value is None:  # a default resolved later (--plm_frozen_layers): any valid number
        return 3
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 2  # odd stays odd
    if isinstance(value, float):
        return value / 2 if value else 0.05
    if isinstance(value, list):
        return [v + 1 for v in value]
    return value + "-x"


# Defaults changed on purpose since the snapshot, each with its reason.
CHANGED_DEFAULTS = {"plm_frozen_layers": "None: 10/12 of the loaded model's layers (issue 13: MiniLM has only 6)"}


def test_every_flag_of_the_previous_command_line_still_parses_with_its_default():
    """The flags and defaults main.py had before the settings classes (snapshot) are all still there."""
    now = {a.dest: a for a in build_parser()._actions}
    rows = [line.rstrip("\n").split("\t") for line in (DATA / "flags_before_settings.tsv").read_text().splitlines()]
    assert len(rows) > 90
    for options, dest, default in rows:
        assert dest in now, f"--{dest} disappeared from the command line"
        if dest not in CHANGED_DEFAULTS:
            assert repr(now[dest].default) == default, f"--{dest} default changed"
        for option in options.split():
            assert option in now[dest].option_strings


@pytest.mark.parametrize("settings_cls", SETTINGS_CLASSES, ids=lambda s: s.__name__)
def test_each_settings_class_round_trips_through_a_checkpoint(settings_cls):
    """Non-default values of every field survive model_settings -> torch.save/load -> Config.from_dict."""
    owner = next((kind, name, cls) for kind, name, cls in all_components() if settings_cls in component_settings(cls))
    kind, name, _ = owner
    changed = {f.name: _other_value(f, getattr(settings_cls(), f.name)) for f in fields(settings_cls)}
    role = {"news encoder": "news_encoder", "user encoder": "user_encoder", "click predictor": "click_predictor"}[kind]
    values = {**Config.from_dict({}).values, role: name, **changed}
    if name == "FIM" or name == "HDC":
        values.update(news_encoder="HDC", user_encoder="FIM", click_predictor="FIM")
    cfg = Config.from_dict(values)
    saved = model_settings(cfg)
    buffer = io.BytesIO()
    torch.save({"config": cfg.to_dict(), "model_settings": saved}, buffer)
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    part = {"news encoder": "news", "user encoder": "user", "click predictor": "click"}[kind]
    for flag, value in changed.items():
        assert ckpt["model_settings"][part][flag] == value
    rebuilt = Config.from_dict(ckpt["config"])
    assert model_settings(rebuilt) == saved
    assert settings_cls.from_values(rebuilt.values).to_dict() == changed


def test_a_flag_of_another_encoder_is_an_error_naming_its_owner(tmp_path):
    with pytest.raises(ValueError, match=r"--HDC_window_size is a setting of news encoder HDC.*drop it"):
        main(["--mode=train", "--news_encoder=MHSA", "--user_encoder=MHSA", "--HDC_window_size=5",
              f"--data_dir={tmp_path}", f"--output_dir={tmp_path / 'out'}"])
    with pytest.raises(ValueError, match=r"--num_interest_vectors is a setting of user encoder MINER"):
        main(["--mode=train", "--user_encoder=ATT", "--num_interest_vectors=4", f"--data_dir={tmp_path}"])
    assert not (tmp_path / "out").exists(), "refused before any run folder is made"


def test_flags_of_the_chosen_components_and_shared_dimensions_are_accepted():
    cfg = Config.from_args(["--news_encoder=HDC", "--user_encoder=FIM", "--HDC_window_size=5", "--attention_dim=8"])
    assert cfg.stray_flags(cfg.typed) == []
    cfg = Config.from_args(["--news_encoder=PLMNRMS", "--user_encoder=MINER", "--head_num=4", "--plm_lr=1e-4"])
    assert cfg.stray_flags(cfg.typed) == []


def test_config_file_values_are_not_stray_flags(tmp_path):
    """A saved config.json holds every flag; only what is typed on the command line is checked."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(Config.from_dict({}).values))
    cfg = Config.from_args([f"--config_file={path}"], file_values=json.loads(path.read_text()))
    assert "HDC_window_size" in cfg.explicit and cfg.stray_flags(cfg.typed) == []


def test_a_component_reads_only_its_own_settings_and_the_shared_dimensions():
    values = Config.from_dict({}).values
    view = ComponentView(NEWS_ENCODERS["MHSA"], values, flag_owners())
    assert view.head_num == values["head_num"] and view.word_embedding_dim == values["word_embedding_dim"]
    with pytest.raises(AttributeError, match=r"reads --HDC_window_size.*news encoder HDC"):
        view.HDC_window_size
    with pytest.raises(AttributeError, match=r"reads --batch_size.*run-level flag"):
        view.batch_size
    with pytest.raises(AttributeError, match=r"reads --plm_lr.*news encoders? PLMNAML"):
        view.plm_lr


def test_settings_checks_name_the_flag():
    with pytest.raises(ValueError, match=r"--HDC_window_size must be odd"):
        Config.from_args(["--news_encoder=HDC", "--user_encoder=FIM", "--HDC_window_size=2"])
    with pytest.raises(ValueError, match=r"--num_interest_vectors must be >= 1, got 0"):
        Config.from_args(["--user_encoder=MINER", "--num_interest_vectors=0"])
    with pytest.raises(ValueError, match=r"--dropout_rate must be in \[0, 1\), got 1.5"):
        Config.from_args(["--dropout_rate=1.5"])
    # An unused component's value is not checked (it builds nothing)...
    Config.from_args(["--news_encoder=MHSA", "--HDC_window_size=2"])


def test_architecture_flags_follow_from_the_settings_classes():
    mhsa = architecture_flags({"news_encoder": "MHSA", "user_encoder": "MHSA", "click_predictor": "dot_product"})
    assert {"head_num", "head_dim", "word_embedding_dim", "max_title_length", "news_encoder"} <= mhsa
    assert "HDC_window_size" not in mhsa and "dropout_rate" not in mhsa and "lr" not in mhsa
    plm = architecture_flags({"news_encoder": "PLMMiner", "user_encoder": "MINER", "click_predictor": "dot_product"})
    assert {"plm_model_name", "plm_pooling", "num_interest_vectors", "use_category_glove"} <= plm
    assert not {"plm_lr", "plm_cache", "plm_frozen_layers", "disagreement_beta"} & plm  # training knobs


def test_checkpoint_stores_the_model_settings_and_dev_refuses_a_contradicting_one(tmp_path):
    common = [f"--data_dir={tmp_path / 'data'}", f"--output_dir={tmp_path / 'out'}", *TINY_DEMO]
    result = main(["--mode=train", "--epoch=1", "--max_steps_per_epoch=2", "--no-plot", "--no-tensorboard",
                   *SMALL_MODEL, *common])
    ckpt = torch.load(result["checkpoint"], weights_only=True)
    assert ckpt["model_settings"]["news"] == {"category_fusion": False, "head_num": 4, "head_dim": 8}
    assert ckpt["model_settings"]["shared"]["attention_dim"] == 16
    with pytest.raises(ValueError, match=r"--head_dim=4 .*checkpoint: 8"):
        main(["--mode=dev", f"--dev_model_path={result['checkpoint']}", "--head_dim=4", *common])


def test_a_checkpoint_written_before_the_settings_classes_still_evaluates(tmp_path):
    """tests/data/checkpoint_before_settings: NRMS trained by the code before this change (1 epoch x 3 steps on the
    tiny demo, flags in its config.json); dev mode rebuilds it and reproduces the dev metrics it logged. Ties were
    then broken by candidate position (the official scorer's order): --tie_break=position reproduces that."""
    run = tmp_path / "run"
    shutil.copytree(DATA / "checkpoint_before_settings", run)
    logged = json.loads((run / "dev_log.jsonl").read_text().splitlines()[-1])
    report = main(["--mode=dev", f"--dev_model_path={run / 'MHSA-MHSA'}", f"--data_dir={tmp_path / 'data'}",
                   "--no-progress", "--tie_break=position"])
    for metric in ("auc", "mrr", "ndcg5", "ndcg10"):
        assert report["metrics"][metric] == pytest.approx(logged[metric], abs=1e-6), metric


# -- adding an encoder: the README's worked example, trained on the tiny demo --------------------------------------
@dataclass
class BagSettings(Settings):
    """Settings of the README's example encoder."""

    title: ClassVar[str] = "Bag (example)"
    bag_dim: int = setting(32, "Bag: news vector size", check=at_least(1))


class BagNewsEncoder(NewsEncoder):
    """Mean of the title's word vectors, projected: the README's 20-line example of a new encoder."""

    settings = (BagSettings,)

    def __init__(self, config, meta):
        super().__init__(config, meta)
        self.embedding = word_embedding(config, meta)
        self.project = nn.Linear(config.word_embedding_dim, config.bag_dim)
        self.output_dim = config.bag_dim

    def forward(self, news, user_id=None):
        """news["title"] [N, L] -> [N, bag_dim]"""
        tokens = news["title"]
        mask = (tokens > 0).unsqueeze(-1).float()  # [N, L, 1]
        mean = (self.embedding(tokens) * mask).sum(1) / mask.sum(1).clamp(min=1)  # [N, E]
        return torch.tanh(self.project(mean))


@pytest.fixture
def bag_registered():
    NEWS_ENCODERS.register("Bag")(BagNewsEncoder)
    try:
        yield
    finally:
        del NEWS_ENCODERS["Bag"]


def test_a_new_encoder_is_one_class_with_its_settings(tmp_path, bag_registered):
    assert "--bag_dim" in build_parser().format_help()
    common = [f"--data_dir={tmp_path / 'data'}", f"--output_dir={tmp_path / 'out'}", *TINY_DEMO]
    result = main(["--mode=train", "--news_encoder=Bag", "--user_encoder=ATT", "--bag_dim=24", "--epoch=1",
                   "--max_steps_per_epoch=3", "--no-plot", "--no-tensorboard", "--word_embedding_dim=50",
                   "--no-progress", *common])
    ckpt = torch.load(result["checkpoint"], weights_only=True)
    assert ckpt["model_settings"]["news"]["bag_dim"] == 24
    assert ckpt["model"]["news_encoder.project.weight"].shape == (24, 50)
    report = main(["--mode=dev", f"--dev_model_path={result['checkpoint']}", *common])
    assert 0 < report["metrics"]["auc"] < 1


class LengthBagNewsEncoder(BagNewsEncoder):
    """Bag plus work done once per corpus: `prepare` counts every news' title tokens, `cached_features` hands
    them to `forward`, which checks them (a wrong row or a missing merge fails the run)."""

    seen_batches = 0

    def __init__(self, config, meta):
        super().__init__(config, meta)
        self.register_buffer("title_lengths", None, persistent=False)

    def prepare(self, news, log=print, **options):
        if self.title_lengths is None:
            self.title_lengths = news.column("title").ne(0).sum(1).float()  # [N]

    def cached_features(self, index):
        return {} if self.title_lengths is None else {"title_length": self.title_lengths[index]}

    def forward(self, news, user_id=None):
        assert torch.equal(news["title_length"], news["title"].ne(0).sum(1).float())
        type(self).seen_batches += 1
        return super().forward(news, user_id)


def test_work_done_once_per_corpus_goes_through_the_encoder_hooks(tmp_path):
    """The model calls the encoder's `prepare` before training and evaluation and merges `cached_features` into
    its input, without knowing what is cached; the table is never saved."""
    NEWS_ENCODERS.register("LengthBag")(LengthBagNewsEncoder)
    try:
        common = [f"--data_dir={tmp_path / 'data'}", f"--output_dir={tmp_path / 'out'}", *TINY_DEMO]
        result = main(["--mode=train", "--news_encoder=LengthBag", "--user_encoder=ATT", "--epoch=1",
                       "--max_steps_per_epoch=2", "--no-plot", "--no-tensorboard", "--word_embedding_dim=50",
                       "--no-progress", *common])
        assert LengthBagNewsEncoder.seen_batches > 2  # training steps and the dev evaluation read the cached rows
        ckpt = torch.load(result["checkpoint"], weights_only=True)
        assert not any("title_lengths" in k for k in ckpt["model"])
        before = LengthBagNewsEncoder.seen_batches
        main(["--mode=dev", f"--dev_model_path={result['checkpoint']}", *common])
        assert LengthBagNewsEncoder.seen_batches > before
    finally:
        del NEWS_ENCODERS["LengthBag"]


# -- run-level flags: generated from settings classes, the command line unchanged ---------------------------------
def _run_level_flags() -> list[dict]:
    """Every run-level flag (not a component's, not a shared dimension) as --help and argparse see it, in order."""
    parser = build_parser()
    owned = set(flag_owners()) | set(SharedDims.names())
    group_of = {id(a): g for g in parser._action_groups for a in g._group_actions}
    return [{"options": a.option_strings, "dest": a.dest, "default": repr(a.default),
             "type": getattr(a.type, "__name__", repr(a.type)), "choices": None if a.choices is None else list(a.choices),
             "help": a.help, "nargs": a.nargs, "metavar": a.metavar, "action": type(a).__name__,
             "group": group_of[id(a)].title, "group_description": group_of[id(a)].description}
            for a in parser._actions if a.dest not in owned and a.dest != "help"]


# Encoders registered after the recording (issue 25), added to --news_encoder / --user_encoder's choices by design.
NEW_MODEL_CHOICES = {"news_encoder": ["Fastformer", "PLMFastformer", "TANR", "Vectors", "GLORY"],  # Vectors: issue 24
                     "user_encoder": ["Fastformer", "CAUM", "MINS", "PPRec", "GLORY"]}


def test_run_level_flags_keep_name_default_type_choices_help_and_group():
    """tests/data/run_flags_before_settings.json: the run-level flags as they were written by hand in config.py,
    before they became settings classes; each keeps its name, default, type, choices, help, group and order."""
    before = json.loads((DATA / "run_flags_before_settings.json").read_text())
    now = _run_level_flags()
    # Added since, after every earlier flag: --mode=pretrain's flags (issue 17; tests/test_pretraining.py), then the
    # beyond-accuracy flags (issue 23, below). The
    # changed flags: --mode, which gains the choice "pretrain" and its sentence in the help; --explain_output's
    # help (issue 22); --epoch, whose help names the per-dataset values that replace its default where it is not
    # typed (issue 22: every flag in config.DATASET_SUGGESTIONS says so, e.g. the demo's 4 frozen PLM layers). The
    # file stays as it was recorded.
    for record in before:
        if record["dest"] == "mode":
            record["choices"] = [*record["choices"], "pretrain"]
            record["help"] = record["help"].replace(
                ", or compare: paired significance tests between runs (--runs)",
                ", compare: paired significance tests between runs (--runs), or pretrain: self-supervised pretraining "
                "of the encoders on click sequences (docs/pretraining.md)")
            # Issue 26 (tests/test_tune.py): --mode gains "tune" and its sentence; its flags are added at the end.
            record["choices"] = [*record["choices"], "tune"]
            record["help"] = record["help"].replace(
                " (docs/pretraining.md)", " (docs/pretraining.md), or tune: a hyper-parameter search over training "
                "runs (--tune_space; docs/training.md, Tuning)")
        # Issue 24 (datasets beyond MIND, tests/test_ebnerd.py): --dataset gains the registry's new names and a
        # sentence of help; --news_language (xMIND) is added right after it, in the data group.
        if record["dest"] == "dataset":
            from news_data import dataset_names

            record["choices"] = dataset_names()
            assert record["choices"][:4] == ["demo", "small", "200k", "large"]
            record["help"] += ("; EB-NeRD, xMIND, Adressa (docs/data.md; prepare_MIND_dataset.py --dataset=... gets "
                               "them)")
        if record["dest"] == "explain_output":  # issue 22: the formats, the added .png, and never replacing a file
            record["help"] = ("--mode=explain: picture path, .png/.pdf/.svg (none: .png is added), its numbers beside "
                              "as .json; never replaces another file (default <checkpoint "
                              "folder>/explain/impression-<ID>.png)")
        if record["dest"] == "epoch":
            record["help"] += " (set per --dataset where not typed: demo 4, large 8)"
        # Designed additions since (issue 25, the models since NNR): the registries gain these names, so the
        # generated choices do; nothing else of either flag changes.
        if record["dest"] in NEW_MODEL_CHOICES:
            record["choices"] = sorted([*record["choices"], *NEW_MODEL_CHOICES[record["dest"]]])
    from config import PretrainRunSettings, TrackerSettings, TuneSettings
    from pretraining import task_settings_classes

    # ... and the beyond-accuracy metrics' and re-ranking's flags (issue 23; tests/test_beyond_accuracy.py).
    from beyond_accuracy import BeyondSettings

    added = [*PretrainRunSettings.names(), *(n for cls in task_settings_classes() for n in cls.names()),
             *BeyondSettings.names(), *TuneSettings.names(), *TrackerSettings.names()]
    at = [r["dest"] for r in before].index("dataset") + 1
    assert now[at]["dest"] == "news_language" and now[at]["group"] == now[at - 1]["group"] and now[at]["default"] == "None"
    now = now[:at] + now[at + 1:]
    assert [r["dest"] for r in now] == [r["dest"] for r in before] + added
    for old, new in zip(before, now):
        assert new == old, f"--{old['dest']} changed"



def test_run_level_flags_come_from_settings_classes():
    """Every run-level flag is a field of one of config.RUN_SETTINGS (one home: the parser is generated)."""
    from config import RUN_SETTINGS

    fields_of = [name for cls in RUN_SETTINGS for name in cls.names()]
    assert len(fields_of) == len(set(fields_of)), "a flag declared twice"
    assert sorted(fields_of) == sorted(r["dest"] for r in _run_level_flags())
