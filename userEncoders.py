"""User encoders: encoded history (and, for candidate-aware ones, candidates) -> user vector(s) or scores.

Legend: B impressions/samples, H history items (50), C candidates (1+K in training), D news vector dim,
K interest vectors (MINER).

A user encoder sees flat, already-encoded tensors (`UserInputs`), never raw news: that is what lets the
evaluation encode every news once and reuse the vectors. Encoders whose output depends on the candidates set
`candidate_aware = True`; the evaluation then calls them per chunk of candidates, still on cached vectors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import AdditiveAttention, MultiHeadSelfAttention, last_valid, masked_softmax
from newsEncoders import make_category_embedding

if TYPE_CHECKING:
    from config import Config
    from MIND_corpus import CorpusMeta
    from newsEncoders import NewsEncoder

USER_ENCODERS: dict[str, type["UserEncoder"]] = {}


def register_user_encoder(name: str):
    def wrap(cls):
        if name in USER_ENCODERS:
            raise ValueError(f"user encoder {name!r} registered twice")
        cls.name = name
        USER_ENCODERS[name] = cls
        return cls

    return wrap


def get_user_encoder(name: str) -> type["UserEncoder"]:
    try:
        return USER_ENCODERS[name]
    except KeyError:
        raise ValueError(f"unknown --user_encoder {name!r}; choose from {sorted(USER_ENCODERS)}") from None


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


@dataclass
class UserOutput:
    """Either user vectors (scored by the model's click predictor) or logits computed by the encoder itself."""

    user: torch.Tensor | None = None  # [B, D] or, candidate-aware, [B, C, D]
    logits: torch.Tensor | None = None  # [B, C] when the encoder scores candidates itself (MINER max/mean)
    aux: dict[str, torch.Tensor] = field(default_factory=dict)  # weighted auxiliary losses (training)
    attention: dict[str, torch.Tensor] = field(default_factory=dict)  # for explain mode


class UserEncoder(nn.Module):
    """Base class. `forward(UserInputs) -> UserOutput`."""

    name = "base"
    candidate_aware = False  # True: output depends on the candidates
    needs_category = False  # True: UserInputs carry history/candidate category ids (MINER)
    compatible_news_encoders: tuple[str, ...] | None = None  # None = any news encoder
    paper = ""

    def __init__(self, config: "Config", meta: "CorpusMeta", news_encoder: "NewsEncoder"):
        super().__init__()
        self.news_dim = news_encoder.output_dim
        self.output_dim = self.news_dim

    def forward(self, inp: UserInputs) -> UserOutput:
        raise NotImplementedError


@register_user_encoder("MHSA")
class MHSAUserEncoder(UserEncoder):
    """NRMS user encoder: multi-head self-attention over the history, then additive attention.

    Wu et al., EMNLP 2019. Dropout comes from --dropout_rate (the reference hard-codes 0.5) and the pooling is
    masked (the reference pools over padded history).
    """

    paper = "NRMS (Wu et al., EMNLP 2019)"

    def __init__(self, config, meta, news_encoder):
        super().__init__(config, meta, news_encoder)
        d = self.news_dim
        self.mhsa = MultiHeadSelfAttention(d, config.head_num, config.head_dim)
        inner = config.head_num * config.head_dim
        # NRMS has no projection because both sides are 20x20; other news encoders (a 768-d PLM) need one.
        self.project = nn.Linear(inner, d) if inner != d else nn.Identity()
        self.attention = AdditiveAttention(d, config.attention_dim)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, inp):
        """history [B, H, D], history_mask [B, H] -> user [B, D]"""
        x = self.project(self.dropout(self.mhsa(inp.history, inp.history_mask)))  # [B, H, D]
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


@register_user_encoder("LSTUR")
class LSTURUserEncoder(UserEncoder):
    """LSTUR-ini: a GRU over the history whose initial state is the user-ID embedding (long-term interest).

    An et al., ACL 2019. During training the whole user embedding is dropped with probability
    --long_term_masking_probability (the paper's p=0.1), so unseen users (id 0) are handled at test time.
    An empty history returns the long-term embedding itself.
    """

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


