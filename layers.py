"""Shared attention blocks used by news and user encoders.

Legend: N items (news or users), L sequence length (tokens or history), E input dim, A attention dim,
Hd heads, Dh head dim, D output dim.

Every softmax here masks padding with -inf before normalising: a padded position must receive exactly zero
weight, so outputs are invariant to how much padding a batch carries. A row whose positions are *all* padded
(an empty history) would give NaN after a -inf softmax; `masked_softmax` returns zeros for such rows instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from settings import Settings, at_least, setting


class AttentionRecorder:
    """Collects the attention weights of a forward pass, named by module path (`--mode=explain`).

    Modules call `record(self, name, weights, axes)`; that is a no-op unless a recorder is active, so training and
    evaluation pay one global check. `axes` names each dimension of `weights` (e.g. ("news", "word") or
    ("impression", "history", "candidate", "interest")) so the picture can label them without knowing the model.

        with AttentionRecorder(model) as rec:
            model(...)
        rec.maps  # {"news_encoder.attention/weights": (tensor, axes), ...}
    """

    def __init__(self, model: nn.Module):
        self.paths = {id(m): name for name, m in model.named_modules()}
        self.maps: dict[str, tuple[torch.Tensor, tuple[str, ...]]] = {}

    def add(self, module: nn.Module, name: str, weights: torch.Tensor, axes: tuple[str, ...]) -> None:
        key = f"{self.paths.get(id(module), type(module).__name__)}/{name}"
        weights = weights.detach().float().cpu()
        if key in self.maps and "candidate" in axes:  # an encoder that scores candidates in chunks
            weights = torch.cat([self.maps[key][0], weights], dim=axes.index("candidate"))
        self.maps[key] = (weights, tuple(axes))

    def clear(self) -> None:
        self.maps = {}

    def __enter__(self) -> "AttentionRecorder":
        global _RECORDER
        _RECORDER = self
        return self

    def __exit__(self, *exc) -> None:
        global _RECORDER
        _RECORDER = None


_RECORDER: AttentionRecorder | None = None


def recording() -> bool:
    """True inside `with AttentionRecorder(...)`: encoders then keep attention they would otherwise free."""
    return _RECORDER is not None


def record(module: nn.Module, name: str, weights: torch.Tensor, axes: tuple[str, ...]) -> None:
    """Hand `weights` to the active AttentionRecorder, if any (explain mode); free otherwise."""
    if _RECORDER is not None:
        _RECORDER.add(module, name, weights, axes)


class Registry(dict):
    """A name -> class table filled by a decorator (`@REGISTRY.register("NAME")`); the one source of truth for
    argparse `choices` and for lookups. Unknown names get an error listing the valid ones."""

    def __init__(self, kind: str, flag: str):
        super().__init__()
        self.kind, self.flag = kind, flag

    def register(self, name: str):
        def wrap(cls):
            if name in self:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            cls.name = name
            self[name] = cls
            return cls

        return wrap

    def lookup(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise ValueError(f"unknown {self.flag} {name!r}; choose from {sorted(self)}") from None


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor | None, dim: int = -1) -> torch.Tensor:
    """Softmax over `dim` where `mask` is False -> exactly 0; all-masked rows -> all zeros (not NaN).

    Args:
        logits: any shape, float.
        mask: bool, broadcastable to `logits`; True = real position. None = no padding.
    """
    if mask is None:
        return torch.softmax(logits, dim=dim)
    mask = mask.expand_as(logits)
    logits = logits.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(logits, dim=dim)
    # softmax of an all -inf row is NaN; an empty history has nothing to attend to, so it contributes 0.
    return weights.masked_fill(~mask, 0.0)


class AdditiveAttention(nn.Module):
    """Additive (Bahdanau-style) attention pooling: a = softmax(q . tanh(W x + b)), out = sum a x.

    Used by NRMS/NAML/LSTUR for word and news pooling (Wu et al., 2019).
    """

    def __init__(self, feature_dim: int, attention_dim: int):
        super().__init__()
        self.proj = nn.Linear(feature_dim, attention_dim)
        self.query = nn.Parameter(torch.empty(attention_dim))
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        nn.init.uniform_(self.query, -0.1, 0.1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, return_weights: bool = False):
        """
        Args:
            x: [N, L, E] float.
            mask: [N, L] bool, True = real.
        Returns:
            [N, E] pooled vectors (and [N, L] weights when `return_weights`).
        """
        scores = torch.tanh(self.proj(x)) @ self.query  # [N, L]
        weights = masked_softmax(scores, mask, dim=-1)
        record(self, "weights", weights, ("item", "position"))
        out = torch.bmm(weights.unsqueeze(1), x).squeeze(1)  # [N, E]
        return (out, weights) if return_weights else out


class QueryAttention(nn.Module):
    """Attention with an externally supplied query per row (NPA's personalized attention, CATT/DKN).

    score_l = q . tanh(W x_l + b)
    """

    def __init__(self, feature_dim: int, query_dim: int):
        super().__init__()
        self.proj = nn.Linear(feature_dim, query_dim)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, query: torch.Tensor, mask: torch.Tensor | None = None):
        """
        Args:
            x: [N, L, E]; query: [N, Q]; mask: [N, L] bool.
        Returns:
            [N, E]
        """
        scores = torch.bmm(torch.tanh(self.proj(x)), query.unsqueeze(2)).squeeze(2)  # [N, L]
        weights = masked_softmax(scores, mask, dim=-1)
        record(self, "weights", weights, ("item", "position"))
        return torch.bmm(weights.unsqueeze(1), x).squeeze(1)


@dataclass
class MHSASettings(Settings):
    """Multi-head self-attention size (NRMS's news and user encoders, PLM-NRMS)."""

    title: ClassVar[str] = "multi-head self-attention"
    head_num: int = setting(20, "self-attention heads (MHSA)", check=at_least(1))
    head_dim: int = setting(20, "self-attention head dim (MHSA)", check=at_least(1))


class MultiHeadSelfAttention(nn.Module):
    """NRMS multi-head self-attention (Wu et al., EMNLP 2019): Hd heads of size Dh, output Hd*Dh.

    Keys that are padding are masked with -inf, so padded positions never influence real ones. Rows of padded
    queries still get an output (they attend to real keys); callers mask them out in the pooling step.
    """

    def __init__(self, input_dim: int, head_num: int, head_dim: int, dropout: float = 0.0):
        super().__init__()
        self.head_num, self.head_dim = head_num, head_dim
        out_dim = head_num * head_dim
        self.q = nn.Linear(input_dim, out_dim)
        self.k = nn.Linear(input_dim, out_dim)
        self.v = nn.Linear(input_dim, out_dim)
        self.dropout = dropout
        for lin in (self.q, self.k, self.v):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, return_weights: bool = False):
        """
        Args:
            x: [N, L, E]; mask: [N, L] bool, True = real.
        Returns:
            [N, L, Hd*Dh] (and [N, Hd, L, L] weights when asked).
        """
        n, l, _ = x.shape

        def split(t):  # [N, L, Hd*Dh] -> [N, Hd, L, Dh]
            return t.view(n, l, self.head_num, self.head_dim).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        if not return_weights:
            # The fused kernel: same maths, several times faster. A row whose keys are all padding would get
            # NaN there, so such rows attend to their first (padding) key instead; callers pool with the
            # original mask, so those outputs never reach a real vector.
            attn_mask = None
            if mask is not None:
                safe = mask.clone()
                safe[:, 0] |= ~mask.any(1)
                attn_mask = safe[:, None, None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                                 dropout_p=self.dropout if self.training else 0.0)
            return out.transpose(1, 2).reshape(n, l, self.head_num * self.head_dim)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # [N, Hd, L, L]
        key_mask = None if mask is None else mask[:, None, None, :]
        weights = masked_softmax(scores, key_mask, dim=-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, self.dropout)
        out = (weights @ v).transpose(1, 2).reshape(n, l, self.head_num * self.head_dim)
        return (out, weights) if return_weights else out


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None, dim: int = 1) -> torch.Tensor:
    """Mean over real positions only; all-padded rows give zeros.

    Args:
        x: [N, L, E]; mask: [N, L] bool.
    """
    if mask is None:
        return x.mean(dim)
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1.0)


