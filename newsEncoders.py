"""News encoders: news features gathered by index -> one vector per news.

Legend: N news in the call (unique news of a batch, or a slice of the corpus at evaluation), L title tokens (32),
La abstract tokens (128), E word embedding dim, F CNN filters, D news vector dim.

Every encoder receives `news`, a dict of tensors gathered from the model's news table by index; it names the
columns it reads in `features` so the model gathers only those. Index 0 of every vocabulary is padding.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import AdditiveAttention, MultiHeadSelfAttention

if TYPE_CHECKING:  # encoders never import config at run time (import DAG, STYLE.md §1)
    from config import Config
    from MIND_corpus import CorpusMeta

NEWS_ENCODERS: dict[str, type["NewsEncoder"]] = {}


def register_news_encoder(name: str):
    def wrap(cls):
        if name in NEWS_ENCODERS:
            raise ValueError(f"news encoder {name!r} registered twice")
        cls.name = name
        NEWS_ENCODERS[name] = cls
        return cls

    return wrap


def get_news_encoder(name: str) -> type["NewsEncoder"]:
    try:
        return NEWS_ENCODERS[name]
    except KeyError:
        raise ValueError(f"unknown --news_encoder {name!r}; choose from {sorted(NEWS_ENCODERS)}") from None


class NewsEncoder(nn.Module):
    """Base class. Subclasses set `output_dim` and implement `forward(news) -> [N, D]`."""

    name = "base"
    features: tuple[str, ...] = ("title",)  # news-table columns this encoder reads
    personalized = False  # True when the vector depends on the user (NPA): no sharing of news across users
    needs_glove = True  # False for encoders without a word embedding (PLM): training skips loading GloVe
    paper = ""

    def __init__(self, config: "Config", meta: "CorpusMeta"):
        super().__init__()
        self.output_dim: int = 0
        # Encoders that own a category embedding expose it here so MINER's category-aware attention can read
        # it (PLMMiner's design); others leave it None and the model provides one.
        self.category_embedding: nn.Embedding | None = None

    def forward(self, news: dict[str, torch.Tensor], user_id: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


def word_embedding(config: "Config", meta: "CorpusMeta") -> nn.Embedding:
    """Word embedding initialised from the corpus' GloVe matrix (fine-tuned, as in NNR); row 0 = <PAD> = 0."""
    emb = nn.Embedding(meta.vocab_size, config.word_embedding_dim, padding_idx=0)
    if meta.word_embeddings is not None:
        if meta.word_embeddings.shape != (meta.vocab_size, config.word_embedding_dim):
            raise ValueError(
                f"word embedding matrix has shape {meta.word_embeddings.shape}, expected "
                f"{(meta.vocab_size, config.word_embedding_dim)}"
            )
        emb.weight.data.copy_(torch.from_numpy(np.array(meta.word_embeddings, dtype=np.float32)))
    emb.weight.data[0].zero_()
    return emb


class CNNTextEncoder(nn.Module):
    """Embedding -> dropout -> Conv1d(window) -> ReLU -> dropout -> masked additive attention.

    Padded tokens embed to zero, so the convolution at real positions sees the same zeros it would see from its
    own boundary padding: outputs are invariant to extra padding (L can be trimmed or extended).
    """

    def __init__(self, embedding: nn.Embedding, filters: int, window: int, attention_dim: int, dropout: float):
        super().__init__()
        self.embedding = embedding
        self.conv = nn.Conv1d(embedding.embedding_dim, filters, window, padding=window // 2)
        self.attention = AdditiveAttention(filters, attention_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor, return_weights: bool = False):
        """tokens [N, L] -> [N, F]"""
        mask = tokens > 0
        x = self.dropout(self.embedding(tokens))  # [N, L, E]
        x = F.relu(self.conv(x.transpose(1, 2))).transpose(1, 2)  # [N, L, F]
        x = self.dropout(x)
        return self.attention(x, mask, return_weights=return_weights)


@register_news_encoder("MHSA")
class MHSANewsEncoder(NewsEncoder):
    """NRMS news encoder: word embeddings -> multi-head self-attention -> additive attention.

    Wu et al., "Neural News Recommendation with Multi-Head Self-Attention", EMNLP 2019.
    """

    paper = "NRMS (Wu et al., EMNLP 2019)"
    features = ("title",)

    def __init__(self, config, meta):
        super().__init__(config, meta)
        self.embedding = word_embedding(config, meta)
        self.mhsa = MultiHeadSelfAttention(config.word_embedding_dim, config.head_num, config.head_dim)
        self.output_dim = config.head_num * config.head_dim
        self.attention = AdditiveAttention(self.output_dim, config.attention_dim)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, news, user_id=None, return_weights: bool = False):
        """
        Args:
            news["title"]: [N, L] int token ids (0 = pad).
        Returns:
            [N, D] with D = head_num * head_dim (and [N, L] word weights when asked).
        """
        tokens = news["title"]
        mask = tokens > 0
        x = self.dropout(self.embedding(tokens))  # [N, L, E]
        x = self.dropout(self.mhsa(x, mask))  # [N, L, D]
        return self.attention(x, mask, return_weights=return_weights)


