"""Issue 6's speed-ups change no output: the frozen-layer cache and dynamic padding, on the whole model (PLMNRMS-MHSA
and PLMMiner-MINER with the real offline MiniLM). Encoder-level padding invariance and the tiny-BERT cache checks are
in test_plm_miner.py; these add the model's own paths: training forward and gradients, `forward` logits and the
evaluation path (`encode_all_news` + `score_cached`). No timings here: bench/plm.py and bench/eval.py measure them.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import plm_backbones

from dataset import Batch
from model import Model
from newsEncoders import OFFLINE_MINILM, resolve_plm_path
from test_plm_miner import META, make_config, tokens

from common import model_device, needs_minilm

DEVICE = model_device()  # $MIND_TEST_DEVICE (cpu by default): bench/gpu.py runs this module on the GPU
pytestmark = needs_minilm  # every test here runs the real offline MiniLM

MAX_LENGTH = 32
# 9 news (index 0 = the padding news, an empty title); the longest real title is far below MAX_LENGTH, so trimming
# has work to remove, and the lengths differ so a wrong mask would show.
TITLES = ["", "stock market falls", "team wins the game after a long and difficult season of losses",
          "storm hits the coast", "new recipe for dinner", "the game", "market", "a storm is coming to the town",
          "dinner"]
PAIRS = [("PLMNRMS", "MHSA"), ("PLMMiner", "MINER")]


def build(news_encoder: str, user_encoder: str, cls: type[Model] = Model, **flags) -> Model:
    cfg = make_config(OFFLINE_MINILM, news_encoder=news_encoder, user_encoder=user_encoder, plm_frozen_layers=4,
                      plm_max_length=MAX_LENGTH, **flags)
    ids, mask = tokens(resolve_plm_path(OFFLINE_MINILM), TITLES, MAX_LENGTH)
    table = {"plm_ids": ids.numpy().astype(np.int32), "plm_mask": mask.numpy().astype(np.int8),
             "category": np.array([0, 1, 2, 3, 4, 2, 1, 3, 4], dtype=np.int64)}
    torch.manual_seed(0)  # the same heads (pooling, MHSA, MINER) in every model built here
    return cls(cfg, META, table).to(DEVICE)


def batch() -> Batch:
    return _batch().to(DEVICE)


def _batch() -> Batch:
    return Batch(user=torch.tensor([1, 2, 3]),
                 history=torch.tensor([[1, 2, 0, 0], [3, 4, 5, 6], [0, 0, 0, 0]]),
                 history_mask=torch.tensor([[True, True, False, False], [True, True, True, True], [False] * 4]),
                 candidates=torch.tensor([[7, 8, 2], [1, 5, 0], [4, 3, 6]]),
                 candidate_mask=torch.tensor([[True, True, True], [True, True, False], [True, True, True]]),
                 target=torch.tensor([0, 1, 2]))


class FullPaddingModel(Model):
    """Dynamic padding off: the PLM columns padded back to --plm_max_length after `Model.news_features` trims them
    (what the model would compute without trimming: the removed columns are padding, id 0 and mask 0)."""

    def news_features(self, index):
        out = super().news_features(index)
        pad = {2: lambda t: (0, MAX_LENGTH - t.shape[1]), 3: lambda t: (0, 0, 0, MAX_LENGTH - t.shape[1])}
        return {k: F.pad(t, pad[t.dim()](t)) if k.startswith("plm") else t for k, t in out.items()}


def eval_outputs(model: Model) -> tuple[torch.Tensor, torch.Tensor]:
    """(forward logits, evaluation-path logits) in eval mode, on the same batch."""
    model.eval()
    b = batch()
    with torch.no_grad():
        logits = model(b).logits
        table = model.encode_all_news(torch.arange(model.news_num, device=DEVICE))
        cached = model.score_cached(b, table)
    return logits, cached


def train_loss_and_grads(model: Model) -> tuple[float, dict[str, torch.Tensor]]:
    """Training forward + backward with dropout off (model dropout 0 in make_config, the PLM's own in eval mode)."""
    model.train()
    model.news_encoder.plm.eval()
    model.zero_grad()
    loss = model(batch()).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float, what: str, floor: float = 0.0) -> None:
    """Close to rtol x b's largest entry (or `floor`, if larger); -inf (padded candidates) in the same places."""
    finite = torch.isfinite(b)
    assert torch.equal(finite, torch.isfinite(a)), f"{what}: padded candidates differ"
    atol = max(rtol * float(b[finite].abs().max()), floor, 1e-12)
    torch.testing.assert_close(a[finite], b[finite], rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}\n{m}")


