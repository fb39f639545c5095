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


# ----------------------------------------------------------------------- frozen-layer cache: range and finiteness

FP16_MAX = float(torch.finfo(torch.float16).max)


def _loud_embeddings(model, scale: float) -> None:
    """Llama's residual stream is not normalised between blocks: embeddings scaled up keep the frozen block's output
    that large, while the final norm keeps the model's output finite."""
    with torch.no_grad():
        model.news_encoder.plm.get_input_embeddings().weight.mul_(scale)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_frozen_cache_holds_states_beyond_the_fp16_range(tiny, dtype):
    model = build(tiny["llama"], plm_frozen_layers=1, plm_pooling="average", plm_dtype=dtype).eval()
    _loud_embeddings(model, 1e6)
    enc = model.news_encoder
    with torch.no_grad():
        bottom = enc.frozen_bottom(model.news_plm_ids[:4].long(), model.news_plm_mask[:4].long())
    assert bottom.abs().max() > FP16_MAX and torch.isfinite(bottom).all()  # the case this test is about
    uncached = model(batch(False)).logits
    logs = []
    model.prepare(log=logs.append)
    assert enc.has_frozen_cache, logs
    cached = model(batch(False)).logits
    assert torch.isfinite(cached).all()  # an fp16 table overflows to inf: every score NaN
    assert torch.allclose(cached, uncached, atol=1e-3 * float(uncached.detach().abs().max()) + 1e-3), (cached, uncached)
    table = enc.frozen_table if enc.frozen_table is not None else enc.frozen_table_host
    assert table.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    assert ("fp32" if dtype == "fp32" else "bf16") in logs[-1]


def test_frozen_cache_stays_fp16_where_the_states_fit(tiny):
    model = build(tiny["llama"], plm_frozen_layers=1, plm_pooling="average")
    model.prepare(log=lambda *a: None)
    assert model.news_encoder.frozen_table.dtype == torch.float16


def test_a_non_finite_frozen_cache_is_an_error(tiny):
    model = build(tiny["llama"], plm_frozen_layers=1, plm_pooling="average")
    word = int(model.news_plm_ids[3, 0])
    with torch.no_grad():
        model.news_encoder.plm.get_input_embeddings().weight[word] = float("nan")
    with pytest.raises(ValueError, match=r"--plm_frozen_layers=1 .*non-finite .*news index 3"):
        model.prepare(log=lambda *a: None)


def _precompute(folder, cache, **flags):
    return build(folder, cache, plm_embeddings="precompute", plm_frozen_layers=3, plm_pooling="cls", **flags).eval()


def test_precomputed_store_holds_vectors_beyond_the_fp16_range(tiny, tmp_path):
    model = _precompute(tiny["bert"], tmp_path)
    with torch.no_grad():  # BERT's output is its last LayerNorm's: scaled, the news vectors exceed fp16's range
        model.news_encoder.plm.encoder.layer[-1].output.LayerNorm.weight.mul_(1e6)
    expected = model(batch(False)).logits.detach()  # no store yet: computed per call
    logs = []
    model.prepare(log=logs.append)
    stored = model.news_encoder.stored_vectors
    assert stored.abs().max() > FP16_MAX and stored.dtype == torch.float32 and "fp32" in logs[-1]
    got = model(batch(False)).logits
    assert torch.isfinite(got).all()
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_a_non_finite_store_is_an_error_and_is_not_written(tiny, tmp_path):
    model = _precompute(tiny["bert"], tmp_path)
    word = int(model.news_plm_ids[3, 1])
    with torch.no_grad():
        model.news_encoder.plm.get_input_embeddings().weight[word] = float("nan")
    with pytest.raises(ValueError, match=r"--plm_embeddings=precompute: .* news vectors with NaN or inf"):
        model.prepare(log=lambda *a: None)
    assert not list(tmp_path.glob("plm-embeddings-*"))  # nothing half-written left for the next run to load


