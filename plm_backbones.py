"""What the PLM news encoders need to know about a Hugging Face backbone, encoder (BERT) or decoder-only (GPT-2,
Llama, Qwen2, Mistral, Gemma): where its layer stack is, how positions follow padding, which pooling fits, which
modules LoRA adapts, and the on-disk store of precomputed news vectors (--plm_embeddings=precompute).

Legend: N news, L PLM tokens, Hp the PLM's hidden size.

Everything model-specific sits in the FAMILIES table, keyed by `config.model_type`; a model type not in it falls
back to the longest ModuleList named layer / layers / h, and is an error naming its class when there is none.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn


@dataclass(frozen=True)
class Family:
    stack: str  # dotted path of the ModuleList of transformer blocks, from the AutoModel
    decoder: bool  # decoder-only (causal): no [CLS]; the last real token has seen the whole text
    arange_positions: bool  # absolute positions 0, 1, ...: we pass position_ids so left padding shifts nothing
    lora_targets: tuple[str, ...]  # default --plm_lora_target_modules (module names inside each block)


_LLAMA_LIKE = Family("layers", True, True, ("q_proj", "k_proj", "v_proj", "o_proj"))
FAMILIES: dict[str, Family] = {
    "gpt2": Family("h", True, True, ("c_attn",)),  # c_attn: the fused q/k/v projection
    **{t: _LLAMA_LIKE for t in ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text")},
    "phi3": Family("layers", True, True, ("qkv_proj", "o_proj")),  # Phi-3 fuses q/k/v into qkv_proj
    "bert": Family("encoder.layer", False, True, ("query", "value")),
    # RoBERTa counts positions from its padding id itself; DeBERTa's are relative: no position_ids for them.
    "roberta": Family("encoder.layer", False, False, ("query", "value")),
    "xlm-roberta": Family("encoder.layer", False, False, ("query", "value")),
    "deberta": Family("encoder.layer", False, False, ("in_proj",)),
    "deberta-v2": Family("encoder.layer", False, False, ("query_proj", "value_proj")),
    "distilbert": Family("transformer.layer", False, False, ("q_lin", "v_lin")),
}

TEMPLATE_FIELDS = ("title", "abstract", "category", "subcategory")


def family(plm: nn.Module) -> Family | None:
    return FAMILIES.get(getattr(plm.config, "model_type", ""))


def layer_stack(plm: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted name, ModuleList) of the transformer blocks: the family's stack, else the longest ModuleList whose
    name ends in layer / layers / h."""
    fam = family(plm)
    if fam is not None:
        try:
            stack = plm.get_submodule(fam.stack)
        except AttributeError:
            stack = None
        if isinstance(stack, nn.ModuleList):
            return fam.stack, stack
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in plm.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("layer", "layers", "h"):
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise ValueError(f"--plm_model_name: cannot find the transformer layers of {type(plm).__name__} "
                         f"(model_type {getattr(plm.config, 'model_type', '?')!r}); the PLM encoders know "
                         f"{sorted(FAMILIES)} and any model whose block list is named layer, layers or h")
    return best


class FedBlock(nn.Module):
    """A transformer block that receives `bottom` [N, L, Hp] in place of the hidden states the model passes it: how
    the frozen-layer cache enters the first trainable block.

    A wrapper, not a forward pre-hook: under gradient checkpointing, transformers < 5 checkpoints the block's whole
    __call__ (hooks included) and replays it in the backward pass, after the hook is gone, on the raw embeddings
    (wrong gradients). Here the block is called with `bottom` as its argument, so the checkpoint saves and replays
    that. Attributes the model's loop reads from its blocks (e.g. `attention_type`) come from the wrapped block."""

    def __init__(self, block: nn.Module, bottom: torch.Tensor):
        super().__init__()
        self.block = block
        self.bottom = bottom

    def forward(self, *args, **kwargs):
        if args:  # the models pass hidden_states first and positionally (gradient checkpointing needs it so)
            return self.block(self.bottom, *args[1:], **kwargs)
        return self.block(**{**kwargs, "hidden_states": self.bottom})

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)


def is_decoder(plm: nn.Module) -> bool:
    fam = family(plm)
    return fam.decoder if fam is not None else bool(getattr(plm.config, "is_decoder", False))