def assert_grads_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float, what: str) -> None:
    """Every gradient close relative to its own scale, with an absolute floor of 1e-6 x the largest gradient:
    attention key biases get an exactly zero gradient in exact arithmetic (softmax is shift-invariant), so theirs
    is ~1e-8 of rounding noise on both sides, which a purely relative comparison would reject."""
    assert a.keys() == b.keys() and any(n.startswith("news_encoder.plm.") for n in b)
    floor = 1e-6 * max(float(g.abs().max()) for g in b.values())
    for name, g in b.items():
        assert_close(a[name], g, rtol, f"gradient of {name}: {what}", floor=floor)


@pytest.mark.parametrize("news_encoder,user_encoder", PAIRS)
def test_frozen_layer_cache_gives_the_uncached_outputs(news_encoder, user_encoder):
    """Cache on vs --no-plm_cache, same weights: forward logits, evaluation-path logits, training loss and the top
    layers' gradients agree (the cache is fp16: 1e-2 relative), and the cached model never runs the frozen layers."""
    cached = build(news_encoder, user_encoder)
    uncached = build(news_encoder, user_encoder, plm_cache=False)
    for a, b in zip(cached.state_dict().values(), uncached.state_dict().values()):
        assert torch.equal(a, b)
    cached.prepare(log=lambda *a: None)
    uncached.prepare(log=lambda *a: None)
    assert cached.news_encoder.frozen_table is not None and uncached.news_encoder.frozen_table is None

    enc = cached.news_encoder
    calls = []
    hooks = [layer.register_forward_hook(lambda *a: calls.append(1)) for layer in enc._all_layers[: enc.frozen_layers]]
    try:
        cached_out = eval_outputs(cached)
        cached_loss, cached_grads = train_loss_and_grads(cached)
    finally:
        for h in hooks:
            h.remove()
    assert not calls, "the cached model ran its frozen layers"

    for a, b, what in zip(cached_out, eval_outputs(uncached), ("forward logits", "evaluation-path logits")):
        assert_close(a, b, 1e-2, f"{news_encoder}-{user_encoder} {what}: cache vs no cache")
    loss, grads = train_loss_and_grads(uncached)
    assert cached_loss == pytest.approx(loss, rel=1e-3)
    assert_grads_close(cached_grads, grads, 5e-2, "cache vs no cache")


@pytest.mark.parametrize("cache", [False, True], ids=["no-cache", "cache"])
@pytest.mark.parametrize("news_encoder,user_encoder", PAIRS)
def test_dynamic_padding_trims_to_the_longest_title_and_changes_no_output(news_encoder, user_encoder, cache):
    """`Model.news_features` cuts the PLM columns to the longest title among the news asked for; the outputs
    (forward, evaluation path, training loss and gradients) equal those computed at --plm_max_length, and so does the
    frozen-layer cache, which is built chunk by chunk at each chunk's longest title."""
    trimmed = build(news_encoder, user_encoder, plm_cache=cache)
    padded = build(news_encoder, user_encoder, cls=FullPaddingModel, plm_cache=cache)
    trimmed.prepare(log=lambda *a: None)
    padded.prepare(chunk=2, log=lambda *a: None)  # other chunks, other trim widths: the same cache

    lengths = trimmed.news_plm_mask.ne(0).sum(1)
    some = torch.tensor([1, 3, 5, 6], device=DEVICE)
    feats = trimmed.news_features(some)
    assert feats["plm_ids"].shape[1] == int(lengths[some].max()) < MAX_LENGTH
    assert padded.news_features(some)["plm_ids"].shape[1] == MAX_LENGTH
    if cache:
        assert feats["plm_hidden"].shape[1] == feats["plm_ids"].shape[1]
        real = trimmed.news_plm_mask.bool()
        enc = trimmed.news_encoder
        full = enc.frozen_bottom(trimmed.news_plm_ids.long(), trimmed.news_plm_mask.long())  # [N, 32, Hp], untrimmed
        for built in (trimmed, padded):
            torch.testing.assert_close(built.news_encoder.frozen_table[real].float(), full[real], rtol=1e-2, atol=1e-2)

    # fp32 without the cache: padding is masked exactly up to float rounding; with the cache both read fp16 states.
    rtol = 1e-2 if cache else 1e-4
    for a, b, what in zip(eval_outputs(trimmed), eval_outputs(padded), ("forward logits", "evaluation-path logits")):
        assert_close(a, b, rtol, f"{news_encoder}-{user_encoder} {what}: trimmed vs padded to {MAX_LENGTH}")
    loss_t, grads_t = train_loss_and_grads(trimmed)
    loss_p, grads_p = train_loss_and_grads(padded)
    assert loss_t == pytest.approx(loss_p, rel=rtol)
    assert_grads_close(grads_t, grads_p, 5 * rtol, "trimmed vs padded")