# ------------------------------------------------------------------------------------- LoRA targets per family

_DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, vocab_size=100, max_position_embeddings=64,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
_ENCODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=100,
                max_position_embeddings=64, pad_token_id=0)
TINY_CONFIGS = {  # one tiny model per family plm_backbones.FAMILIES knows
    **{t: _DECODER for t in ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3")},
    "gpt2": dict(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64, bos_token_id=1, eos_token_id=2),
    **{t: _ENCODER for t in ("bert", "roberta", "xlm-roberta", "deberta", "deberta-v2")},
    "distilbert": dict(dim=32, hidden_dim=64, n_layers=2, n_heads=2, vocab_size=100, max_position_embeddings=64,
                       pad_token_id=0),
}
# What the default adapters must reach in every block: the attention's query and value projections (fused or not).
QUERY_VALUE = {"gpt2": ("c_attn",), "phi3": ("qkv_proj",), "bert": ("query", "value"), "roberta": ("query", "value"),
               "xlm-roberta": ("query", "value"), "deberta": ("in_proj",), "deberta-v2": ("query_proj", "value_proj"),
               "distilbert": ("q_lin", "v_lin")}


def tiny_family_model(model_type: str):
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(0)
    return AutoModel.from_config(AutoConfig.for_model(model_type, **TINY_CONFIGS[model_type]))


def test_every_family_has_a_tiny_model_here():
    assert set(TINY_CONFIGS) == set(plm_backbones.FAMILIES)


@pytest.mark.parametrize("model_type", sorted(plm_backbones.FAMILIES))
def test_default_lora_targets_exist_in_every_block_of_the_family(model_type):
    plm = tiny_family_model(model_type)
    fam = plm_backbones.FAMILIES[model_type]
    stack_name, layers = plm_backbones.layer_stack(plm)
    assert stack_name == fam.stack and len(layers) == 2
    names = plm_backbones.lora_modules(plm, stack_name, layers, 0, list(fam.lora_targets))
    for i in range(len(layers)):
        adapted = {n.rsplit(".", 1)[-1] for n in names if n.startswith(f"{stack_name}.{i}.")}
        assert adapted == set(fam.lora_targets), (model_type, i, adapted)
        assert set(QUERY_VALUE.get(model_type, ("q_proj", "v_proj"))) <= adapted
    plm_backbones.add_lora(plm, names, rank=2, alpha=4.0, dropout=0.0)
    trainable = {n for n, p in plm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".lora_")[0] for n in trainable} == set(names)  # every named module got its adapter


@pytest.mark.parametrize("targets, missing", [("nothing_here", "nothing_here"), ("q_proj,qkv,v_proj", "qkv"),
                                              ("self_attn", "self_attn")])
def test_lora_targets_that_match_nothing_or_part_are_an_error(tiny, targets, missing):
    with pytest.raises(ValueError, match=rf"--plm_lora_target_modules={targets}: \['{missing}'\] .*q_proj"):
        build(tiny["llama"], plm_lora_rank=2, plm_lora_target_modules=targets, plm_pooling="last")


# ------------------------------------------------------------------------------ the store follows the weights

