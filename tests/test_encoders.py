"""Every registered news and user encoder: shapes, padding invariance, batch independence, gradients, empty
inputs; the shared attention blocks; registry errors.

Legend: N news, L title tokens, La abstract tokens, B users, H history, C candidates, D news dim.

The encoder lists are read from the registries at collection time, so an encoder registered later is tested
here without editing this file. Padding invariance and batch independence are what catch real attention bugs
(an unmasked softmax, a `batch_first` mix-up); shape checks alone never do.
"""
from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import layers
from config import Config, build_parser
from MIND_corpus import CorpusMeta
from newsEncoders import NEWS_ENCODERS, get_news_encoder, register_news_encoder
from userEncoders import USER_ENCODERS, UserInputs, UserOutput, get_user_encoder, register_user_encoder

from common import model_device  # noqa: E402

META = CorpusMeta(vocab_size=50, category_num=6, subcategory_num=9, user_num=11, entity_num=7, news_num=30,
                  news_ids=[""] + [f"N{i}" for i in range(1, 30)])
VECTOR_WIDTH = 6  # --news_encoder=Vectors: the width of the vector file's vectors
FLAGS = {
    "word_embedding_dim": 16, "head_num": 2, "head_dim": 8, "attention_dim": 8, "cnn_kernel_num": 16,
    "category_embedding_dim": 8, "subcategory_embedding_dim": 8, "dropout_rate": 0, "num_interest_vectors": 4,
    "context_code_dim": 8, "plm_frozen_layers": 1,
    "hidden_dim": 6, "user_embedding_dim": 5, "personalized_embedding_dim": 7, "HDC_filter_num": 5,
    "entity_embedding_dim": 9, "KCNN_window_sizes": "1,2,3", "KCNN_filter_num": 4,
    "gcn_layer_num": 2, "OMAP_head_num": 2, "conv3D_filter_num_first": 3, "conv3D_kernel_size_first": 2,
    "conv3D_filter_num_second": 2, "conv3D_kernel_size_second": 1, "maxpooling3D_size": 2, "maxpooling3D_stride": 1,
}
NEWS_NAMES = sorted(NEWS_ENCODERS)
USER_NAMES = sorted(USER_ENCODERS)
D = 12  # stub news dim for user encoders: != head_num * head_dim, so MHSA's projection is exercised too
ATOL = 1e-5
# The encoder tests run on $MIND_TEST_DEVICE (cpu by default; bench/gpu.py runs them on the GPU): encoders and their
# inputs are moved there, inputs are drawn on the CPU first (the same numbers on every device). The shared-layer
# tests at the end stay on the CPU.
DEVICE = model_device()

# Tiny random BERT for the PLM encoders: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, words 4.. (BERT's conventions).
PLM_VOCAB, CLS, SEP = 30, 2, 3


@pytest.fixture(scope="module")
def tiny_plm(tmp_path_factory):
    """Folder of a 2-layer, 32-d random BERT, built on first use (only PLM encoders ask for it)."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-plm")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=PLM_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vector_file(tmp_path_factory):
    """A news-vector file for --news_encoder=Vectors: vectors for 20 of META's 29 news."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path_factory.mktemp("vectors") / "vectors.parquet"
    values = torch.randn(20, VECTOR_WIDTH, generator=torch.Generator().manual_seed(0)).tolist()
    pq.write_table(pa.table({"news_id": META.news_ids[1:21], "v": pa.array(values, pa.list_(pa.float32()))}), path)
    return path


def make_config(request, name: str | None = None, **flags) -> Config:
    """Small config; every flag typed, so no --dataset suggestion changes it."""
    values = {**FLAGS, **flags}
    if name is not None and getattr(NEWS_ENCODERS.get(name), "uses_plm", False):
        values.setdefault("plm_model_name", str(request.getfixturevalue("tiny_plm")))
    if name == "Vectors":
        values.setdefault("news_vectors", str(request.getfixturevalue("vector_file")))
    return Config.from_args([f"--{k}={v}" for k, v in values.items()])


def build_news_encoder(request, name: str, **flags):
    torch.manual_seed(0)
    enc = NEWS_ENCODERS[name](make_config(request, name, **flags), META).to(DEVICE)
    if hasattr(enc, "attach_graph"):  # GLORY: a click graph over META's news, as Model.prepare attaches the corpus'
        table, titles = click_graph_table(enc.k)
        enc.attach_graph(table.to(DEVICE), titles.to(DEVICE))
    return enc