def position_ids(plm: nn.Module, mask: torch.Tensor) -> torch.Tensor | None:
    """mask [N, L] -> position ids [N, L] counting real tokens only (left padding then moves no position), for
    families with absolute 0-based positions; None for the others (they place tokens themselves)."""
    fam = family(plm)
    if fam is None or not fam.arange_positions:
        return None
    return (mask.long().cumsum(1) - 1).clamp(min=0)


def ensure_pad_token(tokenizer) -> None:
    """Decoder-only tokenizers (GPT-2, Llama) often have no pad token: use EOS (else UNK, else BOS) for padding;
    the attention mask keeps it out of every real token's view, so which id fills the slots does not matter."""
    if tokenizer.pad_token is None:
        for candidate in (tokenizer.eos_token, tokenizer.unk_token, tokenizer.bos_token):
            if candidate is not None:
                tokenizer.pad_token = candidate
                return
        raise ValueError(f"--plm_model_name: the tokenizer {type(tokenizer).__name__} has no pad, eos, unk or bos "
                         f"token to pad with; add one to its tokenizer_config.json")


def template_error(template: str) -> str | None:
    """What is wrong with a --plm_text_template (None: fine)."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        return f"is not a format string ({e}); write fields as {{title}}"
    unknown = [n for n in names if n not in TEMPLATE_FIELDS]
    if unknown:
        return f"uses {unknown}; fields are {list(TEMPLATE_FIELDS)} (e.g. 'News: {{title}} Category: {{category}}')"
    if not names:
        return f"has no field; use at least one of {list(TEMPLATE_FIELDS)}"
    return None


def template_fields(template: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template) if f}


# -- pooling ----------------------------------------------------------------------------------------------------

def last_token(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """hidden [N, L, Hp], mask [N, L] -> [N, Hp]: the last real token, wherever the padding is (left or right)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (mask.long() * (positions + 1)).argmax(1)  # the highest real position (0 for an all-padding row)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def first_token(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N, L, Hp] -> [N, Hp]: the first real token ([CLS] for BERT-like encoders, wherever the padding is)."""
    first = mask.long().argmax(1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]


# -- LoRA -------------------------------------------------------------------------------------------------------

def _adaptable(module: nn.Module) -> bool:
    """A leaf with a 2-D weight (Linear, GPT-2's Conv1D, Embedding): what a LoRA adapter can wrap."""
    weight = getattr(module, "weight", None)
    return not list(module.children()) and isinstance(weight, torch.Tensor) and weight.dim() == 2


def lora_modules(plm: nn.Module, stack_name: str, layers: nn.ModuleList, first: int, targets: list[str]) -> list[str]:
    """Full names of the modules LoRA adapts: those named in `targets` inside blocks first.. of the stack (the
    blocks below `first` are frozen and may be cached, so they get no adapter). Every name in `targets` must match a
    module there: one that matches nothing would silently leave that projection without an adapter (Phi-3 fuses
    q/k/v into qkv_proj: the Llama names reached o_proj only), so it is an error naming the ones the blocks have."""
    names, matched = [], set()
    for i in range(first, len(layers)):
        for sub, module in layers[i].named_modules():
            leaf = sub.split(".")[-1]
            if sub and leaf in targets and _adaptable(module):
                names.append(f"{stack_name}.{i}.{sub}")
                matched.add(leaf)
    missing = [t for t in targets if t not in matched]
    if missing and first < len(layers):
        found = sorted({n.split(".")[-1] for n, m in layers[first].named_modules() if n and _adaptable(m)})
        raise ValueError(f"--plm_lora_target_modules={','.join(targets)}: {missing} match no linear module in the "
                         f"blocks of {type(plm).__name__} (model_type {getattr(plm.config, 'model_type', '?')!r}) "
                         f"above --plm_frozen_layers; its blocks have {found}: name those with "
                         f"--plm_lora_target_modules=a,b")
    return names