def last_valid(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Output of the last real position of each row (histories are left-aligned: real items, then padding).

    Args:
        x: [N, L, E]; mask: [N, L] bool.
    Returns:
        [N, E]; rows with no real position give zeros.
    """
    lengths = mask.sum(1)  # [N]
    idx = (lengths - 1).clamp(min=0)
    out = x[torch.arange(x.size(0), device=x.device), idx]
    return out * (lengths > 0).unsqueeze(-1).to(x.dtype)


@dataclass
class FastformerSettings(Settings):
    """Fastformer's layers (Wu et al., 2021): the news encoder over words, the user encoder over the history and the
    PLM variant share these (the official fastformer.json: 16 heads, 2 layers, FFN 256)."""

    title: ClassVar[str] = "Fastformer"
    fastformer_head_num: int = setting(16, "Fastformer: additive-attention heads", check=at_least(1))
    fastformer_layer_num: int = setting(2, "Fastformer: layers", check=at_least(1))
    fastformer_ffn_dim: int = setting(256, "Fastformer: feed-forward inner size", check=at_least(1))


@dataclass
class FastformerSizeSettings(Settings):
    """Fastformer's hidden size where the encoder chooses it (over words, over the history); PLMFastformer runs at
    the PLM's hidden size instead, as PLM-NRMS does."""

    title: ClassVar[str] = "Fastformer size"
    fastformer_hidden_dim: int = setting(256, "Fastformer: hidden size, a multiple of --fastformer_head_num (the "
                                              "official 256); not PLMFastformer, which keeps the PLM's size",
                                         check=at_least(1))


class FastformerAttention(nn.Module):
    """Fastformer's additive attention (Wu et al., "Fastformer: Additive Attention Can Be All You Need", 2021).

    Per head: a global query g = sum_i softmax_i(w_q . q_i / sqrt(Dh)) q_i; p_i = g * k_i; a global key
    k = sum_i softmax_i(w_k . p_i / sqrt(Dh)) p_i; output W_o(k * q_i) + q_i. The query is reused as the value, as
    in the official code (the paper draws a separate value projection). Linear in L: no [L, L] matrix.
    Both softmaxes mask padding with -inf, so padded tokens shape no global vector; padded positions still get an
    output (from the global vectors), which the caller's pooling masks.
    """

    def __init__(self, dim: int, head_num: int, dim_name: str = "--fastformer_hidden_dim"):
        super().__init__()
        if dim % head_num:
            raise ValueError(f"{dim_name} {dim} is not a multiple of --fastformer_head_num {head_num}; "
                             f"choose sizes that divide")
        self.head_num, self.head_dim = head_num, dim // head_num
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.query_att = nn.Linear(dim, head_num)  # w_q of every head at once
        self.key_att = nn.Linear(dim, head_num)
        self.transform = nn.Linear(dim, dim)  # W_o

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, L, E=dim], mask [N, L] bool (True = real) -> [N, L, dim]"""
        n, l, dim = x.shape
        heads = self.head_num
        scale = 1.0 / math.sqrt(self.head_dim)
        head_mask = None if mask is None else mask.unsqueeze(-1)  # [N, L, 1] broadcast over heads
        q, k = self.query(x), self.key(x)  # [N, L, dim]
        alpha = masked_softmax(self.query_att(q) * scale, head_mask, dim=1)  # [N, L, Hd]
        record(self, "query", alpha.permute(0, 2, 1), ("item", "head", "position"))
        q_heads = q.view(n, l, heads, self.head_dim)
        global_query = torch.einsum("nlh,nlhd->nhd", alpha, q_heads).reshape(n, 1, dim)  # [N, 1, dim]
        p = k * global_query  # [N, L, dim]
        beta = masked_softmax(self.key_att(p) * scale, head_mask, dim=1)  # [N, L, Hd]
        global_key = torch.einsum("nlh,nlhd->nhd", beta, p.view(n, l, heads, self.head_dim)).reshape(n, 1, dim)
        return self.transform(global_key * q) + q  # [N, L, dim]


class FastformerLayer(nn.Module):
    """One Fastformer block: additive attention, then a GELU feed-forward, each with a residual connection.

    No LayerNorm and no position embedding: the authors' README reports that news recommendation works better
    without them (the official BERT-style block has both; docs/models.md lists this difference)."""

    def __init__(self, dim: int, head_num: int, ffn_dim: int, dropout: float, dim_name: str):
        super().__init__()
        self.attention = FastformerAttention(dim, head_num, dim_name)
        self.output = nn.Linear(dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, L, dim], mask [N, L] -> [N, L, dim]"""
        x = x + self.dropout(self.output(self.attention(x, mask)))
        return x + self.dropout(self.ffn(x))


