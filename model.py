"""The recommender: news encoder + user encoder (from the registries) + click predictor + loss.

Legend: B batch, H history (50), C candidates (1+K in training), D news dim, U unique news in a batch,
N news in the corpus table.

The news feature table (token ids, categories, ...) lives on the model's device as non-persistent buffers, so a
batch carries only news indices. `forward` encodes each unique news of the batch once (history and candidates
share the work); evaluation encodes every needed news once for the whole split (`encode_news`) and then scores
impressions from those cached vectors (`score`), never re-encoding history per candidate.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dataset import Batch
from layers import Registry
from newsEncoders import NEWS_ENCODERS, get_news_encoder
from popularity import PopularityLookup, PopularityTable
from settings import ComponentView, SharedDims, component_settings
from userEncoders import USER_ENCODERS, UserInputs, UserOutput, get_user_encoder

if TYPE_CHECKING:
    from config import Config
    from MIND_corpus import CorpusMeta


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, C] float; padded candidates are -inf
    loss: torch.Tensor | None = None  # scalar: cross-entropy + weighted auxiliary losses (training)
    aux: dict[str, torch.Tensor] = field(default_factory=dict)  # each auxiliary loss, already weighted


class NewsSource:
    """Every news of the corpus, as a news encoder's `prepare` sees it: the feature columns, a length order and the
    model's own news encoding (to check what it caches against the uncached path).

    Attributes: num (N), device, cache_dir (where on-disk stores go: --cache_dir, else <data_dir>/cache)."""

    def __init__(self, model: "Model"):
        self._model = model
        self.num = model.news_num
        cfg = model.config
        self.cache_dir = Path(getattr(cfg, "cache_dir", None) or Path(cfg.data_dir) / "cache")
        self.device = next(iter(model.buffers())).device

    def column(self, name: str) -> torch.Tensor:
        """The full column [N, ...] of a feature the encoder reads (e.g. plm_ids [N, L])."""
        return getattr(self._model, f"news_{name}")

    def length_order(self) -> torch.Tensor:
        """[N] news sorted by text length (stable): chunks of similar length carry little padding."""
        return self._model.length_order(torch.arange(self.num, device=self.device))

    def encode(self, index: torch.Tensor) -> torch.Tensor:
        """index [n] -> [n, D]: the model's news vectors, through `news_features` (cached features included)."""
        return self._model.encode_news(index)

CLICK_PREDICTORS: Registry = Registry("click predictor", "--click_predictor")  # name -> ClickPredictor subclass
register_click_predictor = CLICK_PREDICTORS.register


def get_click_predictor(name: str) -> type["ClickPredictor"]:
    return CLICK_PREDICTORS.lookup(name)


