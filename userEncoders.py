"""User encoders: encoded history (and, for candidate-aware ones, candidates) -> user vector(s) or scores.

Legend: B impressions/samples, H history items (50), C candidates (1+K in training), D news vector dim,
K interest vectors (MINER) or archives (OMAP), A attention dim, G categories = clusters (SUE; id 0 included),
N = H + G graph nodes (SUE), Lv / L / F: HDC levels / title positions / filters (FIM).

A user encoder sees flat, already-encoded tensors (`UserInputs`), never raw news: that is what lets the
evaluation encode every news once and reuse the vectors. Encoders whose output depends on the candidates set
`candidate_aware = True`; the evaluation then calls them per chunk of candidates, still on cached vectors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import AdditiveAttention, MHSASettings, MultiHeadSelfAttention, Registry, last_valid, masked_softmax, recording
from layers import Fastformer, FastformerSettings, FastformerSizeSettings
from newsEncoders import CategoryGloveSettings, PersonalizedSettings, make_category_embedding
from settings import Settings, at_least, setting, unit_interval

if TYPE_CHECKING:
    from config import Config
    from MIND_corpus import CorpusMeta
    from newsEncoders import NewsEncoder

USER_ENCODERS: Registry = Registry("user encoder", "--user_encoder")  # name -> UserEncoder subclass
register_user_encoder = USER_ENCODERS.register

# The largest tensor a user encoder builds per chunk of candidates (encoders that attend per candidate, [B, H, C, ...]):
# 2^24 elements is 64 MiB in fp32, so the few such tensors autograd keeps stay within a few hundred MiB however many
# candidates an impression shows (MIND-large evaluation: hundreds), while a training batch (B 64, H 50, C 5) is one
# chunk and pays no loop. Tests lower an encoder's `max_elements` to check that chunking changes no result.
CHUNK_ELEMENTS = 1 << 24


def get_user_encoder(name: str) -> type["UserEncoder"]:
    return USER_ENCODERS.lookup(name)


@dataclass
class UserInputs:
    """What a user encoder may read. Shapes: see legend. Masks are bool, True = real item."""

    history: torch.Tensor  # [B, H, D] encoded history news
    history_mask: torch.Tensor  # [B, H]
    user_id: torch.Tensor  # [B] long, 0 = unknown user
    history_category: torch.Tensor | None = None  # [B, H] long, 0 = pad
    candidates: torch.Tensor | None = None  # [B, C, D] encoded candidates (candidate-aware encoders)
    candidate_mask: torch.Tensor | None = None  # [B, C]
    candidate_category: torch.Tensor | None = None  # [B, C] long
    # Time-aware popularity at the impression's hour (popularity.PopularityLookup; encoders with needs_popularity):
    history_ctr: torch.Tensor | None = None  # [B, H] float, train CTR of each clicked news before the impression
    candidate_ctr: torch.Tensor | None = None  # [B, C] float, the same for each candidate
    candidate_age: torch.Tensor | None = None  # [B, C] long, hours since the candidate's first exposure


@dataclass
class UserOutput:
    """Either user vectors (scored by the model's click predictor) or logits computed by the encoder itself."""

    user: torch.Tensor | None = None  # [B, D] or, candidate-aware, [B, C, D]
    logits: torch.Tensor | None = None  # [B, C] when the encoder scores candidates itself (MINER max/mean)
    # [B, C, Du]: the candidate vectors the click predictor scores, when the encoder re-encodes the candidates (GLORY's
    # candidate encoder reads the local half of its news vectors); None: the news vectors themselves are scored.
    candidates: torch.Tensor | None = None
    aux: dict[str, torch.Tensor] = field(default_factory=dict)  # weighted auxiliary losses (training)
    attention: dict[str, torch.Tensor] = field(default_factory=dict)  # for explain mode


class UserEncoder(nn.Module):
    """Base class. `forward(UserInputs) -> UserOutput`."""

    name = "base"
    candidate_aware = False  # True: output depends on the candidates
    needs_category = False  # True: UserInputs carry history/candidate category ids (MINER)
    reads_category_embedding = False  # True: reads the news encoder's `category_embedding` (MINER)
    needs_popularity = False  # True: UserInputs carry history/candidate CTR and candidate age (PP-Rec)
    compatible_news_encoders: tuple[str, ...] | None = None  # None = any news encoder
    uses_gcn = False  # True: --gcn_* flags (and their per-dataset suggestions) matter
    settings: tuple[type[Settings], ...] = ()  # settings classes whose flags the encoder reads (settings.py)
    # --click_predictor values this encoder works with; None = any predictor that scores user vectors. An encoder
    # that always scores candidates itself (FIM) lists the self-scoring predictor ("FIM").
    compatible_click_predictors: tuple[str, ...] | None = None
    paper = ""
    # Names of the dimensions of each UserOutput.attention entry, for `--mode=explain`'s picture.
    attention_axes: dict[str, tuple[str, ...]] = {"history": ("impression", "history")}

    def __init__(self, config: "Config", meta: "CorpusMeta", news_encoder: "NewsEncoder"):
        super().__init__()
        self.news_dim = news_encoder.output_dim
        self.output_dim = self.news_dim

    @classmethod
    def click_predictors_for(cls, config: "Config | None") -> tuple[str, ...] | None:
        """The click predictors this encoder accepts under `config` (None: any that scores user vectors)."""
        return cls.compatible_click_predictors

    @classmethod
    def returns_user_vectors(cls, config: "Config | None") -> bool:
        """Whether the encoder returns user vectors under `config` (False: it scores candidates itself, as FIM
        and MINER's max / mean aggregation do). Self-supervised pretraining (pretraining.py) needs vectors."""
        return cls.compatible_click_predictors is None  # an encoder bound to its own predictor scores itself

    def forward(self, inp: UserInputs) -> UserOutput:
        raise NotImplementedError

    def contextual(self, inp: UserInputs) -> torch.Tensor | None:
        """history [B, H, D] -> [B, H, D]: one output per history position, each seeing the others (what
        masked-item pretraining predicts from); None for an encoder that has no such outputs (the default)."""
        return None

    def param_groups(self) -> list[dict]:
        """Optimizer groups with their own learning rate; none by default."""
        return []


def history_self_attention(d: int, config) -> tuple[nn.Module, nn.Module]:
    """Self-attention of --head_num × --head_dim heads over D-dim history items, and the projection of its output
    back to D. NRMS has no projection because both sides are 20x20; other news encoders (a 768-d PLM) need one.
    (Built in this order, mhsa then project, where each encoder built them: the same seeded initial weights.)"""
    mhsa = MultiHeadSelfAttention(d, config.head_num, config.head_dim)
    inner = config.head_num * config.head_dim
    return mhsa, (nn.Linear(inner, d) if inner != d else nn.Identity())


@register_user_encoder("MHSA")
class MHSAUserEncoder(UserEncoder):
    """NRMS user encoder: multi-head self-attention over the history, then additive attention.

    Wu et al., EMNLP 2019. Dropout comes from --dropout_rate (the reference hard-codes 0.5) and the pooling is
    masked (the reference pools over padded history).
    """

    settings = (MHSASettings,)

    paper = "NRMS (Wu et al., EMNLP 2019)"

    def __init__(self, config, meta, news_encoder):
        super().__init__(config, meta, news_encoder)
        d = self.news_dim
        self.mhsa, self.project = history_self_attention(d, config)
        self.attention = AdditiveAttention(d, config.attention_dim)
        self.dropout = nn.Dropout(config.dropout_rate)

    def contextual(self, inp):
        """history [B, H, D], history_mask [B, H] -> [B, H, D]: the self-attention outputs before pooling."""
        return self.project(self.dropout(self.mhsa(inp.history, inp.history_mask)))

    def forward(self, inp):
        """history [B, H, D], history_mask [B, H] -> user [B, D]"""
        x = self.contextual(inp)  # [B, H, D]
        user, weights = self.attention(x, inp.history_mask, return_weights=True)
        return UserOutput(user=user, attention={"history": weights})


@register_user_encoder("ATT")
class ATTUserEncoder(UserEncoder):
    """NAML user encoder: masked additive attention over the encoded history.

    Wu et al., "Neural News Recommendation with Attentive Multi-View Learning", IJCAI 2019.
    """

    paper = "NAML (Wu et al., IJCAI 2019)"

    def __init__(self, config, meta, news_encoder):
        super().__init__(config, meta, news_encoder)
        self.attention = AdditiveAttention(self.news_dim, config.attention_dim)

    def forward(self, inp):
        """history [B, H, D] -> user [B, D]"""
        user, weights = self.attention(inp.history, inp.history_mask, return_weights=True)
        return UserOutput(user=user, attention={"history": weights})


@dataclass
class LSTURSettings(Settings):
    """LSTUR's long-term user embedding."""

    title: ClassVar[str] = "LSTUR"
    long_term_masking_probability: float = setting(0.1, "LSTUR: p of dropping the user-ID embedding in training",
                                                   check=unit_interval, architecture=False)


@register_user_encoder("LSTUR")
class LSTURUserEncoder(UserEncoder):
    """LSTUR-ini: a GRU over the history whose initial state is the user-ID embedding (long-term interest).

    An et al., ACL 2019. During training the whole user embedding is dropped with probability
    --long_term_masking_probability (the paper's p=0.1), so unseen users (id 0) are handled at test time.
    An empty history returns the long-term embedding itself.
    """

    settings = (LSTURSettings,)

    paper = "LSTUR (An et al., ACL 2019)"

    def __init__(self, config, meta, news_encoder):
        super().__init__(config, meta, news_encoder)
        d = self.news_dim
        self.user_embedding = nn.Embedding(meta.user_num, d, padding_idx=0)
        nn.init.zeros_(self.user_embedding.weight)  # unknown/new users start from a neutral long-term state
        self.gru = nn.GRU(d, d, batch_first=True)
        self.mask_prob = config.long_term_masking_probability

    def forward(self, inp):
        """history [B, H, D], user_id [B] -> user [B, D]"""
        long_term = self.user_embedding(inp.user_id)  # [B, D]
        if self.training and self.mask_prob > 0:
            keep = torch.rand(long_term.size(0), 1, device=long_term.device) >= self.mask_prob
            long_term = long_term * keep.to(long_term.dtype)
        lengths = inp.history_mask.sum(1)  # [B]
        packed = nn.utils.rnn.pack_padded_sequence(
            inp.history, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False
        )
        _, h = self.gru(packed, long_term.unsqueeze(0).contiguous())  # h: [1, B, D]
        user = torch.where((lengths > 0).unsqueeze(1), h.squeeze(0), long_term)
        return UserOutput(user=user)


@register_user_encoder("GRU")
class GRUUserEncoder(UserEncoder):
    """EBNR user encoder: a GRU over the history, last real state (Okura et al., KDD 2017)."""

    paper = "EBNR (Okura et al., KDD 2017)"

    def __init__(self, config, meta, news_encoder):
        super().__init__(config, meta, news_encoder)
        self.gru = nn.GRU(self.news_dim, self.news_dim, batch_first=True)

    def forward(self, inp):
        """history [B, H, D] -> user [B, D]; empty history -> zeros."""
        out, _ = self.gru(inp.history)  # [B, H, D]; histories are left-aligned, so padding comes after
        return UserOutput(user=last_valid(out, inp.history_mask))

    def contextual(self, inp):
        """history [B, H, D] -> [B, H, D]: the GRU state at each position (it sees the positions before it)."""
        return self.gru(inp.history)[0]


@dataclass
class MINERSettings(Settings):
    """MINER's poly attention: K context codes, the category-aware bias, the disagreement loss."""

    title: ClassVar[str] = "miner"
    num_interest_vectors: int = setting(32, "MINER: K context codes / interest vectors", check=at_least(1))
    context_code_dim: int = setting(200, "MINER: context code dim", check=at_least(1))
    category_aware_lambda: float = setting(0.5, "MINER: initial value of the learnable category-bias weight",
                                           architecture=False)
    miner_aggregation: str = setting("weighted", "MINER: interest vectors -> score", choices=("weighted", "max", "mean"))
    disagreement_beta: float = setting(0.8, "MINER: weight of the disagreement loss", architecture=False,
                                       check=at_least(0))
    poly_attention_scale: str = setting("sqrt", "MINER: divide the poly-attention logits by sqrt(--context_code_dim) "
                                        "(sqrt, the MINER design) or not (none, as Li et al.'s code); see the README's "
                                        "MINER notes", choices=("sqrt", "none"))


@register_user_encoder("MINER")
class MINERUserEncoder(UserEncoder):
    """MINER: K interest vectors from poly attention with a category-aware bias, a disagreement regulariser,
    and weighted / max / mean aggregation of the interests against each candidate.

    Li et al., "MINER: Multi-Interest Matching Network for News Recommendation", ACL 2022 (README: PLM and MINER flags).
    Fixes over the public code: padded history gets -inf (exactly zero weight, not 1e-30), and the category
    bias is computed per (history item, candidate) instead of averaged over the candidates.
    """

    settings = (MINERSettings, CategoryGloveSettings)

    candidate_aware = True
    needs_category = True
    reads_category_embedding = True  # the news encoder's category embedding, when it has one (PLMMiner, NAML, ...)
    paper = "MINER (Li et al., ACL 2022)"
    attention_axes = {"interests": ("impression", "history", "candidate", "interest"),
                      "candidate": ("impression", "candidate", "interest")}

    @classmethod
    def click_predictors_for(cls, config):
        # max / mean return logits that are already dot products of interests and candidates.
        if config is not None and config.miner_aggregation != "weighted":
            return ("dot_product",)
        return None

    @classmethod
    def returns_user_vectors(cls, config):
        return config is None or config.miner_aggregation == "weighted"  # max / mean return logits

    def __init__(self, config, meta, news_encoder):
        super().__init__(config, meta, news_encoder)
        d, k, dc = self.news_dim, config.num_interest_vectors, config.context_code_dim
        self.k, self.dc = k, dc
        self.project = nn.Linear(d, dc, bias=False)  # W_h
        self.codes = nn.Parameter(torch.empty(k, dc))  # context codes c_k
        nn.init.orthogonal_(self.codes)
        # The design divides the logits by sqrt(d_c); with unit-norm orthogonal codes they then start ~0.05 apart
        # over a history and the attention stays near uniform (README, MINER notes); `none` keeps Li et al.'s scale.
        self.logit_scale = 1.0 / math.sqrt(dc) if config.poly_attention_scale == "sqrt" else 1.0
        self.category_lambda = nn.Parameter(torch.tensor(float(config.category_aware_lambda)))
        shared = news_encoder.category_embedding
        if shared is None:  # word-based news encoders: MINER owns a corpus category embedding
            shared = make_category_embedding(config, meta)
        self.category_embedding = shared
        self.aggregation = config.miner_aggregation
        if self.aggregation == "weighted":
            self.score_project = nn.Linear(d, d)  # W_e
        self.beta = config.disagreement_beta
        # Bound the [B, H, C, K] attention tensor when impressions have hundreds of candidates.
        self.max_elements = CHUNK_ELEMENTS

    def interests(self, inp: UserInputs, candidates: torch.Tensor, candidate_category: torch.Tensor,
                  keep: list | None = None) -> torch.Tensor:
        """Interest vectors per candidate.

        Args: history [B, H, D], history_mask [B, H], candidates [B, C, D], categories [B, H] / [B, C];
            keep: a list that receives the attention alpha [B, H, C, K] (explain mode).
        Returns: v [B, C, K, D] (zeros for an empty history).
        """
        h = inp.history
        logits = torch.tanh(self.project(h)) @ self.codes.t() * self.logit_scale  # [B, H, K]
        eh = F.normalize(self.category_embedding(inp.history_category), dim=-1)  # [B, H, Ec]
        ec = F.normalize(self.category_embedding(candidate_category), dim=-1)  # [B, C, Ec]
        bias = eh @ ec.transpose(1, 2)  # [B, H, C] cosine of categories
        logits = logits.unsqueeze(2) + self.category_lambda * bias.unsqueeze(-1)  # [B, H, C, K]
        mask = inp.history_mask[:, :, None, None].expand_as(logits)
        alpha = masked_softmax(logits, mask, dim=1)  # over history; padded items get exactly 0
        if keep is not None:
            keep.append(alpha)
        return torch.einsum("bhck,bhd->bckd", alpha, h)  # [B, C, K, D]

    @staticmethod
    def disagreement(v: torch.Tensor) -> torch.Tensor:
        """v [B, C, K, D] -> [B, C]: mean of the K x K cosine-similarity matrix (diagonal included), so
        1/K for orthogonal interests and 1 for identical ones."""
        vn = F.normalize(v, dim=-1)
        return (vn @ vn.transpose(-1, -2)).mean((-1, -2))

    def forward(self, inp):
        """history [B, H, D], candidates [B, C, D] (+ categories) -> user [B, C, D] (weighted) or logits [B, C].

        An empty history gives zero interest vectors, so every candidate scores 0 (finite; the official tie
        rule then orders them)."""
        b, hlen, d = inp.history.shape
        c = inp.candidates.shape[1]
        step = max(1, self.max_elements // max(1, b * hlen * self.k))
        users, logits, disagreement = [], [], []
        # The [B, H, C, K] attention is what the chunking avoids holding: kept only for explain mode.
        alphas, interest_weights = ([], []) if recording() else (None, None)
        for start in range(0, c, step):
            cand = inp.candidates[:, start:start + step]  # [B, c, D]
            v = self.interests(inp, cand, inp.candidate_category[:, start:start + step], alphas)  # [B, c, K, D]
            if self.training and self.beta > 0:
                sim = self.disagreement(v)  # [B, c]
                real = inp.candidate_mask[:, start:start + step] & inp.history_mask.any(1, keepdim=True)
                disagreement.append((sim * real, real))
            if self.aggregation == "weighted":
                query = F.gelu(self.score_project(cand))  # [B, c, D]
                weights = torch.softmax((v * query.unsqueeze(2)).sum(-1), dim=-1)  # [B, c, K]
                users.append((weights.unsqueeze(-1) * v).sum(2))  # [B, c, D]
                if interest_weights is not None:
                    interest_weights.append(weights)
            else:
                per_interest = (v * cand.unsqueeze(2)).sum(-1)  # [B, c, K]
                if interest_weights is not None:  # max / mean: the share of each interest in the score
                    interest_weights.append(torch.softmax(per_interest, -1) if self.aggregation == "max"
                                            else torch.full_like(per_interest, 1.0 / self.k))
                logits.append(per_interest.max(-1).values if self.aggregation == "max" else per_interest.mean(-1))
        aux = {}
        if disagreement:
            total = sum(s.sum() for s, _ in disagreement)
            count = sum(r.sum() for _, r in disagreement).clamp(min=1)
            aux["disagreement"] = self.beta * total / count
        attention = ({"interests": torch.cat(alphas, 2), "candidate": torch.cat(interest_weights, 1)}
                     if alphas is not None else {})
        if users:
            return UserOutput(user=torch.cat(users, 1), aux=aux, attention=attention)
        return UserOutput(logits=torch.cat(logits, 1), aux=aux, attention=attention)


# ------------------------------------------------------------------------------------------------------------
# The NNR zoo: CATT (DKN), PUE (NPA), OMAP (Hi-Fi Ark), SUE (CNE-SUE) and its ablations, FIM
# ------------------------------------------------------------------------------------------------------------

def candidate_chunk(per_candidate: int, max_elements: int) -> int:
    """Candidates per chunk so that one chunk's largest tensor stays under `max_elements` (`per_candidate`:
    elements one candidate adds over the whole batch). Evaluation impressions can hold hundreds of candidates."""
    return max(1, max_elements // max(1, per_candidate))


@register_user_encoder("CATT")
class CATTUserEncoder(UserEncoder):
    """DKN's candidate-aware attention: an MLP scores each (candidate, clicked news) pair, softmax over history.

    Wang et al., "DKN: Deep Knowledge-Aware Network for News Recommendation", WWW 2018. The MLP's first layer on
    [candidate; history] is split into its two halves (same function) so the [B, C, H, 2D] concatenation is never
    built; the output layer has no bias because softmax cancels it.
    """

    candidate_aware = True
    paper = "DKN (Wang et al., WWW 2018)"
    attention_axes = {"history": ("impression", "candidate", "history")}

    def __init__(self, config, meta, news_encoder):
        super().__init__(config, meta, news_encoder)
        d, a = self.news_dim, config.attention_dim
        self.candidate_proj = nn.Linear(d, a)
        self.history_proj = nn.Linear(d, a, bias=False)
        self.score = nn.Linear(a, 1, bias=False)
        self.max_elements = CHUNK_ELEMENTS

    def forward(self, inp):
        """history [B, H, D], history_mask [B, H], candidates [B, C, D] -> user [B, C, D], attention [B, C, H].

        Empty history -> zero user vectors."""
        b, h, _ = inp.history.shape
        c = inp.candidates.shape[1]
        hist = self.history_proj(inp.history)  # [B, H, A]
        step = candidate_chunk(b * h * hist.shape[-1], self.max_elements)
        users, weights = [], []
        for start in range(0, c, step):
            cand = self.candidate_proj(inp.candidates[:, start:start + step])  # [B, c, A]
            hidden = F.relu(cand.unsqueeze(2) + hist.unsqueeze(1))  # [B, c, H, A]
            logits = self.score(hidden).squeeze(-1)  # [B, c, H]
            alpha = masked_softmax(logits, inp.history_mask.unsqueeze(1), dim=-1)  # padded history -> exactly 0
            users.append(alpha @ inp.history)  # [B, c, D]
            weights.append(alpha)
        return UserOutput(user=torch.cat(users, 1), attention={"history": torch.cat(weights, 1)})


@register_user_encoder("PUE")
class PUEUserEncoder(UserEncoder):
    """NPA's personalized attention over the history: the query comes from the user-ID embedding.

    Wu et al., "NPA: Neural News Recommendation with Personalized Attention", KDD 2019:
    q_u = ReLU(V e_u + v), alpha_j = softmax_j(h_j . tanh(W_p q_u + b_p)) over real history items.
    NNR pairs PUE with any news encoder (no pairing rule); with PNE the two share one user-ID embedding, as NNR's
    model-level embedding does, when the news encoder exposes it as `user_embedding`. User 0 (unknown) keeps a zero
    embedding, so unseen users share one neutral query. An empty history gives a zero user vector.
    """

    settings = (PersonalizedSettings,)

    paper = "NPA (Wu et al., KDD 2019)"

    def __init__(self, config, meta, news_encoder):
        super().__init__(config, meta, news_encoder)
        shared = news_encoder.user_embedding
        if not isinstance(shared, nn.Embedding):
            shared = nn.Embedding(meta.user_num, config.user_embedding_dim, padding_idx=0)
            nn.init.uniform_(shared.weight, -0.1, 0.1)
            with torch.no_grad():
                shared.weight[0].zero_()
        self.user_embedding = shared
        self.query = nn.Linear(shared.embedding_dim, config.personalized_embedding_dim)  # V, v
        self.key = nn.Linear(config.personalized_embedding_dim, self.news_dim)  # W_p, b_p
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, inp):
        """history [B, H, D], history_mask [B, H], user_id [B] -> user [B, D], attention [B, H]."""
        q = F.relu(self.query(self.dropout(self.user_embedding(inp.user_id))))  # [B, Q]
        k = torch.tanh(self.key(q))  # [B, D]
        logits = torch.bmm(inp.history, k.unsqueeze(-1)).squeeze(-1)  # [B, H]
        alpha = masked_softmax(logits, inp.history_mask, dim=-1)
        user = torch.bmm(alpha.unsqueeze(1), inp.history).squeeze(1)  # [B, D]
        return UserOutput(user=user, attention={"history": alpha})


@dataclass
class OMAPSettings(Settings):
    """Hi-Fi Ark's archives (OMAP pooling heads) and their orthogonality regulariser."""

    title: ClassVar[str] = "OMAP (Hi-Fi Ark)"
    OMAP_head_num: int = setting(3, "OMAP (Hi-Fi Ark): number of archives (pooling heads)", check=at_least(1))
    HiFi_Ark_regularizer_coefficient: float = setting(
        0.1, "OMAP (Hi-Fi Ark): weight of the head-orthogonality regulariser added to the loss (0 = off)",
        check=at_least(0), architecture=False)


@register_user_encoder("OMAP")
class OMAPUserEncoder(UserEncoder):
    """Hi-Fi Ark: orthogonal attentive pooling of the history into K archives, then candidate-aware archive
    attention, with an orthogonality regulariser on the pooling heads.

    Liu et al., "Hi-Fi Ark: Deep User Representation via High-Fidelity Archive Network", IJCAI 2019.
    1. masked self-attention over the history with a residual connection;
    2. archives: beta = softmax over HISTORY of h W / sqrt(D) per head (the reference softmaxes over the heads,
       which pools every history item with total weight 1 instead of making each archive a weighted average);
    3. candidate-aware softmax over the K archives -> user vector per candidate;
    4. regulariser ||(W^T W) * (J - I)||_F times --HiFi_Ark_regularizer_coefficient (training, UserOutput.aux).
    The off-diagonal mask J - I is a buffer, so it follows the model to any device (the reference leaves it on
    the CPU).
    """

    settings = (OMAPSettings,)

    candidate_aware = True
    paper = "Hi-Fi Ark (Liu et al., IJCAI 2019)"
    attention_axes = {"archives": ("impression", "history", "archive"), "candidate": ("impression", "candidate", "archive")}

    def __init__(self, config, meta, news_encoder):
        super().__init__(config, meta, news_encoder)
        k = config.OMAP_head_num
        self.heads = nn.Parameter(torch.empty(self.news_dim, k))  # W (Lambda in the paper)
        nn.init.orthogonal_(self.heads)
        # A buffer, not a plain tensor attribute: .to(device) / .cuda() move it with the parameters.
        self.register_buffer("off_diagonal", 1.0 - torch.eye(k), persistent=False)  # J - I
        self.scale = math.sqrt(self.news_dim)
        self.coefficient = config.HiFi_Ark_regularizer_coefficient

    def forward(self, inp):
        """history [B, H, D], history_mask [B, H], candidates [B, C, D] -> user [B, C, D].

        attention: "archives" [B, H, K] (each column sums to 1 over real history items), "candidate" [B, C, K].
        Empty history -> zero archives -> zero user vectors."""
        mask = inp.history_mask
        h = inp.history.masked_fill(~mask.unsqueeze(-1), 0.0)
        self_logits = h @ h.transpose(1, 2) / self.scale  # [B, H, H]
        h = h + masked_softmax(self_logits, mask.unsqueeze(1), dim=-1) @ h
        beta = masked_softmax(h @ self.heads / self.scale, mask.unsqueeze(-1), dim=1)  # [B, H, K], over history
        archives = beta.transpose(1, 2) @ h  # [B, K, D]
        gamma = torch.softmax(inp.candidates @ archives.transpose(1, 2) / self.scale, dim=-1)  # [B, C, K]
        user = gamma @ archives  # [B, C, D]
        aux = {}
        if self.training and self.coefficient > 0:
            # W^T W by elementwise ops, not a matmul: autocast would run it in fp16, where the clamp below underflows.
            off = (self.heads.unsqueeze(2) * self.heads.unsqueeze(1)).sum(0) * self.off_diagonal  # [K, K]
            # Frobenius norm; the clamp keeps the gradient finite when the heads are exactly orthogonal (0/0).
            aux["hifi_ark_orthogonality"] = self.coefficient * (off * off).sum().clamp_min(1e-20).sqrt()
        return UserOutput(user=user, aux=aux, attention={"archives": beta, "candidate": gamma})


def scatter_softmax(logits: torch.Tensor, index: torch.Tensor, mask: torch.Tensor, groups: int) -> torch.Tensor:
    """Softmax over the last dim within groups: item i is normalised against the real items j with index[j] ==
    index[i]. Torch-native (scatter_reduce / scatter_add), no torch_scatter dependency.

    Args:
        logits: [..., H] float.
        index: [..., H] long in [0, groups): the group (category cluster) of each item.
        mask: [..., H] bool, True = real item. Padded items get exactly 0 and no gradient.
        groups: number of groups G.
    Returns:
        [..., H] weights; within every group that has real items they sum to 1.
    """
    shape = (*logits.shape[:-1], groups)
    masked = logits.detach().masked_fill(~mask, float("-inf"))
    # Per-group max for stability (detached: softmax is shift-invariant, so this changes no gradient).
    group_max = masked.new_full(shape, float("-inf")).scatter_reduce(-1, index, masked, "amax", include_self=True)
    shift = torch.where(mask, group_max.gather(-1, index), torch.zeros_like(logits))
    # where(), not masked_fill after exp: a -inf - -inf = NaN would leak into the gradient even at zero weight.
    e = torch.where(mask, torch.exp(torch.where(mask, logits, shift) - shift), torch.zeros_like(logits))
    total = torch.zeros(shape, dtype=e.dtype, device=e.device).scatter_add(-1, index, e)  # [..., G]
    denominator = torch.where(mask, total.gather(-1, index), torch.ones_like(e))
    return e / denominator


def sue_graph(category: torch.Tensor, mask: torch.Tensor, groups: int, normalization: str = "symmetric"
              ) -> torch.Tensor:
    """CNE-SUE's user graph, built per batch on the device from the history's category ids (NNR stores it dense per
    impression on disk, ~90 GB on MIND-large; it depends only on these ids).

    Nodes: the H history slots, then one proxy node per category id (G). Edges (all symmetric, plus a self-loop on
    every node): two real history news of the same category; a real news and its category's proxy; two proxies
    whose categories both occur in the history. Padded slots and absent categories are isolated (self-loop only),
    so they never reach a real node.

    Args:
        category: [B, H] long in [0, G); mask: [B, H] bool, True = real.
        normalization: "symmetric" D^-1/2 A D^-1/2, or "asymmetric" D^-1 A (row-normalised).
    Returns:
        [B, N, N] float normalised adjacency, N = H + G.
    """
    b, h = category.shape
    member = F.one_hot(category.clamp(0, groups - 1), groups).float() * mask.unsqueeze(-1).float()  # [B, H, G]
    present = member.amax(1)  # [B, G] 1 = the category occurs in the history
    top = torch.cat([member @ member.transpose(1, 2), member], 2)  # [B, H, N]
    bottom = torch.cat([member.transpose(1, 2), present.unsqueeze(2) * present.unsqueeze(1)], 2)  # [B, G, N]
    adjacency = torch.cat([top, bottom], 1)  # [B, N, N]
    eye = torch.eye(h + groups, device=category.device, dtype=adjacency.dtype)
    adjacency = torch.maximum(adjacency, eye)  # self-loops everywhere (NNR's default self connection)
    degree = adjacency.sum(-1)  # [B, N], >= 1
    if normalization == "asymmetric":
        return adjacency / degree.unsqueeze(-1)
    inv_sqrt = degree.rsqrt()
    return inv_sqrt.unsqueeze(-1) * adjacency * inv_sqrt.unsqueeze(1)


class GCNLayer(nn.Module):
    """out = ReLU(LN?(W (A x))) (+ x): one graph convolution (Kipf & Welling) as in CNE-SUE."""

    def __init__(self, dim: int, residual: bool, layer_norm: bool):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.linear.weight, gain=nn.init.calculate_gain("relu"))
        nn.init.zeros_(self.linear.bias)
        self.norm = nn.LayerNorm(dim) if layer_norm else nn.Identity()
        self.residual = residual

    def forward(self, x: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        """x [B, N, D], adjacency [B, N, N] -> [B, N, D]"""
        out = F.relu(self.norm(self.linear(adjacency @ x)))
        return out + x if self.residual else out


@dataclass
class GCNSettings(Settings):
    """CNE-SUE's graph convolutions over the user's clicked-news graph."""

    title: ClassVar[str] = "SUE graph convolution"
    gcn_layer_num: int = setting(4, "SUE: graph convolution layers (suggested per dataset)", check=at_least(1))
    gcn_normalization_type: str = setting("symmetric", "SUE: adjacency normalisation, symmetric D^-1/2 A D^-1/2 or "
                                          "asymmetric (row) D^-1 A", choices=("symmetric", "asymmetric"))
    gcn_residual: bool = setting(True, "SUE: residual connection around each GCN layer")
    gcn_layer_norm: bool = setting(False, "SUE: layer normalisation in each GCN layer")


@register_user_encoder("SUE")
class SUEUserEncoder(UserEncoder):
    """CNE-SUE's structural user encoder: a GCN over the history news and category proxy nodes, then
    hierarchical, candidate-aware cluster attention (intra-cluster within each category, then inter-cluster).

    Mao et al., "Neural News Recommendation with Collaborative News Encoding and Structural User Encoding",
    EMNLP Findings 2021 (NNR pairs it with CNE; any news encoder works here). Fixes over the reference: the graph
    is built per batch on the device (`sue_graph`), padded history forms no cluster (the reference always attends
    to a "padding" cluster), and the scatter softmax is torch-native (`scatter_softmax`).
    Ablations: SUE_wo_GCN (no graph), SUE_wo_HCA (plain masked attention instead of the cluster attention).
    """

    settings = (GCNSettings,)

    candidate_aware = True
    needs_category = True
    uses_gcn = True  # --gcn_* flags (and their per-dataset suggestions) matter
    hierarchical = True
    paper = "CNE-SUE (Mao et al., EMNLP Findings 2021)"
    attention_axes = {"history": ("impression", "history"), "intra": ("impression", "candidate", "history"),
                      "inter": ("impression", "candidate", "cluster")}

    def __init__(self, config, meta, news_encoder):
        super().__init__(config, meta, news_encoder)
        d = self.news_dim
        self.groups = meta.category_num
        self.normalization = config.gcn_normalization_type
        self.dropout = nn.Dropout(config.dropout_rate)
        if self.uses_gcn:
            self.proxy = nn.Parameter(torch.zeros(self.groups, d))  # category proxy nodes (zero init, as NNR)
            self.gcn = nn.ModuleList(GCNLayer(d, config.gcn_residual, config.gcn_layer_norm)
                                     for _ in range(config.gcn_layer_num))
            self.gcn_dropout = nn.Dropout(config.dropout_rate / 2)
        if self.hierarchical:
            a = max(config.attention_dim, d // 4)
            self.scale = math.sqrt(a)
            self.intra_key = nn.Linear(d, a, bias=False)  # a key bias would add a per-candidate constant: cancelled
            self.intra_query = nn.Linear(d, a)
            self.cluster_affine = nn.Linear(d, d)
            self.inter_key = nn.Linear(d, a, bias=False)
            self.inter_query = nn.Linear(d, a)
            self.max_elements = CHUNK_ELEMENTS
        else:
            self.attention = AdditiveAttention(d, config.attention_dim)

    def propagate(self, history: torch.Tensor, category: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """GCN over history + proxy nodes: history [B, H, D] (padding zeroed) -> [B, H, D]."""
        b = history.shape[0]
        adjacency = sue_graph(category, mask, self.groups, self.normalization)  # [B, N, N]
        nodes = torch.cat([history, self.dropout(self.proxy).unsqueeze(0).expand(b, -1, -1)], 1)  # [B, N, D]
        out = nodes
        for i, layer in enumerate(self.gcn):
            out = layer(out, adjacency)
            if i < len(self.gcn) - 1:
                out = self.gcn_dropout(out)
        return (out + nodes)[:, : history.shape[1]]

    def forward(self, inp):
        """history [B, H, D], history_mask [B, H], history_category [B, H], candidates [B, C, D]
        -> user [B, C, D] (SUE_wo_HCA: [B, D]).

        attention: "intra" [B, C, H] (sums to 1 within each category cluster), "inter" [B, C, G].
        Empty history -> no cluster -> zero user vectors."""
        mask = inp.history_mask
        category = inp.history_category.long()
        x = inp.history.masked_fill(~mask.unsqueeze(-1), 0.0)
        if self.uses_gcn:
            x = self.propagate(x, category, mask)
        if not self.hierarchical:
            user, weights = self.attention(x, mask, return_weights=True)
            return UserOutput(user=user, attention={"history": weights})
        b, h, d = x.shape
        c = inp.candidates.shape[1]
        member = F.one_hot(category.clamp(0, self.groups - 1), self.groups).to(x.dtype)  # [B, H, G]
        member = member * mask.unsqueeze(-1).to(x.dtype)
        present = member.amax(1) > 0  # [B, G]
        keys = self.intra_key(x)  # [B, H, A]
        # The cluster affine W f + b is linear and a cluster feature f is a weighted sum of history items, so W is
        # applied once per history item and aggregated with the same weights (exact; for an absent cluster both
        # sides are b), instead of a D x D product per (candidate, cluster).
        values = torch.cat([x, F.linear(x, self.cluster_affine.weight)], -1)  # [B, H, 2D]: x_j and W x_j
        step = candidate_chunk(b * self.groups * max(d, h), self.max_elements)
        users, intra_w, inter_w = [], [], []
        for start in range(0, c, step):
            cand = inp.candidates[:, start:start + step]  # [B, c, D]
            n = cand.shape[1]
            logits = self.intra_query(cand) @ keys.transpose(1, 2) / self.scale  # [B, c, H]
            alpha = scatter_softmax(logits, category.unsqueeze(1).expand(b, n, h),
                                    mask.unsqueeze(1).expand(b, n, h), self.groups)  # within each category
            weights = (alpha.unsqueeze(-1) * member.unsqueeze(1)).transpose(2, 3)  # [B, c, G, H]
            # One flat bmm: a broadcast [B, c, G, H] @ [B, 1, H, 2D] would copy the history for every candidate.
            pooled = torch.bmm(weights.reshape(b, n * self.groups, h), values).view(b, n, self.groups, 2 * d)
            clusters, affine = pooled[..., :d], pooled[..., d:] + self.cluster_affine.bias  # affine = W f + b
            clusters = self.dropout(F.relu(affine) + clusters)  # [B, c, G, D]
            # (K f) . q = f . (K^T q): one [B, c, D] query instead of projecting every cluster.
            query = self.inter_query(cand) @ self.inter_key.weight  # [B, c, D]
            inter_logits = (clusters * query.unsqueeze(2)).sum(-1)  # [B, c, G]
            beta = masked_softmax(inter_logits / self.scale, present.unsqueeze(1), dim=-1)  # [B, c, G]
            users.append((beta.unsqueeze(-1) * clusters).sum(2))  # [B, c, D]
            intra_w.append(alpha)
            inter_w.append(beta)
        return UserOutput(user=torch.cat(users, 1),
                          attention={"intra": torch.cat(intra_w, 1), "inter": torch.cat(inter_w, 1)})


@register_user_encoder("SUE_wo_GCN")
class SUEwoGCNUserEncoder(SUEUserEncoder):
    """SUE ablation without the GCN: hierarchical cluster attention on the raw history vectors (Mao et al., 2021)."""

    uses_gcn = False


@register_user_encoder("SUE_wo_HCA")
class SUEwoHCAUserEncoder(SUEUserEncoder):
    """SUE ablation without hierarchical cluster attention: GCN, then one masked additive attention over the
    history (the reference leaves it unmasked, so padded slots took weight). Not candidate-aware (Mao et al., 2021)."""

    candidate_aware = False
    hierarchical = False


def conv_pool_size(size: int, kernel_first: int, kernel_second: int, pool: int, stride: int) -> int:
    """Length of one axis after FIM's conv3D -> maxpool3D -> conv3D -> maxpool3D (no padding); <= 0 = collapsed."""
    for kernel in (kernel_first, kernel_second):
        size = size - kernel + 1
        size = (size - pool) // stride + 1 if size >= pool else 0
    return size


@dataclass
class FIMSettings(Settings):
    """FIM's 3-D matching convolutions over the news x history similarity cube."""

    title: ClassVar[str] = "FIM matching"
    conv3D_filter_num_first: int = setting(32, "FIM: filters of the first 3-D matching convolution", check=at_least(1))
    conv3D_kernel_size_first: int = setting(3, "FIM: kernel size of the first 3-D convolution", check=at_least(1))
    conv3D_filter_num_second: int = setting(16, "FIM: filters of the second 3-D matching convolution", check=at_least(1))
    conv3D_kernel_size_second: int = setting(3, "FIM: kernel size of the second 3-D convolution", check=at_least(1))
    maxpooling3D_size: int = setting(3, "FIM: 3-D max-pooling window", check=at_least(1))
    maxpooling3D_stride: int = setting(3, "FIM: 3-D max-pooling stride", check=at_least(1))


@register_user_encoder("FIM")
class FIMUserEncoder(UserEncoder):
    """FIM's fine-grained interest matching: a 3-D CNN over the matching images of every (candidate, clicked news)
    pair at every HDC level, scoring each candidate itself (UserOutput.logits; --click_predictor=FIM).

    Wang et al., "Fine-grained Interest Matching for Neural News Recommendation", ACL 2020.
    The HDC news vector is read with the layout the HDC encoder exposes (`hdc_length` Lh, `hdc_embedding_dim` E,
    `hdc_levels`, `hdc_filters` F): first the embedding level d0 [Lh, E], then the dilated levels [levels, Lh, F]
    (levels-major: index = ((level * Lh) + position) * F + filter). Image per level l and history item j:
    M[l, j, x, y] = c_l[x] . h_j,l[y] / sqrt(dim of level l). Channels = 1 + levels, depth = history;
    conv3D -> ELU -> maxpool3D twice, flatten, linear -> score. The history axis is always --max_history_num deep
    (padded slots are zero images), so the linear layer's input size is fixed and extra padding changes nothing.
    """

    settings = (FIMSettings,)

    candidate_aware = True
    compatible_news_encoders = ("HDC",)
    compatible_click_predictors = ("FIM",)
    paper = "FIM (Wang et al., ACL 2020)"

    def __init__(self, config, meta, news_encoder):
        super().__init__(config, meta, news_encoder)
        try:
            self.levels, self.length, self.filters = (int(news_encoder.hdc_levels), int(news_encoder.hdc_length),
                                                      int(news_encoder.hdc_filters))
        except AttributeError:
            raise ValueError("--user_encoder FIM reads the HDC news encoder's multi-level vectors (hdc_levels, "
                             "hdc_length, hdc_filters); use --news_encoder HDC") from None
        self.embedding_dim = int(news_encoder.hdc_embedding_dim)  # 0: no d0 block
        expected = self.length * self.embedding_dim + self.levels * self.length * self.filters
        if expected != self.news_dim:
            raise ValueError(f"FIM: HDC output dim {self.news_dim} != hdc_length {self.length} x (hdc_embedding_dim "
                             f"{self.embedding_dim} + hdc_levels {self.levels} x hdc_filters {self.filters})")
        self.channels = self.levels + (1 if self.embedding_dim else 0)
        self.history_num = config.max_history_num
        k1, k2 = config.conv3D_kernel_size_first, config.conv3D_kernel_size_second
        pool, stride = config.maxpooling3D_size, config.maxpooling3D_stride
        depth = conv_pool_size(self.history_num, k1, k2, pool, stride)
        side = conv_pool_size(self.length, k1, k2, pool, stride)
        if depth < 1 or side < 1:
            raise ValueError(
                f"FIM: the 3-D CNN leaves nothing of a {self.history_num} (history) x {self.length} x {self.length} "
                f"(title positions) image with --conv3D_kernel_size_first={k1}, --conv3D_kernel_size_second={k2}, "
                f"--maxpooling3D_size={pool}, --maxpooling3D_stride={stride}; use smaller kernels or pooling, or a "
                f"larger --max_history_num / --max_title_length")
        self.conv_first = nn.Conv3d(self.channels, config.conv3D_filter_num_first, k1)
        self.conv_second = nn.Conv3d(config.conv3D_filter_num_first, config.conv3D_filter_num_second, k2)
        self.pool = nn.MaxPool3d(pool, stride)
        self.out = nn.Linear(config.conv3D_filter_num_second * depth * side * side, 1)
        self.max_elements = CHUNK_ELEMENTS

    def split_levels(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """[..., D] -> d0 [..., Lh, E] (None without an embedding level), dL [..., levels, Lh, F]."""
        cut = self.length * self.embedding_dim
        d0 = x[..., :cut].unflatten(-1, (self.length, self.embedding_dim)) if cut else None
        dl = x[..., cut:].unflatten(-1, (self.levels, self.length, self.filters))
        return d0, dl

    def forward(self, inp):
        """history [B, H, D] (H <= --max_history_num), history_mask [B, H], candidates [B, C, D] -> logits [B, C].

        An empty history gives all-zero images, so every candidate gets the same finite score."""
        b, h, d = inp.history.shape
        if h > self.history_num:
            raise ValueError(f"FIM: a batch carries {h} history slots, more than --max_history_num={self.history_num}")
        c = inp.candidates.shape[1]
        history = inp.history.masked_fill(~inp.history_mask.unsqueeze(-1), 0.0)
        history = F.pad(history, (0, 0, 0, self.history_num - h))  # [B, Hmax, D]
        h0, hl = self.split_levels(history)  # [B, Hmax, Lh, E], [B, Hmax, levels, Lh, F]
        per_candidate = b * self.conv_first.out_channels * self.history_num * self.length * self.length
        step = candidate_chunk(per_candidate, self.max_elements)
        logits = []
        for start in range(0, c, step):
            c0, cl = self.split_levels(inp.candidates[:, start:start + step])
            n = cl.shape[1]
            images = torch.einsum("bclxf,bjlyf->bcljxy", cl, hl) / math.sqrt(self.filters)  # [B, c, levels, Hmax, Lh, Lh]
            if c0 is not None:
                first = torch.einsum("bcxe,bjye->bcjxy", c0, h0) / math.sqrt(self.embedding_dim)  # [B, c, Hmax, Lh, Lh]
                images = torch.cat([first.unsqueeze(2), images], 2)
            images = images.reshape(b * n, self.channels, self.history_num, self.length, self.length)
            q = self.pool(F.elu(self.conv_first(images)))
            q = self.pool(F.elu(self.conv_second(q)))  # [B*c, F2, depth, side, side]
            logits.append(self.out(q.flatten(1)).view(b, n))
        return UserOutput(logits=torch.cat(logits, 1))


# ------------------------------------------------------------------------------------------------------------
# The models since NNR (issue 25): Fastformer, CAUM, MINS. docs/models.md lists how each differs from its paper.
# ------------------------------------------------------------------------------------------------------------

@register_user_encoder("Fastformer")
class FastformerUserEncoder(UserEncoder):
    """Fastformer over the clicked news, then additive attention pooling (Wu et al., 2021, arXiv 2108.09084).

    The history is projected to --fastformer_hidden_dim when the news vectors have another size, and the user
    vector back to the news size, so the dot-product click predictor can score it."""

    settings = (FastformerSettings, FastformerSizeSettings)

    paper = "Fastformer (Wu et al., 2021)"

    def __init__(self, config, meta, news_encoder):
        super().__init__(config, meta, news_encoder)
        self.fastformer = Fastformer(self.news_dim, config, config.attention_dim, config.fastformer_hidden_dim,
                                     "--fastformer_hidden_dim")
        hidden = self.fastformer.output_dim
        self.out = nn.Linear(hidden, self.news_dim) if hidden != self.news_dim else nn.Identity()
        self.dropout = nn.Dropout(config.dropout_rate)

    def contextual(self, inp):
        """history [B, H, D] -> [B, H, D]: the last layer's states, before pooling."""
        return self.out(self.fastformer.states(self.dropout(inp.history), inp.history_mask))

    def forward(self, inp):
        """history [B, H, D], history_mask [B, H] -> user [B, D]"""
        states = self.fastformer.states(self.dropout(inp.history), inp.history_mask)  # [B, H, hidden]
        user, weights = self.fastformer.pool(states, inp.history_mask, return_weights=True)
        return UserOutput(user=self.out(user), attention={"history": weights})


@dataclass
class CAUMSettings(Settings):
    """CAUM's candidate-aware user model (the official Keras code: Dense 400 branches, attention MLP 400-256-1)."""

    title: ClassVar[str] = "CAUM"
    caum_dim: int = setting(400, "CAUM: width of the candidate-aware CNN and self-attention branches and of the "
                                 "attention MLP's first layer", check=at_least(1))
    caum_attention_dim: int = setting(256, "CAUM: second hidden layer of the candidate-aware attention MLP",
                                      check=at_least(1))


@register_user_encoder("CAUM")
class CAUMUserEncoder(UserEncoder):
    """CAUM: per candidate c, a candidate-aware CNN (Dense over [h_{i-1}; h_i; h_{i+1}; c]) and candidate-aware
    self-attention (Dense over [c; h_i], then MHSA) over the history, merged into m_i; a_i = softmax_i MLP([m_i; c]);
    user(c) = sum_i a_i m_i, one user vector per candidate.

    Qi et al., "News Recommendation with Candidate-aware User Modeling", SIGIR 2022. Each Dense over a concatenation
    is applied as its parts (the same function), so the history half is computed once for all candidates. The
    first and last real clicks get zero outer neighbours (the official code wraps around, which would make a
    click's neighbour depend on how much padding the batch carries)."""

    settings = (CAUMSettings, MHSASettings)

    candidate_aware = True
    paper = "CAUM (Qi et al., SIGIR 2022)"
    attention_axes = {"history": ("impression", "candidate", "history")}

    def __init__(self, config, meta, news_encoder):
        super().__init__(config, meta, news_encoder)
        d, f, inner = self.news_dim, config.caum_dim, config.head_num * config.head_dim
        self.cnn_history = nn.Linear(3 * d, f)  # [h_{i-1}; h_i; h_{i+1}] part of the CNN's Dense
        self.cnn_candidate = nn.Linear(d, f, bias=False)  # its candidate part
        self.sa_history = nn.Linear(d, f)
        self.sa_candidate = nn.Linear(d, f, bias=False)
        self.mhsa = MultiHeadSelfAttention(f, config.head_num, config.head_dim)
        self.merge = nn.Linear(f + inner, d)
        self.att_m = nn.Linear(d, f)  # the attention MLP's first layer over [m_i; c], as its two parts
        self.att_c = nn.Linear(d, f, bias=False)
        self.att_hidden = nn.Linear(f, config.caum_attention_dim)
        self.att_out = nn.Linear(config.caum_attention_dim, 1, bias=False)  # softmax cancels a bias
        self.dropout = nn.Dropout(config.dropout_rate)
        self.max_elements = CHUNK_ELEMENTS

    def user_vectors(self, history: torch.Tensor, mask: torch.Tensor, cnn_h: torch.Tensor, sa_h: torch.Tensor,
                     candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One chunk of candidates [B, c, D] -> user [B, c, D], attention [B, c, H] (history parts precomputed)."""
        b, h, _ = history.shape
        c = candidates.shape[1]
        cnn = cnn_h.unsqueeze(1) + self.cnn_candidate(candidates).unsqueeze(2)  # [B, c, H, F]
        sa_in = (sa_h.unsqueeze(1) + self.sa_candidate(candidates).unsqueeze(2)).reshape(b * c, h, -1)
        sa = self.mhsa(sa_in, mask.repeat_interleave(c, 0)).view(b, c, h, -1)  # [B, c, H, inner]
        m = self.merge(self.dropout(torch.cat([cnn, sa], -1)))  # [B, c, H, D]
        hidden = torch.tanh(self.att_m(m) + self.att_c(candidates).unsqueeze(2))  # [B, c, H, F]
        logits = self.att_out(torch.tanh(self.att_hidden(hidden))).squeeze(-1)  # [B, c, H]
        alpha = masked_softmax(logits, mask.unsqueeze(1), dim=-1)  # padded history -> exactly 0
        return (alpha.unsqueeze(-1) * m).sum(2), alpha

    def forward(self, inp):
        """history [B, H, D], history_mask [B, H], candidates [B, C, D] -> user [B, C, D], attention [B, C, H].

        An empty history gives zero user vectors."""
        mask = inp.history_mask
        history = self.dropout(inp.history) * mask.unsqueeze(-1).to(inp.history.dtype)  # padding -> 0 neighbours
        zero = history.new_zeros(history[:, :1].shape)
        left = torch.cat([zero, history[:, :-1]], 1)  # [B, H, D]: h_{i-1}
        right = torch.cat([history[:, 1:], zero], 1)  # h_{i+1}
        cnn_h = self.cnn_history(torch.cat([left, history, right], -1))  # [B, H, F]
        sa_h = self.sa_history(history)  # [B, H, F]
        b, h, _ = history.shape
        candidates = self.dropout(inp.candidates)
        step = candidate_chunk(b * h * 4 * cnn_h.shape[-1], self.max_elements)
        users, weights = [], []
        for start in range(0, candidates.shape[1], step):
            user, alpha = self.user_vectors(history, mask, cnn_h, sa_h, candidates[:, start:start + step])
            users.append(user)
            weights.append(alpha)
        return UserOutput(user=torch.cat(users, 1), attention={"history": torch.cat(weights, 1)})


@dataclass
class MINSSettings(Settings):
    """MINS's interest channels."""

    title: ClassVar[str] = "MINS"
    mins_channel_num: int = setting(6, "MINS: interest channels (self-attention heads, one GRU each)",
                                    check=at_least(1))
    mins_channel_dim: int = setting(50, "MINS: size of each channel (head dim and GRU state)", check=at_least(1))


@register_user_encoder("MINS")
class MINSUserEncoder(UserEncoder):
    """MINS: multi-head self-attention over the history whose K heads are K interest channels; a GRU per channel
    reads its channel's sequence; the user vector is the channels' last real states, concatenated.

    Wang et al., "News Recommendation via Multi-Interest News Sequence Modelling", ICASSP 2022. Projected to the
    news size when K * channel dim differs from it (so the dot product can score it)."""

    settings = (MINSSettings,)

    paper = "MINS (Wang et al., ICASSP 2022)"

    def __init__(self, config, meta, news_encoder):
        super().__init__(config, meta, news_encoder)
        k, dc = config.mins_channel_num, config.mins_channel_dim
        self.k, self.dc = k, dc
        self.mhsa = MultiHeadSelfAttention(self.news_dim, k, dc)
        self.grus = nn.ModuleList(nn.GRU(dc, dc, batch_first=True) for _ in range(k))  # one per channel
        self.out = nn.Linear(k * dc, self.news_dim) if k * dc != self.news_dim else nn.Identity()
        self.dropout = nn.Dropout(config.dropout_rate)

    def contextual(self, inp):
        """history [B, H, D] -> [B, H, D]: every channel's GRU state at each position, concatenated."""
        return self.out(self.channel_states(inp))

    def channel_states(self, inp: UserInputs) -> torch.Tensor:
        """history [B, H, D] -> [B, H, K*Dc]: the GRU states (a GRU is causal and histories are left-aligned, so
        padding after the last click never reaches a real state)."""
        b, h, _ = inp.history.shape
        x = self.dropout(self.mhsa(self.dropout(inp.history), inp.history_mask)).view(b, h, self.k, self.dc)
        return torch.cat([gru(x[:, :, i])[0] for i, gru in enumerate(self.grus)], -1)  # [B, H, K*Dc]

    def forward(self, inp):
        """history [B, H, D], history_mask [B, H] -> user [B, D]; an empty history gives the projection of zeros."""
        return UserOutput(user=self.out(last_valid(self.channel_states(inp), inp.history_mask)))


# ------------------------------------------------------------------------------------------------------------
# PP-Rec (issue 25): popularity-aware scoring from the impression time (popularity.py computes the inputs).
# ------------------------------------------------------------------------------------------------------------

@dataclass
class PPRecSettings(Settings):
    """PP-Rec's popularity inputs and heads (the official Keras code's sizes)."""

    title: ClassVar[str] = "PP-Rec"
    pprec_ctr_window: int = setting(
        0, "PP-Rec: hours of train clicks and impressions before the impression's hour that its CTRs count (1 = the "
           "paper's last hour; 0 = every train hour before it, which dev/test impressions after the train period need)",
        check=at_least(0))
    pprec_ctr_weight: float = setting(19.0, "PP-Rec: initial value of the learnable CTR weight w (score w * CTR)",
                                      architecture=False)
    pprec_ctr_buckets: int = setting(200, "PP-Rec: a clicked news' CTR is embedded as bucket min(CTR * buckets, "
                                          "buckets - 1) in the popularity-aware user attention", check=at_least(1))
    pprec_ctr_dim: int = setting(400, "PP-Rec: size of the CTR-bucket embedding", check=at_least(1))
    pprec_age_buckets: int = setting(1500, "PP-Rec: recency embedding rows; a candidate's age in hours since its "
                                           "first exposure is capped at buckets - 1", check=at_least(1))
    pprec_age_dim: int = setting(100, "PP-Rec: size of the recency (age) embedding", check=at_least(1))


def mlp(sizes: tuple[int, ...], last_bias: bool = True) -> nn.Sequential:
    """Dense layers of `sizes` with tanh between them (none after the last), as PP-Rec's Keras heads."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        last = i == len(sizes) - 2
        layers.append(nn.Linear(a, b, bias=last_bias or not last))
        if not last:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


@register_user_encoder("PPRec")
class PPRecUserEncoder(UserEncoder):
    """PP-Rec: score = 2η·(u·n) + 2(1−η)·(s_content + w·CTR), with the activity gate η = sigmoid(MLP(u)), a
    recency-gated content popularity s_content of each candidate and its time-aware train CTR.

    Qi et al., "PP-Rec: News Recommendation with Personalized User Interest and Time-aware News Popularity", ACL 2021.
    u: self-attention over the clicked news, pooled by an attention whose scores read [h_i; embedding of the clicked
    news' CTR bucket] (popularity-aware user modelling). Returns logits (the dot product is part of the score), so
    it pairs only with --click_predictor=dot_product. docs/models.md lists how it differs from the paper."""

    settings = (PPRecSettings, MHSASettings)

    candidate_aware = True  # the score reads each candidate's popularity
    needs_popularity = True
    compatible_click_predictors = ("dot_product",)
    paper = "PP-Rec (Qi et al., ACL 2021)"

    def __init__(self, config, meta, news_encoder):
        super().__init__(config, meta, news_encoder)
        d = self.news_dim
        self.mhsa, self.project = history_self_attention(d, config)
        self.ctr_buckets, self.age_buckets = config.pprec_ctr_buckets, config.pprec_age_buckets
        self.ctr_embedding = nn.Embedding(config.pprec_ctr_buckets, config.pprec_ctr_dim)
        # Over [h_i; CTR embedding]; no last bias: the softmax cancels it.
        self.attention = mlp((d + config.pprec_ctr_dim, config.attention_dim, 1), last_bias=False)
        self.activity_gate = mlp((d, 64, 1))
        # 256-256-128-1 with no tanh after the 128 layer, as the official code.
        self.content_popularity = nn.Sequential(mlp((d, 256, 256, 128)), nn.Linear(128, 1, bias=False))
        self.age_embedding = nn.Embedding(config.pprec_age_buckets, config.pprec_age_dim)
        self.recency_popularity = mlp((config.pprec_age_dim, 64, 64, 1), last_bias=False)
        self.recency_gate = mlp((d + config.pprec_age_dim, 128, 64, 1))
        self.ctr_weight = nn.Parameter(torch.tensor(float(config.pprec_ctr_weight)))
        self.dropout = nn.Dropout(config.dropout_rate)

    def user_vector(self, inp: UserInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """history [B, H, D], history_ctr [B, H] -> user [B, D], attention [B, H] (zeros for an empty history)."""
        h = self.project(self.dropout(self.mhsa(inp.history, inp.history_mask)))  # [B, H, D]
        bucket = (inp.history_ctr * self.ctr_buckets).long().clamp(0, self.ctr_buckets - 1)
        query = self.dropout(torch.cat([h, self.ctr_embedding(bucket)], -1))  # [B, H, D + Ec]
        alpha = masked_softmax(self.attention(query).squeeze(-1), inp.history_mask, dim=-1)  # padding -> exactly 0
        return (alpha.unsqueeze(-1) * h).sum(1), alpha

    def popularity(self, candidates: torch.Tensor, ctr: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
        """candidates [B, C, D], ctr [B, C], age [B, C] hours -> [B, C]: s_content + w·CTR."""
        age_vec = self.age_embedding(age.clamp(0, self.age_buckets - 1))  # [B, C, Ea]
        content = self.content_popularity(candidates).squeeze(-1)
        recency = self.recency_popularity(age_vec).squeeze(-1)
        gate = torch.sigmoid(self.recency_gate(torch.cat([candidates, age_vec], -1))).squeeze(-1)
        return (1 - gate) * content + gate * recency + self.ctr_weight * ctr

    def forward(self, inp):
        """history [B, H, D], history_mask [B, H], history_ctr [B, H], candidates [B, C, D], candidate_ctr [B, C],
        candidate_age [B, C] -> logits [B, C]."""
        user, alpha = self.user_vector(inp)
        eta = torch.sigmoid(self.activity_gate(user))  # [B, 1]: how much the user's own interest decides
        personal = (inp.candidates * user.unsqueeze(1)).sum(-1)  # [B, C]
        popular = self.popularity(inp.candidates, inp.candidate_ctr, inp.candidate_age)
        logits = 2 * eta * personal + 2 * (1 - eta) * popular
        return UserOutput(logits=logits, attention={"history": alpha})


@register_user_encoder("GLORY")
class GLORYUserEncoder(UserEncoder):
    """GLORY's user side: each clicked news' [local; graph] vectors fused by attention pooling (the click fusion),
    then multi-head self-attention and attention pooling over the clicks -> user [B, D/2]; each candidate's local
    half through Linear + LeakyReLU(0.2) (the candidate encoder; no graph: a candidate may be new news) -> the
    candidate vectors the click predictor scores (`UserOutput.candidates`).

    Yang et al., RecSys 2023. Pairs only with the GLORY news encoder (its [local; graph] vectors). The entity views
    of both encoders are not built (docs/models.md)."""

    settings = (MHSASettings,)

    paper = "GLORY (Yang et al., RecSys 2023)"
    compatible_news_encoders = ("GLORY",)

    def __init__(self, config, meta, news_encoder):
        super().__init__(config, meta, news_encoder)
        if self.news_dim % 2:
            raise ValueError(f"--user_encoder GLORY reads [local; graph] news vectors; got odd size {self.news_dim}")
        d = self.news_dim // 2
        self.output_dim = d
        self.fusion = AdditiveAttention(d, config.attention_dim)
        self.mhsa, self.project = history_self_attention(d, config)
        self.attention = AdditiveAttention(d, config.attention_dim)
        self.candidate = nn.Linear(d, d)
        self.dropout = nn.Dropout(config.dropout_rate)

    def clicked(self, history: torch.Tensor) -> torch.Tensor:
        """history [B, H, 2d] ([local; graph]) -> [B, H, d]: attention pooling over the two views of each click."""
        b, h, _ = history.shape
        return self.fusion(history.reshape(b * h, 2, self.output_dim)).view(b, h, self.output_dim)

    def forward(self, inp):
        """history [B, H, 2d], history_mask [B, H], candidates [B, C, 2d] -> user [B, d], candidates [B, C, d]"""
        x = self.dropout(self.clicked(inp.history))  # [B, H, d]
        x = self.project(self.dropout(self.mhsa(x, inp.history_mask)))
        user, weights = self.attention(x, inp.history_mask, return_weights=True)
        candidates = None
        if inp.candidates is not None:
            local = inp.candidates[..., :self.output_dim]  # [B, C, d]
            candidates = F.leaky_relu(self.candidate(self.dropout(local)), 0.2)
        return UserOutput(user=user, candidates=candidates, attention={"history": weights})