class Fastformer(nn.Module):
    """Input projection (when the input size differs from the hidden size), Fastformer layers, masked additive
    attention pooling: [N, L, E] -> [N, hidden] (the official news and user encoders' shape). `hidden`: the
    --fastformer_hidden_dim where the encoder reads it; the PLM's size for PLMFastformer (`hidden_name` says which
    in errors)."""

    def __init__(self, input_dim: int, config, attention_dim: int, hidden: int, hidden_name: str):
        super().__init__()
        dim = hidden
        self.project = nn.Linear(input_dim, dim) if input_dim != dim else nn.Identity()
        self.layers = nn.ModuleList(
            FastformerLayer(dim, config.fastformer_head_num, config.fastformer_ffn_dim, config.dropout_rate,
                            hidden_name)
            for _ in range(config.fastformer_layer_num))
        self.pool = AdditiveAttention(dim, attention_dim)
        self.output_dim = dim
        for module in self.layers.modules():  # the official initialisation (BERT's: normal(0, 0.02), zero bias)
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def states(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, L, E], mask [N, L] bool -> [N, L, hidden]: every position after the last layer."""
        x = self.project(x)  # [N, L, hidden]
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, return_weights: bool = False):
        """x [N, L, E], mask [N, L] bool -> [N, hidden] (and [N, L] pooling weights when asked)"""
        return self.pool(self.states(x, mask), mask, return_weights=return_weights)