@pytest.mark.parametrize("news_encoder,user_encoder", PAIRS)
def test_length_buckets_change_no_output_and_cut_each_chunk_to_its_own_longest_title(news_encoder, user_encoder):
    """PLM encoders encode a batch's unique news in `length_buckets` chunks of similar title length
    (`Model._gather_news`): loss, gradients and logits equal one chunk cut to the batch's longest title, and the
    chunks really are cut shorter."""
    bucketed = build(news_encoder, user_encoder, plm_cache=False)
    single = build(news_encoder, user_encoder, plm_cache=False)
    assert bucketed.news_encoder.length_buckets == 4
    single.news_encoder.length_buckets = 1
    widths = []
    original = Model.news_features

    def spy(self, index):
        out = original(self, index)
        if self is bucketed:
            widths.append((len(index), out["plm_ids"].shape[1]))
        return out

    Model.news_features = spy
    try:
        loss_b, grads_b = train_loss_and_grads(bucketed)
    finally:
        Model.news_features = original
    loss_s, grads_s = train_loss_and_grads(single)
    assert loss_b == pytest.approx(loss_s, rel=1e-5)
    assert_grads_close(grads_b, grads_s, 1e-3, "4 length buckets vs 1")
    # the batch's 9 unique news (index 0 included) in 4 chunks, shortest titles first, each cut to its own longest
    lengths = bucketed.news_plm_mask.ne(0).sum(1)
    ordered = sorted(lengths.tolist())
    expected = [(len(c), max(1, max(c))) for c in np.array_split(ordered, 4)]
    assert widths == expected and widths[0][1] < widths[-1][1] == int(lengths.max())
    for a, b in zip(eval_outputs(bucketed), eval_outputs(single)):
        assert_close(a, b, 1e-5, "4 length buckets vs 1")


def test_frozen_layer_cache_in_host_memory_gives_the_same_outputs():
    """A table too large for the GPU stays in host memory (rows copied per batch): same features and outputs as the
    on-device table. Forced with host=True here (in pinned memory when the model is on a GPU); `plm_backbones.cache_device`
    decides otherwise."""
    on_device = build("PLMNRMS", "MHSA")
    on_host = build("PLMNRMS", "MHSA")
    on_device.prepare(log=lambda *a: None)
    on_host.prepare(log=lambda *a: None, host=True)
    assert on_device.news_encoder.frozen_table is not None and on_device.news_encoder.frozen_table_host is None
    assert on_host.news_encoder.frozen_table is None and on_host.news_encoder.frozen_table_host is not None
    assert on_host.news_encoder.has_frozen_cache
    buffers = dict(on_host.named_buffers())
    assert "news_encoder.frozen_table_host" not in buffers  # .to(device) leaves it where it is
    assert "news_encoder.frozen_table" not in on_host.state_dict()  # rebuilt from the corpus, never saved
    assert on_device.news_encoder.frozen_table.device == on_device.news_plm_ids.device
    assert on_host.news_encoder.frozen_table_host.device.type == "cpu"
    if DEVICE.type == "cuda":  # asynchronous per-batch copies need page-locked memory
        assert on_host.news_encoder.frozen_table_host.is_pinned()
    some = torch.tensor([5, 1, 3], device=DEVICE)
    assert torch.equal(on_host.news_features(some)["plm_hidden"], on_device.news_features(some)["plm_hidden"])
    for a, b in zip(eval_outputs(on_host), eval_outputs(on_device)):
        assert_close(a, b, 1e-6, "host vs device cache")
    assert plm_backbones.cache_device((10, 4, 8), torch.device("cpu")) == torch.device("cpu")
