"""Review of the PLM news encoders (issue 22): the frozen-layer cache under gradient checkpointing gives the uncached
gradients, the cache refuses a table that is not finite and keeps the backbone's range, every family's default LoRA
targets exist in a tiny model of that family (and a target list that matches nothing, or part of what it names, is an
error), the precomputed-vector store follows the backbone's weights, not its name."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import plm_backbones
from test_llm import batch, build, make_backbone

# ------------------------------------------------------------------ frozen-layer cache + gradient checkpointing


DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                "attention_dropout")


def without_dropout(folder: Path) -> Path:
    """The backbone's own dropout off (GPT-2's, BERT's; BERT's attention dropout is a float, not a module): the two
    paths then draw no random masks and their gradients compare exactly."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({**cfg, **{k: 0.0 for k in DROPOUT_KEYS if k in cfg}}))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    return {kind: without_dropout(make_backbone(kind, tmp_path_factory.mktemp(f"review-{kind}")))
            for kind in ("gpt2", "bert", "llama")}


def _plm_grads(model) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(batch()).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.news_encoder.plm.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("lora", [0, 4])
@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama"])
def test_cached_states_survive_the_checkpoint_recompute(tiny, kind, lora):
    """The cached states must reach the first trainable block in the backward's recompute too: on transformers < 5 the
    checkpoint re-runs the block's __call__ (hooks included) after the forward has returned."""
    flags = dict(plm_frozen_layers=1, plm_pooling="average", plm_lora_rank=lora)
    reference = build(tiny[kind], plm_cache=False, **flags)
    checkpointed = build(tiny[kind], gradient_checkpointing=True, **flags)
    for model in (reference, checkpointed):  # the same changes to both
        torch.manual_seed(1)
        _, stack = plm_backbones.layer_stack(model.news_encoder.plm)
        with torch.no_grad():
            # A frozen block that changes the states visibly (a tiny random one is near the identity, so the raw
            # embeddings would pass for its output), and non-zero adapters (peft starts lora_B at zero).
            for n, p in stack[0].named_parameters():
                if p.dim() > 1:
                    p.normal_(0, 0.3)
            for n, p in model.news_encoder.plm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.3)
    checkpointed.prepare(log=lambda *a: None)
    enc = checkpointed.news_encoder
    assert enc.has_frozen_cache
    assert any(getattr(m, "gradient_checkpointing", False) for m in enc.plm.modules())
    expected, got = _plm_grads(reference), _plm_grads(checkpointed)
    assert expected.keys() == got.keys() and expected
    # A floor for tensors whose true gradient is ~0 (BERT's key bias: softmax ignores a per-query constant).
    floor = 1e-2 * max(float(g.norm()) for g in expected.values())
    for name, g in expected.items():
        # fp16 cache: ~1e-3 of the gradient's scale; the raw embeddings in the recompute are off by O(1).
        err = float((got[name] - g).norm()) / max(float(g.norm()), floor)
        assert err < 2e-2, f"{kind} {name}: relative gradient error {err:.2e}"
