"""LLM news encoders (README: LLMs as news encoders): tiny random-weight GPT-2, Llama, Qwen2 and BERT models saved with
save_pretrained beside a tokenizer built offline, for each: padding invariance (left and right), `last` pooling, LoRA
(only adapters train, a reload reproduces the logits), precomputed vectors = the in-loop frozen path, frozen-layer
cache + LoRA = the uncached forward; and main() train -> dev -> test with a tiny decoder."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import plm_backbones
from config import Config
from dataset import Batch
from main import main
from MIND_corpus import CorpusMeta
from model import Model
from newsEncoders import NEWS_ENCODERS
from checkpoints import load_state
from trainer import build_optimizer

from common import TINY_DEMO  # noqa: E402

WORDS = ("stock market falls team wins game storm hits coast new recipe for dinner the a of news category "
         "sports finance weather lifestyle").split()
FAMILIES = ["gpt2", "llama", "qwen2", "bert"]
DECODERS = ["gpt2", "llama", "qwen2"]


def decoder_tokenizer(folder: Path):
    """A word-level tokenizer with BOS/EOS/UNK and no pad token (as GPT-2's and Llama's have none)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)
    return len(vocab)


def make_backbone(kind: str, folder: Path) -> Path:
    """A 3-layer, 32-d random model of `kind` in `folder`, loadable by AutoModel / AutoTokenizer offline."""
    import transformers as tf

    torch.manual_seed(0)
    if kind == "bert":
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
        (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
        tf.BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
        tf.BertModel(tf.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
        return folder
    if kind == "qwen2":  # transformers builds Qwen2's own tokenizer class from vocab.json + merges.txt
        from tokenizers import ByteLevelBPETokenizer

        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator([" ".join(WORDS)] * 3, vocab_size=400, min_frequency=1,
                                special_tokens=["<|endoftext|>"])
        bpe.save_model(str(folder))
        n, ids = bpe.get_vocab_size(), dict(bos_token_id=0, eos_token_id=0)
    else:
        n, ids = decoder_tokenizer(folder), dict(bos_token_id=1, eos_token_id=2)
    if kind == "gpt2":
        model = tf.GPT2Model(tf.GPT2Config(vocab_size=n, n_embd=32, n_layer=3, n_head=2, n_positions=64, **ids))
    else:
        cls = {"llama": (tf.LlamaConfig, tf.LlamaModel), "qwen2": (tf.Qwen2Config, tf.Qwen2Model)}[kind]
        model = cls[1](cls[0](vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, **ids))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def backbones(tmp_path_factory) -> dict[str, Path]:
    return {kind: make_backbone(kind, tmp_path_factory.mktemp(f"tiny-{kind}")) for kind in FAMILIES}


def make_config(plm, **flags) -> Config:
    base = {"plm_model_name": str(plm), "plm_frozen_layers": 1, "attention_dim": 8, "category_embedding_dim": 8,
            "subcategory_embedding_dim": 8, "dropout_rate": 0.0, "head_num": 2, "head_dim": 8,
            "num_interest_vectors": 2, "context_code_dim": 8, "word_embedding_dim": 16, "plm_lora_dropout": 0.0}
    base.update(flags)
    return Config.from_args([f"--{k}={v}" for k, v in base.items() if not isinstance(v, bool)]
                            + [f"--{k}" if v else f"--no-{k}" for k, v in base.items() if isinstance(v, bool)])


META = CorpusMeta(vocab_size=20, category_num=5, subcategory_num=7, user_num=4, entity_num=1, news_num=9)
TITLES = ["stock market falls", "team wins the game", "storm", "storm hits the coast new recipe for dinner"]


def tokens(folder, titles, length, side="right"):
    """The corpus' tokenisation (pad token ensured), padded on `side` to `length`."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    plm_backbones.ensure_pad_token(tok)
    tok.padding_side = side
    enc = tok(titles, max_length=length, truncation=True, padding="max_length")
    return torch.tensor(enc["input_ids"]), torch.tensor(enc["attention_mask"])


def pooling_for(kind):
    return "cls" if kind == "bert" else "last"


# ------------------------------------------------------------------------------------------------- backbones

@pytest.mark.parametrize("kind", FAMILIES)
def test_layer_stack_and_family(backbones, kind):
    enc = NEWS_ENCODERS["PLMMiner"](make_config(backbones[kind], plm_pooling="average"), META)
    name, stack = plm_backbones.layer_stack(enc.plm)
    assert name == {"gpt2": "h", "bert": "encoder.layer"}.get(kind, "layers") and len(stack) == 3
    assert enc.decoder == (kind in DECODERS)


def test_unknown_backbone_is_an_error_naming_its_class():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"model_type": "odd"})()
            self.blocks = torch.nn.Sequential(torch.nn.Linear(2, 2))

    with pytest.raises(ValueError, match="Odd"):
        plm_backbones.layer_stack(Odd())


@pytest.mark.parametrize("kind", DECODERS)
def test_cls_pooling_on_a_decoder_is_an_error(backbones, kind):
    with pytest.raises(ValueError, match="--plm_pooling=last"):
        NEWS_ENCODERS["PLMMiner"](make_config(backbones[kind], plm_pooling="cls"), META)


@pytest.mark.parametrize("pooling", ["last-or-cls", "average", "attention"])
@pytest.mark.parametrize("kind", FAMILIES)
def test_padding_invariance_left_and_right(backbones, kind, pooling):
    pooling = pooling_for(kind) if pooling == "last-or-cls" else pooling
    torch.manual_seed(0)
    enc = NEWS_ENCODERS["PLMNAML"](make_config(backbones[kind], plm_pooling=pooling), META).eval()
    cats = {"category": torch.tensor([1, 2, 3, 4]), "subcategory": torch.tensor([1, 2, 3, 6])}
    outs = {}
    for side in ("right", "left"):
        for length in (12, 20):
            ids, mask = tokens(backbones[kind], TITLES, length, side)
            outs[side, length] = enc({"plm_ids": ids, "plm_mask": mask, **cats})
    ref = outs["right", 12]
    assert torch.isfinite(ref).all() and ref.shape == (4, 32 + 16)
    for key, out in outs.items():
        assert torch.allclose(out, ref, atol=1e-4), f"{kind} {pooling} {key}: {(out - ref).abs().max():.2e}"


@pytest.mark.parametrize("kind", DECODERS)
def test_last_pooling_picks_the_last_real_token(backbones, kind):
    enc = NEWS_ENCODERS["PLMMiner"](make_config(backbones[kind], plm_pooling="last"), META).eval()
    for side in ("right", "left"):
        ids, mask = tokens(backbones[kind], TITLES, 12, side)
        pooled = enc({"plm_ids": ids, "plm_mask": mask})
        for i, title in enumerate(TITLES):
            alone_ids, _ = tokens(backbones[kind], [title], int(mask[i].sum()))  # no padding at all
            alone = enc.plm(input_ids=alone_ids).last_hidden_state[0, -1]
            assert torch.allclose(pooled[i], alone, atol=1e-4), (side, title)
    # Not the last slot, not the first token: a title shorter than the row picks its own last position.
    hidden = torch.arange(2 * 5, dtype=torch.float).view(2, 5, 1)
    assert plm_backbones.last_token(hidden, torch.tensor([[1, 1, 0, 0, 0], [0, 0, 1, 1, 1]])).flatten().tolist() == [1, 9]


def test_corpus_tokenisation_sets_a_pad_token(backbones):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(backbones["gpt2"])
    assert tok.pad_token is None
    plm_backbones.ensure_pad_token(tok)
    assert tok.pad_token == "</s>"


def test_template_check():
    assert plm_backbones.template_error("News: {title} Category: {category}") is None
    assert "fields are" in plm_backbones.template_error("{headline}")
    with pytest.raises(ValueError, match="--plm_text_template uses"):
        Config.from_args(["--news_encoder=PLMMiner", "--plm_text_template={headline}"]).validate()


# ------------------------------------------------------------------------------------------------------ model

def news_table(folder, n=9, template_titles=None):
    titles = [""] + [TITLES[i % 4] + " " + WORDS[i] for i in range(n - 1)]
    ids, mask = tokens(folder, titles, 16)
    empty = mask.sum(1) == 0  # the corpus' rule: a text without tokens keeps one pad token
    ids[empty, 0], mask[empty, 0] = 0, 1
    return {"plm_ids": ids.numpy().astype(np.int32), "plm_mask": mask.numpy().astype(np.int8),
            "category": np.arange(n) % 5, "subcategory": np.arange(n) % 7}


def batch(train=True):
    return Batch(user=torch.tensor([1, 2]), history=torch.tensor([[1, 2, 0], [3, 4, 5]]),
                 history_mask=torch.tensor([[True, True, False], [True, True, True]]),
                 candidates=torch.tensor([[6, 7, 8], [2, 8, 1]]), candidate_mask=torch.ones(2, 3, dtype=torch.bool),
                 target=torch.tensor([0, 1]) if train else None)


def build(folder, tmp_path=None, **flags):
    torch.manual_seed(0)
    extra = {"cache_dir": str(tmp_path)} if tmp_path is not None else {}
    cfg = make_config(folder, news_encoder="PLMNAML", user_encoder="ATT", **extra, **flags)
    return Model(cfg, META, news_table(folder))


@pytest.mark.parametrize("kind", FAMILIES)
def test_lora_trains_only_adapters_and_a_reload_reproduces_the_logits(backbones, kind):
    flags = dict(plm_lora_rank=4, plm_frozen_layers=1, plm_pooling="attention", plm_cache=False)
    model = build(backbones[kind], **flags).train()
    plm = model.news_encoder.plm
    trainable = [n for n, p in plm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # Adapters only above the frozen layer: blocks 1 and 2.
    stack, _ = plm_backbones.layer_stack(plm)
    assert {n.split(f"{stack}.")[1].split(".")[0] for n in trainable} == {"1", "2"}
    base = {n: p.detach().clone() for n, p in plm.named_parameters() if not p.requires_grad}
    opt = build_optimizer(model, model.config)
    plm_group = next(g for g in opt.param_groups if g.get("name") == "plm")
    assert plm_group["lr"] == model.config.plm_lr and {id(p) for p in plm_group["params"]} == \
        {id(p) for p in plm.parameters() if p.requires_grad}
    for _ in range(3):
        opt.zero_grad()
        model(batch()).loss.backward()
        opt.step()
    assert all(torch.equal(p, base[n]) for n, p in plm.named_parameters() if n in base)
    assert any(p.abs().sum() > 0 for n, p in plm.named_parameters() if "lora_B" in n)  # the adapters moved
    # The checkpoint holds the adapters and the heads, not the frozen base (it comes from --plm_model_name).
    state = model.state_dict()
    assert any("lora_A" in k for k in state) and not any(k.endswith("base_layer.weight") for k in state)
    assert all("plm." not in k or "lora_" in k for k in state)
    model.eval()
    logits = model(batch(False)).logits
    reloaded = build(backbones[kind], **{**flags, "seed": 5})  # other heads' init: the load must bring them
    load_state(reloaded, {"model": state, "config": {}}, "ckpt")
    assert torch.allclose(reloaded.eval()(batch(False)).logits, logits, atol=1e-5)


@pytest.mark.parametrize("kind", FAMILIES)
def test_frozen_cache_with_lora_equals_the_uncached_forward(backbones, kind):
    model = build(backbones[kind], plm_lora_rank=4, plm_frozen_layers=2, plm_pooling="average").eval()
    enc = model.news_encoder
    assert enc.cache_frozen
    with torch.no_grad():  # non-zero adapters (peft starts lora_B at zero, where LoRA is the identity)
        for n, p in enc.plm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    uncached = model(batch(False)).logits
    model.prepare(log=lambda *a: None)
    assert model.news_encoder.has_frozen_cache
    cached = model(batch(False)).logits
    # fp16 cache: equal to ~1e-4 of the logits' scale (a wrong split, e.g. a final norm run twice, is off by O(1))
    assert (cached - uncached).abs().max() <= 1e-3 * uncached.abs().max() + 1e-3, (cached - uncached).abs().max()
    # Backward through the cached path reaches the adapters (they sit above the cached layers).
    model.train()
    model(batch()).loss.backward()
    assert all(p.grad is not None for n, p in enc.plm.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("kind", FAMILIES)
def test_precomputed_vectors_give_the_in_loop_frozen_logits(backbones, kind, tmp_path):
    pooling = pooling_for(kind)
    in_loop = build(backbones[kind], plm_frozen_layers=3, plm_pooling=pooling, plm_cache=False).eval()
    expected = in_loop(batch(False)).logits
    model = build(backbones[kind], tmp_path, plm_embeddings="precompute", plm_frozen_layers=3,
                  plm_pooling=pooling).eval()
    assert model.news_encoder.precompute and model.news_encoder.resolved_settings()["plm_frozen_layers"] == 3
    assert torch.allclose(model(batch(False)).logits, expected, atol=1e-5)  # no store yet: computed per call
    logs = []
    model.prepare(log=logs.append)
    assert "built" in logs[0] and len(list(tmp_path.glob("plm-embeddings-*.npy"))) == 1
    calls = []
    handle = model.news_encoder.plm.register_forward_pre_hook(lambda *a: calls.append(1))
    stored = model(batch(False)).logits
    handle.remove()
    assert not calls  # the stored vectors are read, the PLM does not run
    assert torch.allclose(stored, expected, atol=2e-3, rtol=1e-2), (stored - expected).abs().max()
    again = build(backbones[kind], tmp_path, plm_embeddings="precompute", plm_frozen_layers=3, plm_pooling=pooling)
    again.prepare(log=logs.append)
    assert "loaded" in logs[1]
    assert not any("plm." in k for k in model.state_dict())  # the frozen backbone is not in the checkpoint


def test_precompute_refuses_learned_pooling_and_lora(backbones):
    with pytest.raises(ValueError, match="--plm_pooling"):
        NEWS_ENCODERS["PLMMiner"](make_config(backbones["gpt2"], plm_embeddings="precompute",
                                              plm_pooling="attention", plm_frozen_layers=3), META)
    with pytest.raises(ValueError, match="--plm_lora_rank"):
        NEWS_ENCODERS["PLMMiner"](make_config(backbones["gpt2"], plm_embeddings="precompute", plm_pooling="last",
                                              plm_frozen_layers=3, plm_lora_rank=2), META)


def test_bf16_and_gradient_checkpointing_train(backbones):
    model = build(backbones["llama"], plm_dtype="bf16", gradient_checkpointing=True, plm_lora_rank=2,
                  plm_frozen_layers=0, plm_pooling="last").train()
    plm = model.news_encoder.plm
    assert any(getattr(m, "gradient_checkpointing", False) for m in plm.modules())
    assert plm.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    assert plm.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for n, p in plm.named_parameters() if "lora_" in n)
    loss = model(batch()).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in plm.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------------- main

def test_main_train_dev_test_with_a_tiny_decoder_lora_and_a_template(backbones, tmp_path):
    common = [f"--data_dir={tmp_path / 'data'}", f"--output_dir={tmp_path / 'out'}", "--no-progress"]
    flags = ["--news_encoder=PLMMiner", "--user_encoder=ATT", f"--plm_model_name={backbones['qwen2']}",
             "--plm_lora_rank=4", "--plm_frozen_layers=1", "--plm_pooling=last", "--plm_lr=1e-3",
             "--plm_text_template=News: {title} Category: {category}", "--plm_max_length=16",
             "--attention_dim=8", "--category_embedding_dim=8"]
    result = main(["--mode=train", "--dataset=demo", "--epoch=1", "--batch_size=64", "--max_history_num=10", *TINY_DEMO,
                   *flags, *common])
    run = Path(result["run_dir"])
    saved = json.loads((run / "config.json").read_text())
    assert saved["plm_lora_rank"] == 4 and saved["plm_text_template"].startswith("News: ")
    dev = main(["--mode=dev", f"--dev_model_path={result['checkpoint']}", *common])
    for key in ("auc", "mrr"):
        assert dev["metrics"][key] == pytest.approx(result["dev_metrics"][key], abs=1e-6)
    test = main(["--mode=test", f"--test_model_path={result['checkpoint']}", *common])
    assert 0 <= test["metrics"]["auc"] <= 1
    assert list((tmp_path / "data" / "cache").glob("plm-*"))  # the templated tokens are cached


def test_state_dict_holds_the_layer_stack_once_and_old_checkpoints_load(backbones):
    model = build(backbones["bert"], plm_pooling="cls")
    state = model.state_dict()
    assert not any("_all_layers" in k or "_layers_parent" in k for k in state)
    # A checkpoint written before the fix held the stack a second time under those names: it still loads.
    old = dict(state)
    for k, v in state.items():
        if k.startswith("news_encoder.plm.encoder.layer."):
            old[k.replace("news_encoder.plm.encoder.layer.", "news_encoder._all_layers.")] = v
            old[k.replace("news_encoder.plm.encoder.", "news_encoder._layers_parent.")] = v
    load_state(build(backbones["bert"], plm_pooling="cls"), {"model": old, "config": {}}, "old")


def test_precompute_freezes_every_layer_whatever_the_suggested_frozen_layers(backbones):
    # The demo suggests --plm_frozen_layers=4 without the user typing it: precompute still freezes all, with a note.
    enc = NEWS_ENCODERS["PLMMiner"](make_config(backbones["llama"], plm_embeddings="precompute", plm_pooling="last",
                                                plm_frozen_layers=1), META)
    assert enc.resolved_settings()["plm_frozen_layers"] == 3
    assert not any(p.requires_grad for p in enc.plm.parameters())
