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