def add_lora(plm: nn.Module, modules: list[str], rank: int, alpha: float, dropout: float) -> None:
    """Inject LoRA adapters (peft) into `modules` of `plm`, in place: every base weight frozen, the adapters
    trainable, kept in fp32 even on a bf16 backbone (their updates are small)."""
    from peft import LoraConfig, inject_adapter_in_model

    for p in plm.parameters():
        p.requires_grad = False
    if not modules:
        return
    # GPT-2 stores its projections transposed (transformers' Conv1D): peft must be told.
    transposed = any(type(plm.get_submodule(m)).__name__ == "Conv1D" for m in modules)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=modules,
                                       bias="none", fan_in_fan_out=transposed), plm)
    for name, p in plm.named_parameters():
        p.requires_grad = "lora_" in name
        if "lora_" in name and p.dtype != torch.float32:
            p.data = p.data.float()


SIGNATURE_KEY = "plm_weights_signature"


def exclude_frozen_base(owner: nn.Module, plm_attr: str = "plm", signature: str | None = None,
                        model_name: str = "") -> None:
    """Leave the PLM's frozen base weights out of `owner`'s state dict (they come from --plm_model_name when the
    model is rebuilt), and accept their absence when loading: a LoRA or precompute checkpoint then holds the
    adapters and the heads only, megabytes instead of the backbone's gigabytes.

    In their place the state dict holds `signature` (weights_signature of the base weights) under SIGNATURE_KEY, and
    loading compares it with the backbone built now: adapters and heads trained on other base weights (a newer
    revision behind the same name) would give other numbers, so that is an error. A checkpoint without one (written
    before signatures) loads unchecked."""
    plm = getattr(owner, plm_attr)
    base = {n for n, p in plm.named_parameters() if not p.requires_grad} | {n for n, _ in plm.named_buffers()}

    def drop(module, state_dict, prefix, local_metadata):
        for name in base:
            state_dict.pop(f"{prefix}{plm_attr}.{name}", None)
        if signature is not None:
            state_dict[prefix + SIGNATURE_KEY] = torch.tensor(list(signature.encode()), dtype=torch.uint8)

    def check_signature(module, state_dict, prefix, *args):
        saved = state_dict.pop(prefix + SIGNATURE_KEY, None)
        if saved is None or signature is None:
            return
        saved = bytes(saved.tolist()).decode(errors="replace")
        if saved != signature:
            raise ValueError(f"the checkpoint's PLM adapters/heads were trained on other base weights of "
                             f"--plm_model_name={model_name} than the ones loaded now (signature {saved}, now "
                             f"{signature}; e.g. a newer revision behind the same name or folder): its numbers would "
                             f"not be the trained model's. Load the backbone it was trained with")

    def allow_missing(module, incompatible):
        keep = [k for k in incompatible.missing_keys if not _is_base(k)]
        incompatible.missing_keys[:] = keep

    def _is_base(key: str) -> bool:
        head, sep, tail = key.partition(f"{plm_attr}.")
        while sep:
            if tail in base:
                return True
            head, sep, tail = tail.partition(f"{plm_attr}.")
        return False

    owner.register_state_dict_post_hook(drop)
    owner.register_load_state_dict_pre_hook(check_signature)
    owner.register_load_state_dict_post_hook(allow_missing)


# -- precomputed news vectors -------------------------------------------------------------------------------------

# The frozen-layer cache may take this share of the free GPU memory; a larger one stays in host memory.
CACHE_DEVICE_FRACTION = 0.5


def cache_device(shape: tuple[int, ...], device: torch.device, itemsize: int = 2) -> torch.device:
    """Where a frozen-layer table of `shape` (`itemsize` bytes a value) goes: `device`, unless it is a GPU where the
    table would take more than CACHE_DEVICE_FRACTION of the free memory (then the host)."""
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    nbytes = itemsize * math.prod(shape)
    return device if nbytes <= CACHE_DEVICE_FRACTION * free else torch.device("cpu")


FP16_MAX = float(torch.finfo(torch.float16).max)


def table_dtype(backbone: torch.dtype, values: torch.Tensor | None = None) -> torch.dtype:
    """The dtype of a table of the backbone's hidden states or vectors: a bf16 backbone's in bf16 (its own values,
    exactly); an fp32 backbone's in fp16 (half the memory, ~1e-3 relative rounding) while `values` fit fp16's range,
    else fp32 (LLM hidden states can exceed 65504: fp16 would hold inf, and every score would become NaN)."""
    if backbone == torch.bfloat16:
        return torch.bfloat16
    if values is not None and values.numel() and float(values.detach().abs().float().nan_to_num(0.0).max()) > FP16_MAX:
        return torch.float32
    return torch.float16


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, str(dtype))