@register_user_encoder("MINER")
class MINERUserEncoder(UserEncoder):
    """MINER: K interest vectors from poly attention with a category-aware bias, a disagreement regulariser,
    and weighted / max / mean aggregation of the interests against each candidate.

    Li et al., "MINER: Multi-Interest Matching Network for News Recommendation", ACL 2022 (REFERENCE.md §4).
    Fixes over the public code: padded history gets -inf (exactly zero weight, not 1e-30), and the category
    bias is computed per (history item, candidate) instead of averaged over the candidates.
    """

    candidate_aware = True
    needs_category = True
    paper = "MINER (Li et al., ACL 2022)"

    def __init__(self, config, meta, news_encoder):
        super().__init__(config, meta, news_encoder)
        d, k, dc = self.news_dim, config.num_interest_vectors, config.context_code_dim
        self.k, self.dc = k, dc
        self.project = nn.Linear(d, dc, bias=False)  # W_h
        self.codes = nn.Parameter(torch.empty(k, dc))  # context codes c_k
        nn.init.orthogonal_(self.codes)
        self.category_lambda = nn.Parameter(torch.tensor(float(config.category_aware_lambda)))
        shared = getattr(news_encoder, "category_embedding", None)
        if shared is None:  # word-based news encoders: MINER owns a corpus category embedding
            shared = make_category_embedding(config, meta)
        self.category_embedding = shared
        self.aggregation = config.miner_aggregation
        if self.aggregation == "weighted":
            self.score_project = nn.Linear(d, d)  # W_e
        self.beta = config.disagreement_beta
        # Bound the [B, H, C, K] attention tensor when impressions have hundreds of candidates.
        self.max_elements = 1 << 24

    def interests(self, inp: UserInputs, candidates: torch.Tensor, candidate_category: torch.Tensor) -> torch.Tensor:
        """Interest vectors per candidate.

        Args: history [B, H, D], history_mask [B, H], candidates [B, C, D], categories [B, H] / [B, C].
        Returns: v [B, C, K, D] (zeros for an empty history).
        """
        h = inp.history
        logits = torch.tanh(self.project(h)) @ self.codes.t() / math.sqrt(self.dc)  # [B, H, K]
        eh = F.normalize(self.category_embedding(inp.history_category), dim=-1)  # [B, H, Ec]
        ec = F.normalize(self.category_embedding(candidate_category), dim=-1)  # [B, C, Ec]
        bias = eh @ ec.transpose(1, 2)  # [B, H, C] cosine of categories
        logits = logits.unsqueeze(2) + self.category_lambda * bias.unsqueeze(-1)  # [B, H, C, K]
        mask = inp.history_mask[:, :, None, None].expand_as(logits)
        alpha = masked_softmax(logits, mask, dim=1)  # over history; padded items get exactly 0
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
        for start in range(0, c, step):
            cand = inp.candidates[:, start:start + step]  # [B, c, D]
            v = self.interests(inp, cand, inp.candidate_category[:, start:start + step])  # [B, c, K, D]
            if self.training and self.beta > 0:
                sim = self.disagreement(v)  # [B, c]
                real = inp.candidate_mask[:, start:start + step] & inp.history_mask.any(1, keepdim=True)
                disagreement.append((sim * real, real))
            if self.aggregation == "weighted":
                query = F.gelu(self.score_project(cand))  # [B, c, D]
                weights = torch.softmax((v * query.unsqueeze(2)).sum(-1), dim=-1)  # [B, c, K]
                users.append((weights.unsqueeze(-1) * v).sum(2))  # [B, c, D]
            else:
                per_interest = (v * cand.unsqueeze(2)).sum(-1)  # [B, c, K]
                logits.append(per_interest.max(-1).values if self.aggregation == "max" else per_interest.mean(-1))
        aux = {}
        if disagreement:
            total = sum(s.sum() for s, _ in disagreement)
            count = sum(r.sum() for _, r in disagreement).clamp(min=1)
            aux["disagreement"] = self.beta * total / count
        if users:
            return UserOutput(user=torch.cat(users, 1), aux=aux)
        return UserOutput(logits=torch.cat(logits, 1), aux=aux)