@register_news_encoder("CNN")
class CNNNewsEncoder(NewsEncoder):
    """LSTUR news encoder: title CNN (F filters, window 3) + additive attention.

    An et al., "Neural News Recommendation with Long- and Short-term User Representations", ACL 2019.
    """

    paper = "LSTUR (An et al., ACL 2019)"
    features = ("title",)

    def __init__(self, config, meta):
        super().__init__(config, meta)
        self.title = CNNTextEncoder(
            word_embedding(config, meta), config.cnn_kernel_num, config.cnn_window_size,
            config.attention_dim, config.dropout_rate,
        )
        self.output_dim = config.cnn_kernel_num

    def forward(self, news, user_id=None, return_weights: bool = False):
        """news["title"]: [N, L] -> [N, F]"""
        return self.title(news["title"], return_weights=return_weights)


@register_news_encoder("NAML")
class NAMLNewsEncoder(NewsEncoder):
    """NAML: title CNN+attention, abstract CNN+attention, category and subcategory views, view attention.

    Wu et al., "Neural News Recommendation with Attentive Multi-View Learning", IJCAI 2019.
    Word attention is masked (the reference code attends over padded words).
    """

    paper = "NAML (Wu et al., IJCAI 2019)"
    features = ("title", "abstract", "category", "subcategory")
    use_title = True
    use_abstract = True

    def __init__(self, config, meta):
        super().__init__(config, meta)
        emb = word_embedding(config, meta)  # shared between title and abstract, as in NAML
        f = config.cnn_kernel_num
        if self.use_title:
            self.title = CNNTextEncoder(emb, f, config.cnn_window_size, config.attention_dim, config.dropout_rate)
        if self.use_abstract:
            self.abstract = CNNTextEncoder(emb, f, config.cnn_window_size, config.attention_dim, config.dropout_rate)
        self.category_embedding = nn.Embedding(meta.category_num, config.category_embedding_dim, padding_idx=0)
        self.subcategory_embedding = nn.Embedding(
            meta.subcategory_num, config.subcategory_embedding_dim, padding_idx=0
        )
        self.category_dense = nn.Linear(config.category_embedding_dim, f)
        self.subcategory_dense = nn.Linear(config.subcategory_embedding_dim, f)
        self.view_attention = AdditiveAttention(f, config.attention_dim)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.output_dim = f

    def forward(self, news, user_id=None):
        """
        Args:
            news: title [N, L], abstract [N, La], category [N], subcategory [N] (int).
        Returns:
            [N, F]
        """
        views = []
        if self.use_title:
            views.append(self.title(news["title"]))  # [N, F]
        if self.use_abstract:
            views.append(self.abstract(news["abstract"]))
        views.append(F.relu(self.category_dense(self.dropout(self.category_embedding(news["category"])))))
        views.append(F.relu(self.subcategory_dense(self.dropout(self.subcategory_embedding(news["subcategory"])))))
        return self.view_attention(torch.stack(views, dim=1))  # [N, V, F] -> [N, F]