def click_graph_table(k: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A random click graph over META's news ([N, 1 + k]: own index, then k in-neighbours, some 0 = none; news 0 has
    none) and their titles [N, 12] (the padding news empty), for the encoders that read one (GLORY)."""
    gen = torch.Generator().manual_seed(seed)
    n = META.news_num
    neighbours = torch.randint(1, n, (n, k), generator=gen)
    neighbours = neighbours.masked_fill(torch.rand(n, k, generator=gen) < 0.3, 0)
    neighbours[0] = 0
    titles = token_rows([0] + torch.randint(1, 12, (n - 1,), generator=gen).tolist(), 12, META.vocab_size, gen)
    return torch.cat([torch.arange(n)[:, None], neighbours], 1), titles


def build_user_encoder(request, name: str, **flags):
    """User encoders get a stub news encoder: they may read only `output_dim` (and `category_embedding`)."""
    torch.manual_seed(0)
    # The HDC layout (read only by FIM): Lh*E + levels*Lh*F = 4*1 + 2*4*1 = D.
    stub = SimpleNamespace(output_dim=D, category_embedding=None, user_embedding=None, hdc_length=4, hdc_embedding_dim=1, hdc_levels=2,
                           hdc_filters=1)
    return USER_ENCODERS[name](make_config(request, **flags), META, stub).to(DEVICE)


# ------------------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------------------

def token_rows(lengths: list[int], width: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """[N, width] ids: row i has lengths[i] real ids in [1, vocab) (1 = unknown), then 0 (padding)."""
    out = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        out[i, :n] = torch.randint(1, vocab, (n,), generator=gen)
    return out


def make_news(cls, lengths: list[int], width: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """News features for every column in `cls.features`. A row with length 0 is the padding news (all ids 0;
    for a PLM, [CLS] [SEP] as the corpus tokenizes an empty title). Abstracts are 1.5x longer than titles."""
    gen = torch.Generator().manual_seed(seed)
    n = len(lengths)
    empty = torch.tensor([k == 0 for k in lengths])
    plm = None
    news = {}
    for feature in (*cls.features, *getattr(cls, "cached_inputs", ())):
        if feature == "news_vector":  # Vectors: a float vector per news (zeros for the padding news)
            news[feature] = torch.randn(n, VECTOR_WIDTH, generator=gen).masked_fill(empty[:, None], 0)
        elif feature == "news_vector_missing":  # 1 for a one-token news: some news have no vector
            news[feature] = torch.tensor([float(k == 1) for k in lengths])
        elif feature == "title":
            news[feature] = token_rows(lengths, width, META.vocab_size, gen)
        elif feature == "abstract":
            news[feature] = token_rows([k + k // 2 for k in lengths], width + width // 2, META.vocab_size, gen)
        elif feature == "title_entity":  # entity ids on some title tokens (0 = none), aligned to `title`
            title = news.get("title", token_rows(lengths, width, META.vocab_size, gen))
            entity = torch.randint(0, META.entity_num, title.shape, generator=gen)
            news[feature] = entity.masked_fill(title == 0, 0)
        elif feature == "click_graph":  # the gathered rows of the click graph: column 0 names the news (GLORY)
            own = torch.arange(1, n + 1).masked_fill(empty, 0)  # the padding news is news 0
            news[feature] = torch.cat([own[:, None], torch.zeros(n, 1, dtype=torch.long)], 1)
        elif feature in ("category", "subcategory"):
            size = META.category_num if feature == "category" else META.subcategory_num
            news[feature] = torch.randint(1, size, (n,), generator=gen).masked_fill(empty, 0)
        elif feature in ("plm_ids", "plm_mask"):
            if plm is None:  # [CLS] words [SEP] pad..., within `width` slots
                words = token_rows([min(k, width - 2) for k in lengths], width - 1, PLM_VOCAB - 4, gen)
                ids = torch.cat([torch.full((n, 1), CLS), (words + 3).masked_fill(words == 0, 0)], 1)
                ends = (ids > 0).sum(1)
                ids[torch.arange(n), ends] = SEP
                plm = {"plm_ids": ids, "plm_mask": (ids > 0).long()}
            news[feature] = plm[feature]
        else:
            pytest.fail(f"tests/test_encoders.py: make_news does not know news feature {feature!r}; teach it")
    return {k: v.to(DEVICE) for k, v in news.items()}


def pad_news(news: dict[str, torch.Tensor], extra: int) -> dict[str, torch.Tensor]:
    """The same news with `extra` more padding slots on the right of every token column."""
    return {k: torch.cat([v, torch.zeros(v.shape[0], extra, dtype=v.dtype, device=v.device)], 1)
            if v.dim() == 2 and not v.is_floating_point() else v for k, v in news.items()}  # floats: vectors, no tokens


def rows(news: dict[str, torch.Tensor], index) -> dict[str, torch.Tensor]:
    return {k: v[index] for k, v in news.items()}


def encode(enc, news: dict[str, torch.Tensor], user_id: torch.Tensor) -> torch.Tensor:
    return enc(news, user_id=user_id.to(DEVICE) if enc.personalized else None)


MAX_ITEMS = 16  # widest history / candidate list a test builds


def user_inputs(lengths: list[int], h: int, c_lengths: list[int], c: int, seed: int = 0,
                garbage: float = 0.0) -> UserInputs:
    """B = len(lengths) users with left-aligned histories (user i: lengths[i] real items, then padding up to
    h) and c_lengths[i] real candidates of c. The real items depend only on `seed`, never on h or c (they are
    cut from one wide draw). Padded slots hold zero vectors and category 0, as the padding news does, or with
    `garbage` > 0, garbage * N(0, 1) vectors and random categories: a masked encoder must not see either."""
    gen = torch.Generator().manual_seed(seed)
    b = len(lengths)
    wide = {key: (torch.randn(b, MAX_ITEMS, D, generator=gen),
                  torch.randint(1, META.category_num, (b, MAX_ITEMS), generator=gen)) for key in ("h", "c")}
    noise = torch.Generator().manual_seed(seed + 1)

    def items(key, counts, width):
        vectors, category = wide[key][0][:, :width], wide[key][1][:, :width]
        mask = torch.arange(width)[None, :] < torch.tensor(counts)[:, None]  # [B, width] True = real
        junk = torch.randn(vectors.shape, generator=noise) * garbage
        junk_category = torch.randint(1, META.category_num, category.shape, generator=noise) if garbage else 0
        return torch.where(mask[..., None], vectors, junk), mask, torch.where(mask, category, junk_category)

    history, history_mask, history_category = items("h", lengths, h)
    candidates, candidate_mask, candidate_category = items("c", c_lengths, c)
    # Time-aware popularity (PP-Rec's inputs), drawn from their own generator so the draws above stay as they were;
    # ages beyond PP-Rec's 1,500 age buckets too. Padded slots: 0, or garbage.
    pop = torch.Generator().manual_seed(seed + 2)
    ctr = {key: torch.rand(b, MAX_ITEMS, generator=pop) for key in ("h", "c")}
    age = torch.randint(0, 3000, (b, MAX_ITEMS), generator=pop)

    def padded(values, mask, width):
        junk = (torch.rand(values[:, :width].shape, generator=noise) * garbage).to(values.dtype)
        return torch.where(mask, values[:, :width], junk)

    inputs = dict(history=history, history_mask=history_mask, user_id=torch.arange(1, b + 1) % META.user_num,
                  history_category=history_category, candidates=candidates, candidate_mask=candidate_mask,
                  candidate_category=candidate_category, history_ctr=padded(ctr["h"], history_mask, h),
                  candidate_ctr=padded(ctr["c"], candidate_mask, c), candidate_age=padded(age, candidate_mask, c))
    return UserInputs(**{k: v.to(DEVICE) for k, v in inputs.items()})


def user_rows(inp: UserInputs, index) -> UserInputs:
    return UserInputs(**{k: (None if v is None else v[index]) for k, v in vars(inp).items()})


def scores(enc, out: UserOutput, inp: UserInputs) -> torch.Tensor:
    """What the model ranks by: the encoder's logits, else user . candidate -> [B, C] (the encoder's own candidate
    vectors where it returns them, GLORY)."""
    if out.logits is not None:
        return out.logits
    candidates = inp.candidates if out.candidates is None else out.candidates
    if out.user.dim() == 3:
        return (out.user * candidates).sum(-1)
    return torch.bmm(candidates, out.user.unsqueeze(-1)).squeeze(-1)


def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-5, msg=lambda m: f"{what}\n{m}")


# ------------------------------------------------------------------------------------------------------------
# News encoders
# ------------------------------------------------------------------------------------------------------------

LENGTHS = [12, 5, 1, 0, 8]  # a full row (CNN windows reach past the end), short rows, the padding news
NEWS_USERS = torch.tensor([1, 2, 3, 4, 5])


@pytest.mark.parametrize("name", NEWS_NAMES)
def test_news_encoder_shape_and_finite(request, name):
    enc = build_news_encoder(request, name).eval()
    out = encode(enc, make_news(type(enc), LENGTHS), NEWS_USERS)
    assert isinstance(enc.output_dim, int) and enc.output_dim > 0
    assert out.shape == (len(LENGTHS), enc.output_dim) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NEWS_NAMES)
def test_news_encoder_ignores_extra_padding(request, name):
    """A news right-padded from 12 to 20 slots encodes to the same vector (the model trims token columns to the
    batch's longest title, so this is what makes trimming safe)."""
    enc = build_news_encoder(request, name).eval()
    news = make_news(type(enc), LENGTHS, width=12)
    with torch.no_grad():
        short = encode(enc, news, NEWS_USERS)
        longer = encode(enc, pad_news(news, 8), NEWS_USERS)
    close(longer, short, f"{name}: extra padding changed the news vectors")


@pytest.mark.parametrize("name", NEWS_NAMES)
def test_news_encoder_batch_independence(request, name):
    enc = build_news_encoder(request, name).eval()
    news = make_news(type(enc), LENGTHS)
    with torch.no_grad():
        batch = encode(enc, news, NEWS_USERS)
        for i in range(len(LENGTHS)):
            alone = encode(enc, rows(news, slice(i, i + 1)), NEWS_USERS[i:i + 1])
            close(alone, batch[i:i + 1], f"{name}: news {i} differs alone and in a batch")
        # Reordering the batch reorders the output and nothing else.
        perm = torch.tensor([3, 0, 4, 2, 1])
        close(encode(enc, rows(news, perm), NEWS_USERS[perm]), batch[perm], f"{name}: permuted batch")


def exempt_from_gradient(enc) -> set[int]:
    """Parameters that correctly get no (or an exactly zero) gradient from this encoder's own output:
    - a softmax attention's key bias: it adds q . b_k to every score of a query, which softmax cancels;
    - a category embedding the encoder only exposes for a user encoder (MINER) without reading categories."""
    out = set()
    for module in enc.modules():
        if isinstance(module, layers.MultiHeadSelfAttention):
            out.add(id(module.k.bias))
    shared = getattr(enc, "category_embedding", None)
    if shared is not None and "category" not in getattr(enc, "features", ("category",)):
        out.update(id(p) for p in shared.parameters())
    return out


def assert_every_parameter_learns(enc, what: str) -> None:
    exempt = exempt_from_gradient(enc)
    trainable = [(n, p) for n, p in enc.named_parameters() if p.requires_grad]
    assert trainable, f"{what}: no trainable parameters"
    missing = [n for n, p in trainable if id(p) not in exempt and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, f"{what}: no gradient reaches {missing}"
    bad = [n for n, p in trainable if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"{what}: non-finite gradient in {bad}"


@pytest.mark.parametrize("name", NEWS_NAMES)
def test_news_encoder_gradients_reach_every_trainable_parameter(request, name):
    """Train mode, sum of the outputs plus the auxiliary losses, through the training entry point
    (`forward_with_aux`: DAE's decoder learns only from its reconstruction loss); the padding news is in the
    batch, so its path must give finite grads."""
    enc = build_news_encoder(request, name).train()
    users = NEWS_USERS.to(DEVICE) if enc.personalized else None
    vectors, aux = enc.forward_with_aux(make_news(type(enc), LENGTHS), user_id=users)
    (vectors.sum() + sum(aux.values())).backward()
    assert_every_parameter_learns(enc, name)


@pytest.mark.parametrize("name", NEWS_NAMES)
def test_news_encoder_all_padding_is_finite(request, name):
    """News with no tokens (the padding news, encoded for every padded history slot) give finite vectors, alone
    and in a batch; a NaN there would poison the user vector even at zero attention weight (0 * NaN = NaN)."""
    enc = build_news_encoder(request, name).eval()
    with torch.no_grad():
        only_padding = encode(enc, make_news(type(enc), [0, 0]), NEWS_USERS[:2])
        mixed = encode(enc, make_news(type(enc), [0, 4]), NEWS_USERS[:2])
    assert torch.isfinite(only_padding).all() and torch.isfinite(mixed).all()
    close(mixed[:1], only_padding[:1], f"{name}: the padding news depends on its batch")


# ------------------------------------------------------------------------------------------------------------
# User encoders
# ------------------------------------------------------------------------------------------------------------

H_LENGTHS = [5, 2, 0, 3]  # one user with an empty history
C_LENGTHS = [3, 2, 3, 1]


def check_user_output(enc, out: UserOutput, b: int, c: int) -> None:
    assert isinstance(out, UserOutput)
    assert out.user is not None or out.logits is not None, "a user encoder returns user vectors or logits"
    # The user vector has the news size, unless the encoder re-encodes the candidates (GLORY: its own size).
    d = D if out.candidates is None else enc.output_dim
    if out.user is not None:
        expected = (b, c, d) if enc.candidate_aware else (b, d)
        assert out.user.shape == expected, f"user {tuple(out.user.shape)}, expected {expected}"
        assert torch.isfinite(out.user).all()
    if out.candidates is not None:
        assert out.candidates.shape == (b, c, d) and torch.isfinite(out.candidates).all()
    if out.logits is not None:
        assert enc.candidate_aware, "only candidate-aware encoders can score candidates themselves"
        assert out.logits.shape == (b, c) and torch.isfinite(out.logits).all()
    assert enc.output_dim == d


@pytest.mark.parametrize("name", USER_NAMES)
def test_user_encoder_shape_and_finite(request, name):
    enc = build_user_encoder(request, name).eval()
    inp = user_inputs(H_LENGTHS, 6, C_LENGTHS, 4)
    check_user_output(enc, enc(inp), 4, 4)


def comparable(enc, out: UserOutput, inp: UserInputs, c_lengths) -> list[torch.Tensor]:
    """Per user, what must not move: the user vector, or (candidate-aware) the real candidates' outputs."""
    if not enc.candidate_aware:
        return [out.user[i] for i in range(len(c_lengths))]
    s = scores(enc, out, inp)
    parts = []
    for i, k in enumerate(c_lengths):
        parts.append(s[i, :k])
        if out.user is not None:
            parts.append(out.user[i, :k])
    return parts


@pytest.mark.parametrize("garbage", [0.0, 1e3])
@pytest.mark.parametrize("name", USER_NAMES)
def test_user_encoder_ignores_padded_history_and_candidates(request, name, garbage):
    """More padded history slots (and padded candidates) filled with large random vectors and random categories
    change nothing for the real items, including the user with an empty history."""
    enc = build_user_encoder(request, name).eval()
    with torch.no_grad():
        ref_inp = user_inputs(H_LENGTHS, 5, C_LENGTHS, 3)
        ref = comparable(enc, enc(ref_inp), ref_inp, C_LENGTHS)
        for h, c in [(5, 3), (9, 3), (5, 7), (12, 8)]:
            inp = user_inputs(H_LENGTHS, h, C_LENGTHS, c, garbage=garbage)
            got = comparable(enc, enc(inp), inp, C_LENGTHS)
            for a, b in zip(got, ref):
                close(a, b, f"{name}: padding (H={h}, C={c}, garbage={garbage}) changed the output")


@pytest.mark.parametrize("name", USER_NAMES)
def test_user_encoder_that_is_not_candidate_aware_ignores_candidates(request, name):
    """`candidate_aware = False` lets evaluation reuse one user vector for every candidate: it must be true."""
    enc = build_user_encoder(request, name).eval()
    if enc.candidate_aware:
        pytest.skip("candidate-aware")
    with torch.no_grad():
        a = enc(user_inputs(H_LENGTHS, 6, C_LENGTHS, 4, seed=0)).user
        other = user_inputs(H_LENGTHS, 6, [1, 5, 2, 4], 5, seed=0)
        other.candidates, other.candidate_category = other.candidates * 3 + 1, other.candidate_category.flip(1)
        b = enc(other).user
        no_candidates = user_inputs(H_LENGTHS, 6, C_LENGTHS, 4, seed=0)
        no_candidates.candidates = no_candidates.candidate_mask = no_candidates.candidate_category = None
        c = enc(no_candidates).user
    close(b, a, f"{name}: the user vector depends on the candidates")
    close(c, a, f"{name}: the user vector needs candidates")


@pytest.mark.parametrize("name", USER_NAMES)
def test_user_encoder_batch_independence(request, name):
    enc = build_user_encoder(request, name).eval()
    inp = user_inputs(H_LENGTHS, 6, C_LENGTHS, 4)
    with torch.no_grad():
        out = enc(inp)
        batch = scores(enc, out, inp)
        for i in range(len(H_LENGTHS)):
            alone_inp = user_rows(inp, slice(i, i + 1))
            alone = enc(alone_inp)
            close(scores(enc, alone, alone_inp), batch[i:i + 1], f"{name}: user {i} scores alone vs in a batch")
            if out.user is not None:
                close(alone.user, out.user[i:i + 1], f"{name}: user {i} vector alone vs in a batch")
        perm = torch.tensor([2, 0, 3, 1])
        perm_inp = user_rows(inp, perm)
        close(scores(enc, enc(perm_inp), perm_inp), batch[perm], f"{name}: permuted batch")


@pytest.mark.parametrize("name", USER_NAMES)
def test_user_encoder_gradients_reach_every_trainable_parameter(request, name):
    """Train mode, no long-term-interest dropping (LSTUR), user ids > 0; an empty history is in the batch."""
    enc = build_user_encoder(request, name, long_term_masking_probability=0).train()
    inp = user_inputs(H_LENGTHS, 6, C_LENGTHS, 4)
    inp.history.requires_grad_(True)
    inp.candidates.requires_grad_(True)
    out = enc(inp)
    loss = scores(enc, out, inp).masked_fill(~inp.candidate_mask, 0).sum()
    if out.user is not None:
        loss = loss + out.user.sum()
    loss = loss + sum(v.sum() for v in out.aux.values())
    loss.backward()
    assert_every_parameter_learns(enc, name)
    # Gradients reach the real history items (the news encoder trains through them), never the padded ones.
    assert inp.history.grad[inp.history_mask].abs().sum(-1).gt(0).all(), f"{name}: a real history item gets no grad"
    assert inp.history.grad[~inp.history_mask].eq(0).all(), f"{name}: a padded history item gets a gradient"
    assert torch.isfinite(inp.candidates.grad).all()
    if name == "LSTUR" or hasattr(enc, "user_embedding"):
        # LSTUR falls back to the ID embedding for an empty history; attention-based encoders (PUE) read the ID
        # only through the attention over clicked news, so there the users with a history must learn.
        users = inp.user_id if name == "LSTUR" else inp.user_id[inp.history_mask.any(1)]
        used = enc.user_embedding.weight.grad[users]
        assert used.abs().sum(-1).gt(0).all(), f"{name}: an active user's embedding gets no gradient"


@pytest.mark.parametrize("name", USER_NAMES)
def test_user_encoder_empty_history_is_finite(request, name):
    """Only empty histories (a cold-start batch) and a mixed batch: finite, and the empty user is batch-free."""
    enc = build_user_encoder(request, name).eval()
    with torch.no_grad():
        empty_inp = user_inputs([0, 0], 4, [2, 3], 3)
        empty = enc(empty_inp)
        check_user_output(enc, empty, 2, 3)
        mixed_inp = user_inputs([0, 3], 4, [2, 3], 3)
        mixed = enc(mixed_inp)
        check_user_output(enc, mixed, 2, 3)
        close(scores(enc, mixed, mixed_inp)[0], scores(enc, empty, empty_inp)[0],
              f"{name}: an empty-history user depends on the rest of the batch")


# ------------------------------------------------------------------------------------------------------------
# Shared layers
# ------------------------------------------------------------------------------------------------------------

def test_masked_softmax_gives_padding_exactly_zero_and_empty_rows_zeros():
    torch.manual_seed(0)
    logits = torch.randn(3, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 1, 0, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    huge = logits.masked_fill(~mask, 1e30)  # what sits at masked positions must not matter
    logits.requires_grad_(True)
    w = layers.masked_softmax(logits, mask)
    assert torch.equal(layers.masked_softmax(huge, mask), w.detach())
    assert (w[~mask] == 0).all(), "masked positions must get exactly zero weight"
    assert torch.equal(w[2], torch.zeros(6)), "an all-masked row gives zeros, not NaN or uniform weights"
    close(w[:2].sum(-1), torch.ones(2), "real rows sum to 1")
    close(w[0, :3], torch.softmax(logits[0, :3], -1), "equals the softmax over the real positions alone")
    (w * torch.randn(3, 6)).sum().backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad[~mask] == 0).all()
    # Broadcast mask over a head dimension, and no mask at all.
    w4 = layers.masked_softmax(torch.randn(3, 2, 6, 6), mask[:, None, None, :])
    assert (w4.masked_select(~mask[:, None, None, :].expand_as(w4)) == 0).all()
    x = torch.randn(2, 5)
    assert torch.equal(layers.masked_softmax(x, None), torch.softmax(x, -1))


def test_additive_attention_weights_sum_to_one_over_real_positions():
    torch.manual_seed(0)
    att = layers.AdditiveAttention(6, 4).eval()
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    x = torch.randn(3, 5, 6)
    out, w = att(x, mask, return_weights=True)
    assert out.shape == (3, 6) and w.shape == (3, 5)
    close(w[:2].sum(-1), torch.ones(2), "weights over real positions sum to 1")
    assert (w[~mask] == 0).all() and torch.equal(out[2], torch.zeros(6))
    garbage = torch.where(mask[..., None], x, 1e3 * torch.randn(3, 5, 6))
    close(att(garbage, mask), out, "padded positions changed the pooled vector")
    close(att(x[1:2, :2]), out[1:2], "padding changed the pooled vector vs. the trimmed sequence")


def test_query_attention_masked_mean_and_last_valid_ignore_padding():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    x = torch.randn(3, 4, 5)
    garbage = torch.where(mask[..., None], x, 1e3 * torch.randn(3, 4, 5))
    qa = layers.QueryAttention(5, 3)
    query = torch.randn(3, 3)
    close(qa(garbage, query, mask), qa(x, query, mask), "QueryAttention")
    assert torch.equal(qa(x, query, mask)[2], torch.zeros(5))
    close(layers.masked_mean(garbage, mask), layers.masked_mean(x, mask), "masked_mean")
    close(layers.masked_mean(x, mask)[0], x[0, :3].mean(0), "masked_mean of row 0")
    assert torch.equal(layers.masked_mean(x, mask)[2], torch.zeros(5))
    last = layers.last_valid(garbage, mask)
    assert torch.equal(last[0], x[0, 2]) and torch.equal(last[1], x[1, 0]) and torch.equal(last[2], torch.zeros(5))


@pytest.mark.parametrize("return_weights", [False, True], ids=["fused", "explicit"])
def test_multi_head_self_attention_real_positions_ignore_padding(return_weights):
    """Outputs at real positions depend only on real positions (both the fused SDPA path and the explicit one);
    padded keys get exactly zero weight; a fully padded row stays finite."""
    torch.manual_seed(0)
    mhsa = layers.MultiHeadSelfAttention(6, head_num=2, head_dim=4).eval()
    lengths = [6, 3, 1, 0]
    mask = torch.arange(6)[None, :] < torch.tensor(lengths)[:, None]
    x = torch.randn(4, 6, 6)

    def run(inp, m):
        out = mhsa(inp, m, return_weights=return_weights)
        return out if not return_weights else out[0]

    out = run(x, mask)
    assert out.shape == (4, 6, 8) and torch.isfinite(out).all()
    garbage = torch.where(mask[..., None], x, 1e3 * torch.randn(4, 6, 6))
    padded = torch.cat([garbage, 1e3 * torch.randn(4, 5, 6)], 1)
    wider = torch.cat([mask, torch.zeros(4, 5, dtype=torch.bool)], 1)
    for i, k in enumerate(lengths):
        close(run(garbage, mask)[i, :k], out[i, :k], f"row {i}: garbage at padded positions")
        close(run(padded, wider)[i, :k], out[i, :k], f"row {i}: more padding")
        if k:
            close(run(x[i:i + 1, :k], None)[0], out[i, :k], f"row {i}: vs. the trimmed, unmasked sequence")
    if return_weights:
        _, w = mhsa(x, mask, return_weights=True)  # [N, Hd, L, L]
        assert (w.masked_select(~mask[:, None, None, :].expand_as(w)) == 0).all()
    else:  # the fused path and the explicit path agree where it matters
        explicit, _ = mhsa(x, mask, return_weights=True)
        close(out[mask], explicit[mask], "fused vs explicit attention at real positions")


# ------------------------------------------------------------------------------------------------------------
# Registries
# ------------------------------------------------------------------------------------------------------------

def test_registries_are_not_empty_and_match_config_choices():
    assert {"MHSA", "CNN", "NAML"} <= set(NEWS_ENCODERS) and {"MHSA", "ATT", "LSTUR", "GRU"} <= set(USER_ENCODERS)
    choices = {a.dest: a.choices for a in build_parser()._actions}
    assert choices["news_encoder"] == sorted(NEWS_ENCODERS)
    assert choices["user_encoder"] == sorted(USER_ENCODERS)
    for name, cls in NEWS_ENCODERS.items():
        assert get_news_encoder(name) is cls and cls.name == name
    for name, cls in USER_ENCODERS.items():
        assert get_user_encoder(name) is cls and cls.name == name


@pytest.mark.parametrize("getter, registry, flag", [
    (get_news_encoder, NEWS_ENCODERS, "news_encoder"), (get_user_encoder, USER_ENCODERS, "user_encoder"),
])
def test_unknown_encoder_name_is_an_error_listing_the_valid_ones(getter, registry, flag, capsys):
    with pytest.raises(ValueError) as err:
        getter("nope")
    message = str(err.value)
    assert f"--{flag}" in message and "'nope'" in message and str(sorted(registry)) in message
    with pytest.raises(SystemExit) as exit_:
        Config.from_args([f"--{flag}=nope"])
    assert exit_.value.code == 2
    stderr = capsys.readouterr().err
    assert "invalid choice: 'nope'" in stderr and all(name in stderr for name in registry)


@pytest.mark.parametrize("argv, hint", [
    (["--news_encoder=NRMS"], "NRMS is a paper model, not one encoder: --news_encoder=MHSA --user_encoder=MHSA"),
    (["--user_encoder", "pp-rec"], "PP-Rec is a paper model, not one encoder: --news_encoder=MHSA --user_encoder=PPRec"),
    (["--news_encoder=mhsa"], "did you mean --news_encoder=MHSA?"),
    (["--user_encoder=GLROY"], "the closest is --user_encoder=GLORY"),
    (["--dataset=Small"], "did you mean --dataset=small?"),
])
def test_a_value_outside_the_choices_says_what_it_probably_meant(argv, hint, capsys, tmp_path):
    """A paper model's name typed as an encoder (the README's table names models, the flags name encoders), another
    letter case, a typo: argparse's error (exit 2, the choices) ends with the hint; a config file's error too."""
    with pytest.raises(SystemExit) as exit_:
        Config.from_args(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and err.rstrip().endswith(f"({hint})"), err
    key, value = (argv[0][2:].split("=", 1) if "=" in argv[0] else (argv[0][2:], argv[1]))
    with pytest.raises(ValueError, match=re.escape(f"got \"{value}\" ({hint})")):
        Config.from_args([], file_values={key: value})
    Config.from_args(["--news_encoder=MHSA"])  # a valid choice: no error, no hint


def test_the_paper_model_table_of_the_readme_is_the_config_s():
    """config.PAPER_MODELS (the hints above, bench/zoo.py) and the README's model table name the same flags."""
    from config import PAPER_MODELS, _squash

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("| model | command flags | paper |", 1)[1].split("\n\n", 1)[0]
    seen = set()
    for row in table.strip().splitlines()[1:]:
        name, flags = row.split("|")[1:3]
        matches = [m for m in PAPER_MODELS if _squash(m) == _squash(name)]
        assert matches, f"README row {name.strip()!r} is not in config.PAPER_MODELS"
        typed = {f for code in re.findall(r"`([^`]+)`", flags) for f in code.split() if f.startswith("--")}
        assert typed == set(PAPER_MODELS[matches[0]]), name
        seen.add(matches[0])
    assert seen == set(PAPER_MODELS)


def test_registering_a_name_twice_is_an_error_and_keeps_the_first():
    news_before, user_before = dict(NEWS_ENCODERS), dict(USER_ENCODERS)
    with pytest.raises(ValueError, match="registered twice"):
        register_news_encoder("MHSA")(type("Dup", (), {}))
    with pytest.raises(ValueError, match="registered twice"):
        register_user_encoder("MHSA")(type("Dup", (), {}))
    assert NEWS_ENCODERS == news_before and USER_ENCODERS == user_before