SIGNATURE_SAMPLE = 65536  # values read per weight tensor by `weights_signature`


def weights_signature(plm: nn.Module) -> str:
    """What identifies a backbone's weights, whatever its name or files: a hash over every base tensor's name and
    shape and up to SIGNATURE_SAMPLE of its values, evenly spaced (a new revision changes them all; hashing every
    byte of an LLM would take seconds). Values are rounded to bf16 first, so the same weights loaded with
    --plm_dtype=fp32 or bf16 sign alike. LoRA adapters are not part of it (`.base_layer` is read as the module)."""
    h = hashlib.sha1()
    for name, p in sorted(plm.state_dict().items()):
        if "lora_" in name or not isinstance(p, torch.Tensor):
            continue
        flat = p.detach().reshape(-1)
        step = max(1, -(-flat.numel() // SIGNATURE_SAMPLE))
        sample = flat[::step].cpu()
        sample = sample.to(torch.bfloat16).view(torch.int16) if sample.is_floating_point() else sample
        h.update(f"{name.replace('.base_layer', '')}{tuple(p.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:20]


def config_signature(plm: nn.Module) -> dict:
    """The backbone's config without where it was loaded from (a copy of the same model keeps its store)."""
    cfg = plm.config.to_dict()
    for key in ("_name_or_path", "transformers_version", "_commit_hash", "dtype", "torch_dtype"):
        cfg.pop(key, None)
    return cfg


def store_key(backbone, ids: np.ndarray, mask: np.ndarray, pooling: str, dtype: str, extra: dict) -> str:
    """The store's name: the backbone (its weights' and config's signatures) + the token table (which holds
    template and length) + pooling and dtype."""
    h = hashlib.sha1(json.dumps({"backbone": backbone, "pooling": pooling, "dtype": dtype, **extra},
                                sort_keys=True, default=str).encode())
    h.update(np.ascontiguousarray(ids).tobytes())
    h.update(np.ascontiguousarray(mask).tobytes())
    return h.hexdigest()[:16]


def build_store(path: Path, n: int, encode: Callable[[torch.Tensor], torch.Tensor], order: torch.Tensor,
                chunk: int = 256) -> tuple[np.ndarray, bool]:
    """The [n, Hp] news-vector table at `path` (a .npy memory map): loaded when there, else built by
    `encode(rows) -> [len(rows), Hp]` over `order` (length-sorted rows, so chunks carry little padding) and
    written atomically (temp file + rename; a concurrent build of the same key keeps one of two equal files).
    fp16, or fp32 when a vector exceeds fp16's range (fp16 would hold inf). A table with a non-finite value is an
    error, written or found. Returns (table, built)."""
    if path.exists():
        return _finite_store(np.load(path, mmap_mode="r"), f"{path} holds", "delete the file to rebuild it"), False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npy")
    table = None
    try:
        for start in range(0, n, chunk):
            rows = order[start:start + chunk]
            vectors = encode(rows).float().cpu().numpy()
            _finite_store(vectors, "the frozen backbone gives", "check the model's files, or try --plm_dtype=fp32 "
                                                                "if it is bf16")
            wide = np.abs(vectors).max(initial=0.0) > FP16_MAX
            if table is None or (wide and table.dtype != np.float32):
                old = table
                table = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32 if wide else np.float16,
                                                  shape=(n, vectors.shape[-1])) if old is None else \
                    _widen(old, tmp)
            table[rows.cpu().numpy()] = vectors.astype(table.dtype)
        table.flush()
        del table
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return np.load(path, mmap_mode="r"), True


def _widen(table: np.ndarray, tmp: Path) -> np.ndarray:
    """The fp16 memory map at `tmp` rewritten as fp32, values kept."""
    values = np.array(table, dtype=np.float32)
    del table
    wide = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=values.shape)
    wide[:] = values
    return wide


def _finite_store(table: np.ndarray, what: str, fix: str) -> np.ndarray:
    bad = ~np.isfinite(np.asarray(table, dtype=np.float32)).all(axis=-1)
    if bad.any():
        raise ValueError(f"--plm_embeddings=precompute: {what} {int(bad.sum())} news vectors with NaN or inf (every "
                         f"score of those news would be NaN): {fix}")
    return table