def test_precomputed_store_follows_the_weights_not_the_name(tmp_path):
    """A newer revision behind the same name (a hub name's cache, or a folder rewritten with the same file sizes and
    times) must give new vectors, never the stale store."""
    import os
    import shutil

    (tmp_path / "plm").mkdir()
    (tmp_path / "other").mkdir()
    folder = make_backbone("bert", tmp_path / "plm")
    model = _precompute(folder, tmp_path / "cache")
    model.prepare(log=lambda *a: None)
    before = model.news_encoder.stored_vectors.clone()
    # Other weights in the same files: same names, sizes and modification times.
    weights = folder / "model.safetensors"
    stat = weights.stat()
    other = make_backbone("bert", tmp_path / "other")
    from safetensors.torch import load_file, save_file

    state = {k: v + 0.5 if v.dtype.is_floating_point else v for k, v in load_file(other / "model.safetensors").items()}
    save_file(state, str(weights), metadata={"format": "pt"})
    assert weights.stat().st_size == stat.st_size
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    shutil.rmtree(other)
    logs = []
    again = _precompute(folder, tmp_path / "cache")
    again.prepare(log=logs.append)
    assert "built" in logs[-1], logs
    expected = again.news_encoder.frozen_pooled(again.news_plm_ids[1:].long(), again.news_plm_mask[1:].long())
    assert not torch.allclose(again.news_encoder.stored_vectors, before, atol=1e-2)
    assert torch.allclose(again.news_encoder.stored_vectors[1:].float(), expected, atol=2e-3, rtol=1e-2)
    assert len(list((tmp_path / "cache").glob("plm-embeddings-*.npy"))) == 2
    # The same weights again (another copy, other file times): the store is found, not rebuilt.
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    third = _precompute(copy, tmp_path / "cache")
    third.prepare(log=logs.append)
    assert "loaded" in logs[-1], logs[-1]


def test_weights_signature_reads_the_weights():
    plm = tiny_family_model("llama")
    sig = plm_backbones.weights_signature(plm)
    assert sig == plm_backbones.weights_signature(tiny_family_model("llama"))  # same weights, same signature
    with torch.no_grad():
        plm.layers[1].mlp.down_proj.weight.mul_(1.01)  # one tensor of the model, changed by 1%
    changed = plm_backbones.weights_signature(plm)
    assert changed != sig
    assert plm_backbones.weights_signature(plm.to(torch.bfloat16)) == changed  # --plm_dtype=bf16: the same weights


@pytest.mark.parametrize("flags", [dict(plm_lora_rank=2, plm_pooling="last"),
                                   dict(plm_embeddings="precompute", plm_frozen_layers=3, plm_pooling="last")])
def test_a_checkpoint_without_its_backbone_notices_other_base_weights(tmp_path, flags):
    from checkpoints import load_state

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    first = make_backbone("llama", tmp_path / "a")
    state = build(first, **flags).state_dict()
    assert "news_encoder.plm_weights_signature" in state and not any(".base_layer." in k for k in state)
    load_state(build(first, **flags), {"model": state, "config": {}}, "ckpt")  # the same backbone: loads
    # Another model behind the same name (here: other weights in a folder of the same path).
    other = make_backbone("llama", tmp_path / "b")
    from transformers import AutoModel

    plm = AutoModel.from_pretrained(other)
    with torch.no_grad():
        for p in plm.parameters():
            p.add_(0.01)
    plm.save_pretrained(first)
    with pytest.raises(ValueError, match=r"other base weights of --plm_model_name="):
        load_state(build(first, **flags), {"model": state, "config": {}}, "ckpt")
    # A checkpoint written before signatures existed loads as before (nothing to compare).
    old = {k: v for k, v in state.items() if not k.endswith("plm_weights_signature")}
    load_state(build(first, **flags), {"model": old, "config": {}}, "ckpt")


def test_init_from_checks_the_signature_and_takes_a_checkpoint_without_one(tmp_path):
    from pretraining import load_pretrained_encoders

    flags = dict(plm_lora_rank=2, plm_pooling="last")
    (tmp_path / "a").mkdir()
    folder = make_backbone("llama", tmp_path / "a")
    model = build(folder, **flags)
    state = model.state_dict()
    old = {k: v for k, v in state.items() if not k.endswith("plm_weights_signature")}
    for saved in (state, old):
        load_pretrained_encoders(build(folder, **flags), {"model_settings": model.model_settings(), "model": saved},
                                 "pre")
    wrong = {**state, "news_encoder.plm_weights_signature": torch.tensor(list(b"0" * 20), dtype=torch.uint8)}
    with pytest.raises(ValueError, match="other base weights"):
        load_pretrained_encoders(build(folder, **flags), {"model_settings": model.model_settings(), "model": wrong},
                                 "pre")