class ClickPredictor(nn.Module):
    """user [B, D] or candidate-aware [B, C, D], candidates [B, C, D] -> logits [B, C]."""

    name = "base"
    encoder_scores = False  # True: the user encoder scores the candidates itself (UserOutput.logits)
    settings: tuple = ()  # settings classes whose flags the predictor reads (settings.py); MLP reads only shared ones

    def __init__(self, config: "Config", news_dim: int):
        super().__init__()

    def forward(self, user: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@register_click_predictor("dot_product")
class DotProductClickPredictor(ClickPredictor):
    """score = user . candidate (every paper in the zoo but FIM)."""

    def forward(self, user, candidates):
        """user [B, D] or [B, C, D], candidates [B, C, D] -> [B, C]"""
        if user.dim() == 3:
            return (user * candidates).sum(-1)
        return torch.bmm(candidates, user.unsqueeze(-1)).squeeze(-1)


@register_click_predictor("mlp")
class MLPClickPredictor(ClickPredictor):
    """NNR's mlp predictor: score = w . dropout(ReLU(W [user; candidate] + b)) + c, hidden D // 2.

    W is applied as its user and candidate halves (the same function), so a user vector shared by all candidates
    ([B, D]) is projected once and no [B, C, 2D] concatenation is built."""

    def __init__(self, config, news_dim):
        super().__init__(config, news_dim)
        hidden = max(1, news_dim // 2)
        self.user_proj = nn.Linear(news_dim, hidden)
        self.candidate_proj = nn.Linear(news_dim, hidden, bias=False)
        for layer in (self.user_proj, self.candidate_proj):
            nn.init.xavier_uniform_(layer.weight, gain=nn.init.calculate_gain("relu"))
        nn.init.zeros_(self.user_proj.bias)
        self.out = nn.Linear(hidden, 1)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, user, candidates):
        """user [B, D] or [B, C, D], candidates [B, C, D] -> [B, C]"""
        u = self.user_proj(user)  # [B, Hd] or [B, C, Hd]
        if u.dim() == 2:
            u = u.unsqueeze(1)
        hidden = self.dropout(F.relu(u + self.candidate_proj(candidates)))  # [B, C, Hd]
        return self.out(hidden).squeeze(-1)


@register_click_predictor("FIM")
class EncoderScoresClickPredictor(ClickPredictor):
    """The user encoder scores the candidates itself (FIM's 3-D matching CNN ends in its own scoring layer)."""

    encoder_scores = True

    def forward(self, user, candidates):
        raise RuntimeError("--click_predictor FIM: the user encoder must return logits, not user vectors")


def check_pairing(news_encoder: str, user_encoder: str, click_predictor: str | None = None,
                  config: "Config | None" = None) -> None:
    """The one place where news x user x click predictor pairing rules are enforced (class attributes of the
    encoders; `config` resolves rules that depend on flags, e.g. MINER's --miner_aggregation)."""
    news_cls, user_cls = get_news_encoder(news_encoder), get_user_encoder(user_encoder)
    allowed_news = user_cls.compatible_news_encoders
    if allowed_news is not None and news_encoder not in allowed_news:
        raise ValueError(f"--user_encoder {user_encoder} works only with --news_encoder in {sorted(allowed_news)}")
    allowed_user = news_cls.compatible_user_encoders
    if allowed_user is not None and user_encoder not in allowed_user:
        raise ValueError(f"--news_encoder {news_encoder} works only with --user_encoder in {sorted(allowed_user)}")
    if click_predictor is None:
        return
    predictor_cls = get_click_predictor(click_predictor)
    allowed = user_cls.click_predictors_for(config)
    if allowed is not None and click_predictor not in allowed:
        raise ValueError(f"--user_encoder {user_encoder} works only with --click_predictor in {sorted(allowed)}")
    if allowed is None and predictor_cls.encoder_scores:
        scorers = sorted(name for name, cls in USER_ENCODERS.items()
                         if click_predictor in (cls.click_predictors_for(config) or ()))
        raise ValueError(f"--click_predictor {click_predictor} means the user encoder scores the candidates itself; "
                         f"only --user_encoder in {scorers} does (--user_encoder {user_encoder} returns user vectors: "
                         f"use --click_predictor in {sorted(n for n, c in CLICK_PREDICTORS.items() if not c.encoder_scores)})")


def model_components(config) -> tuple[type, type, type]:
    """The news encoder, user encoder and click predictor classes `config` names."""
    return (get_news_encoder(config.news_encoder), get_user_encoder(config.user_encoder),
            get_click_predictor(config.click_predictor))


def all_components() -> list[tuple[str, str, type]]:
    """(kind, name, class) of every registered component, in registry order."""
    return [(kind, name, cls) for kind, table in (("news encoder", NEWS_ENCODERS), ("user encoder", USER_ENCODERS),
                                                  ("click predictor", CLICK_PREDICTORS))
            for name, cls in table.items()]


def flag_owners() -> dict[str, list[str]]:
    """flag -> the components that read it ("news encoder HDC", ...); shared dimensions are nobody's own."""
    owners: dict[str, list[str]] = {}
    for kind, name, cls in all_components():
        for s in component_settings(cls):
            for flag in s.names():
                owners.setdefault(flag, []).append(f"{kind} {name}")
    return owners


def model_settings(config) -> dict[str, Any]:
    """The settings that define the model `config` builds: component names, shared dimensions and each chosen
    component's own settings (what the checkpoint stores as `model_settings`)."""
    out: dict[str, Any] = {"news_encoder": config.news_encoder, "user_encoder": config.user_encoder,
                           "click_predictor": config.click_predictor,
                           "shared": SharedDims.from_values(config.values).to_dict()}
    for role, cls in zip(("news", "user", "click"), model_components(config)):
        out[role] = {flag: config.values[flag] for s in component_settings(cls) for flag in s.names()}
    return out


class Model(nn.Module):
    """Args:
        config: the run's Config.
        meta: CorpusMeta (vocabulary / category / user sizes and pretrained matrices).
        news_table: dict of numpy arrays [N, ...] (the corpus news arrays); only the columns the news encoder
            declares in `features` (plus category when the user encoder needs it) are copied to the device.
        popularity: the train CTR table and first exposures (`popularity.time_popularity_for(config, corpus)`),
            for a user encoder that `needs_popularity` (PP-Rec); held as non-persistent buffers, never saved.
    """

    def __init__(self, config: "Config", meta: "CorpusMeta", news_table: dict[str, np.ndarray],
                 popularity: PopularityTable | None = None):
        super().__init__()
        check_pairing(config.news_encoder, config.user_encoder, config.click_predictor, config)
        self.config = config
        news_cls, user_cls, click_cls = model_components(config)
        # Each component sees only its own settings and the shared dimensions (settings.ComponentView).
        values, owners = config.to_dict(), flag_owners()
        self.news_encoder = news_cls(ComponentView(news_cls, values, owners), meta)
        self.user_encoder = user_cls(ComponentView(user_cls, values, owners), meta, self.news_encoder)
        self.click_predictor = click_cls(ComponentView(click_cls, values, owners), self.user_encoder.output_dim)
        # A default an encoder resolved from its weights (e.g. --plm_frozen_layers from the PLM's depth) goes into
        # the run's config, so config.json and the checkpoint record the value used.
        for flag, value in self.news_encoder.resolved_settings().items():
            config.values[flag] = value
        if self.news_encoder.category_embedding_for_user and not self.user_encoder.reads_category_embedding:
            # Never read, so never a gradient: DDP stops at the second step on such a parameter. Frozen, not
            # removed, so the state dict (and existing checkpoints) keep their keys.
            self.news_encoder.category_embedding.weight.requires_grad_(False)
        self.features = tuple(self.news_encoder.features)
        needed = set(self.features)
        if self.user_encoder.needs_category:
            needed.add("category")
        for name in sorted(needed):
            if name not in news_table:
                raise ValueError(f"news encoder {config.news_encoder} reads news feature {name!r}, which the corpus "
                                 f"does not provide (has: {sorted(news_table)})")
            tensor = torch.from_numpy(np.array(news_table[name]))  # a copy: the cache arrays are read-only mmaps
            self.register_buffer(f"news_{name}", tensor, persistent=False)  # rebuilt from the corpus, not saved
        self.news_num = int(next(iter(news_table.values())).shape[0])
        if self.user_encoder.needs_popularity:
            if popularity is None:
                raise ValueError(f"--user_encoder {config.user_encoder} reads time-aware news popularity: build the "
                                 f"model with popularity=popularity.time_popularity_for(config, corpus)")
            self.popularity = PopularityLookup(popularity)

    def model_settings(self) -> dict[str, Any]:
        """What the checkpoint stores as the model's settings (see `model_settings`)."""
        return model_settings(self.config)

    # -- news --------------------------------------------------------------------------------------------
    def news_features(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """index [N] long -> {feature: [N, ...] long}.

        Token columns are cut to the longest real sequence among these news (titles average ~11 of 32
        slots): encoders are padding-invariant (tested), so this only removes work. Columns aligned to the
        title or abstract tokens (`title_entity`, ...) are cut to the same length; PLM ids by their mask.
        """
        out = {name: getattr(self, f"news_{name}")[index] for name in self.features}
        out.update(self.news_encoder.cached_features(index))  # what the encoder's `prepare` computed, if anything
        for prefix, key in (("title", "title"), ("abstract", "abstract"), ("plm", "plm_mask")):
            if key in out and out[key].dim() == 2 and out[key].shape[1] > 1:
                used = out[key].ne(0).any(0).nonzero()
                length = int(used[-1]) + 1 if len(used) else 1
                for name in out:
                    if name.startswith(prefix) and out[name].dim() >= 2:
                        out[name] = out[name][:, :length]
        return {name: (t if t.is_floating_point() else t.long()) for name, t in out.items()}

    def text_lengths(self, index: torch.Tensor) -> torch.Tensor:
        """index [N] -> [N] long: real tokens of the text column the news encoder reads (PLM ids, else title, else
        abstract); zeros for an encoder without one."""
        for key in ("plm_mask", "title", "abstract"):
            if key in self.features:
                return getattr(self, f"news_{key}")[index].ne(0).sum(1)
        return torch.zeros_like(index)

    def length_order(self, index: torch.Tensor) -> torch.Tensor:
        """Positions of `index` sorted by text length (stable): chunks of similar length carry little padding."""
        return torch.argsort(self.text_lengths(index), stable=True)

    def prepare(self, log=print, **options) -> None:
        """Before training or evaluation: each encoder computes what stays fixed while it trains, over every news of
        the corpus (the PLM encoders: their frozen-layer cache or stored vectors). The model does not know what is
        cached; `news_features` merges the encoder's `cached_features` into its input. Idempotent. `options` go to
        the encoder's `prepare` (the PLM encoders take `chunk` and `host`)."""
        self.news_encoder.prepare(NewsSource(self), log=log, **options)

    def encode_news(self, index: torch.Tensor, user_id: torch.Tensor | None = None) -> torch.Tensor:
        """index [N] long (news indices) -> [N, D] news vectors."""
        return self.news_encoder.encode(self.news_features(index), user_id=user_id)[0]

    def batch_news(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The news a batch reads, history then candidates: ids [B*H + B*C] and, for a personalized news encoder,
        the user of each ([B*H + B*C]; else None)."""
        h, c = batch.history.shape[1], batch.candidates.shape[1]
        ids = torch.cat([batch.history.reshape(-1), batch.candidates.reshape(-1)])  # [B*H + B*C]
        if not self.news_encoder.personalized:
            return ids, None
        return ids, torch.cat([batch.user.repeat_interleave(h), batch.user.repeat_interleave(c)])

    def _gather_news(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Encode the batch's news: each unique news once (personalized encoders: once per user and news).

        Returns history [B, H, D], candidates [B, C, D] and the news encoder's auxiliary losses (training)."""
        b, h = batch.history.shape
        c = batch.candidates.shape[1]
        ids, users = self.batch_news(batch)
        if self.news_encoder.personalized:
            vectors, aux = self.news_encoder.encode(self.news_features(ids), user_id=users)
        elif self.news_encoder.length_buckets > 1:
            unique, inverse = torch.unique(ids, return_inverse=True)
            order = self.length_order(unique)  # shortest first
            parts = []
            for part in order.tensor_split(self.news_encoder.length_buckets):
                vec, aux = self.news_encoder.encode(self.news_features(unique[part]))  # [U/k, D]
                assert not aux, "length_buckets needs a news encoder without auxiliary losses"
                parts.append(vec)
            vectors = torch.cat(parts)[torch.argsort(order)][inverse]  # back to unique order, then to references
        else:
            unique, inverse = torch.unique(ids, return_inverse=True)
            vectors, aux = self.news_encoder.encode(self.news_features(unique))  # [U, D]
            vectors = vectors[inverse]  # [B*H + B*C, D]
        history = vectors[: b * h].view(b, h, -1)
        candidates = vectors[b * h:].view(b, c, -1)
        return history, candidates, aux

    # -- scoring -----------------------------------------------------------------------------------------
    def score(self, batch: Batch, history: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, UserOutput]:
        """Encoded history [B, H, D] and candidates [B, C, D] -> logits [B, C] (padded candidates -inf)."""
        inputs = UserInputs(
            history=history, history_mask=batch.history_mask, user_id=batch.user,
            candidates=candidates, candidate_mask=batch.candidate_mask,
        )
        if self.user_encoder.needs_category:
            inputs.history_category = self.news_category[batch.history].long()
            inputs.candidate_category = self.news_category[batch.candidates].long()
        if self.user_encoder.needs_popularity:
            if batch.time is None:
                raise ValueError(f"--user_encoder {self.config.user_encoder} reads the impression time, and this "
                                 f"batch carries none (Batch.time)")
            inputs.history_ctr = self.popularity.ctr(batch.history, batch.time)
            inputs.candidate_ctr = self.popularity.ctr(batch.candidates, batch.time)
            inputs.candidate_age = self.popularity.age(batch.candidates, batch.time)
        out = self.user_encoder(inputs)
        # An encoder that scores candidates itself (FIM, MINER max/mean) returns logits; check_pairing made sure
        # the click predictor agrees.
        if out.logits is not None:
            logits = out.logits
        else:  # the encoder's own candidate vectors where it re-encodes them (GLORY), else the news vectors
            logits = self.click_predictor(out.user, candidates if out.candidates is None else out.candidates)  # [B, C]
        # -inf, not a large negative: a padded candidate must get exactly zero probability.
        logits = logits.float().masked_fill(~batch.candidate_mask, float("-inf"))
        return logits, out

    def forward(self, batch: Batch) -> ModelOutput:
        history, candidates, news_aux = self._gather_news(batch)
        logits, out = self.score(batch, history, candidates)
        loss = None
        aux = {**news_aux, **out.aux}
        if batch.target is not None:
            loss = F.cross_entropy(logits, batch.target)
            for value in aux.values():
                loss = loss + value
        return ModelOutput(logits=logits, loss=loss, aux=aux)

    @torch.no_grad()
    def score_cached(self, batch: Batch, news_vectors: torch.Tensor) -> torch.Tensor:
        """Evaluation fast path: news_vectors [N, D] (every news of the split encoded once) -> logits [B, C]."""
        if self.news_encoder.personalized:  # vectors depend on the user: encode this batch's news
            history, candidates, _ = self._gather_news(batch)
        else:
            history, candidates = news_vectors[batch.history], news_vectors[batch.candidates]
        return self.score(batch, history, candidates)[0]

    @torch.no_grad()
    def encode_all_news(self, index: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
        """Encode the news in `index` once, in chunks; returns a table [N, D] indexed by news index (rows not in
        `index` stay zero). Personalized encoders return an empty table (they encode per batch)."""
        device = index.device
        if self.news_encoder.personalized:
            return torch.zeros(0, device=device)
        table = None
        for start in range(0, len(index), chunk):
            ids = index[start:start + chunk]
            vec = self.encode_news(ids)
            if table is None:
                table = torch.zeros(self.news_num, vec.shape[-1], device=device, dtype=vec.dtype)
            table[ids] = vec
        return table
