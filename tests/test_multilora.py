"""MultiLoRALinear / LoRAContext / wrap_model: exact no-op without experts, the routed sum per sample against a plain
torch formula (every path: fused, grouped pair, autograd), metadata built once per step, the training hook's
gradients against torch autograd, and a 4-bit (bitsandbytes) base.

Legend: B samples, S positions, H input features, N output features, r rank.
"""
import warnings

import pytest
import torch
from torch import nn

from lumoe_engine.model import multilora as ml
from lumoe_engine.model.bank import ExpertBank
from lumoe_engine.model.tiny import build_tiny_llava
from lumoe_engine.model.tokenizer import train_tokenizer
from tolerances import assert_close

TEXTS = ["what is the name of this person", "where was she born", "which city is shown here",
         "the quick brown fox jumps over the lazy dog"] * 5


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=200)


def micro(tokenizer, seed=0):
    model, processor = build_tiny_llava(tokenizer, "micro", seed=seed)
    return model, processor


def bank_for(model, names, n=3, rank=4, seed=0, std=0.3, ranks=None):
    shapes = ml.module_shapes(model, names)
    bank = ExpertBank(None)
    for i in range(n):
        r = ranks[i] if ranks is not None else rank
        bank.add(ml.random_expert(f"e{i}", shapes, rank=r, alpha=2.0 * r, seed=seed + i, std=std))
    return bank


def inputs(tokenizer, batch=3, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, len(tokenizer), (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :2] = 0  # left padding on the first row
    ids[0, :2] = tokenizer.pad_token_id
    return ids, mask


def manual_delta(x, bank, name, slots, weights):
    """sum_j w[b, j] * scale_e * (x[b] @ A_e^T) @ B_e^T with plain torch, per sample. x: [B, S, H]."""
    out = torch.zeros(x.shape[0], x.shape[1], bank.module_shapes[name][1], dtype=torch.float64)
    infos = {eid: bank.info(eid) for eid in bank.ids}
    for b in range(x.shape[0]):
        for j in range(slots.shape[1]):
            s = int(slots[b, j])
            if s < 0:
                continue
            eid = bank.resident_ids[s]
            ex = bank.get(eid)
            if name not in ex.weights:
                continue
            a, bb = ex.weights[name]
            out[b] += float(weights[b, j]) * infos[eid].scale * (x[b].double() @ a.double().T) @ bb.double().T
    return out


# ------------------------------------------------------------------------------------------------ exact no-op

def test_no_experts_is_bitwise_base(tokenizer):
    model, _ = micro(tokenizer)
    ids, mask = inputs(tokenizer)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits.clone()
    names = ml.target_module_names(model)
    # an empty bank, then a bank with experts but no routing, then routing that is all -1
    ctx = ml.wrap_model(model, ExpertBank(None))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)
    ml.unwrap_model(model)
    bank = bank_for(model, names)
    ctx = ml.wrap_model(model, bank)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)
        with ctx.routing(torch.full((3, 2), -1)):
            assert not ctx.active
            assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)
        with ctx.routing([[0], [1], [-1]]):  # experts present: the logits must change (the test above can fail)
            assert ctx.active
            out = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.equal(out[:2], ref[:2])


def test_wrap_names_layers_and_unwrap(tokenizer):
    model, _ = micro(tokenizer)
    before = dict(model.named_modules())
    bank = ExpertBank(None)
    ctx = ml.wrap_model(model, bank, layers=[1])
    expected = [f"model.language_model.layers.1.{p}" for p in
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert list(ctx.modules) == expected
    for n in expected:
        layer = model.get_submodule(n)
        assert isinstance(layer, ml.MultiLoRALinear) and layer.name == n
        assert layer.base_layer is before[n]
        assert not layer.base_layer.weight.requires_grad
    assert not isinstance(model.get_submodule("model.language_model.layers.0.self_attn.q_proj"), ml.MultiLoRALinear)
    with pytest.raises(ValueError, match="already wrapped"):
        ml.wrap_model(model, bank)
    ml.unwrap_model(model)
    after = dict(model.named_modules())
    assert set(after) == set(before) and all(after[n] is before[n] for n in before)
    with pytest.raises(ValueError, match="not a decoder layer"):
        ml.wrap_model(model, bank, layers=[5])
    with pytest.raises(ValueError, match="no linear named"):
        ml.wrap_model(model, bank, targets=("nope",))
    ctx = ml.wrap_model(model, bank, layers=[0], include_projector=True)
    assert "model.multi_modal_projector.linear_1" in ctx.modules
    assert ctx.modules["model.multi_modal_projector.linear_1"].projector


# ------------------------------------------------------------------------------------------------ the routed sum

@pytest.mark.parametrize("path", ["fused", "pair", "autograd"])
def test_layer_matches_per_sample_formula(tokenizer, path, monkeypatch):
    model, _ = micro(tokenizer)
    names = ml.target_module_names(model, layers=[1])
    bank = bank_for(model, names, n=4, ranks=[1, 3, 4, 2])       # variable ranks
    ctx = ml.wrap_model(model, bank, layers=[1])
    layer = ctx.modules[names[-1]]                                  # down_proj: H = 128 -> N = 64
    if path == "pair":   # the grouped shrink + expand over the step's metadata
        monkeypatch.setattr(ml, "FUSED_MAX_ROWS", 0)
        monkeypatch.setattr(ml.ops, "backend_name", lambda: "torch")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 6, layer.in_features, generator=g)
    slots = torch.tensor([[0, 2], [1, -1], [-1, -1], [3, 0], [2, 1]])
    weights = torch.tensor([[0.7, 0.3], [1.0, 0.0], [0.0, 0.0], [0.5, 0.25], [1.0, 1.0]])
    base = layer.base_layer(x)
    ctx.set_routing(slots, weights)
    if path == "autograd":
        x.requires_grad_(True)
        y = layer(x)
        assert y.requires_grad
        y.sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
        y = y.detach()
    else:
        with torch.no_grad():
            y = layer(x)
    expected = base.double() + manual_delta(x.detach(), bank, layer.name, slots, weights)
    assert_close(y, expected.float(), torch.float32, what=f"{path} routed sum")
    assert torch.equal(y[2], base[2].detach()), "a sample with no expert must get the base output bitwise"


def test_token_mask_and_decode_shapes(tokenizer):
    model, _ = micro(tokenizer)
    names = ml.target_module_names(model, layers=[1])
    bank = bank_for(model, names)
    ctx = ml.wrap_model(model, bank, layers=[1])
    layer = ctx.modules[names[0]]
    x = torch.randn(2, 4, layer.in_features)
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    with torch.no_grad():
        base = layer.base_layer(x)
        with ctx.routing([[0], [1]], token_mask=mask):
            y = layer(x)
            y_dec = layer(x[:, :1])                                  # a decode step: [B, 1, H], no mask applies
        assert torch.equal(y[0, :2], base[0, :2])                   # pad positions: no expert
        assert not torch.equal(y[0, 2:], base[0, 2:])
        exp_dec = base[:, :1].double() + manual_delta(x[:, :1], bank, layer.name, torch.tensor([[0], [1]]),
                                                      torch.ones(2, 1))
        assert_close(y_dec, exp_dec.float(), torch.float32, what="decode step")
        with ctx.routing([[0], [1], [2]]):
            with pytest.raises(ValueError, match="routing is for 3 samples"):
                layer(x)
    with pytest.raises(ValueError, match="slots must lie in"):
        ctx.set_routing([[0], [7]])
    with pytest.raises(ValueError, match="weights"):
        ctx.set_routing([[0], [1]], weights=[[1.0, 2.0]])


def test_metadata_built_once_per_step(tokenizer, monkeypatch):
    model, _ = micro(tokenizer)
    names = ml.target_module_names(model)
    bank = bank_for(model, names)
    ctx = ml.wrap_model(model, bank)
    builds, metas = [], []
    real_build, real_meta = ml.LoRAContext._build_step, ml.ops.build_routing
    monkeypatch.setattr(ml.LoRAContext, "_build_step", lambda self, *a: builds.append(a) or real_build(self, *a))
    monkeypatch.setattr(ml.ops, "build_routing", lambda *a, **k: metas.append(1) or real_meta(*a, **k))
    ids, mask = inputs(tokenizer)
    ctx.set_routing([[0], [1], [2]], token_mask=mask)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert len(builds) == 1, f"{len(builds)} per-token routings built for one forward of {len(names)} layers"
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)                    # same shape and routing: reused
    assert len(builds) == 1
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    model(inputs_embeds=embeds, attention_mask=mask).logits.sum().backward()   # autograd path: metadata once
    assert len(builds) == 1 and len(metas) == 1
    bank.add(ml.random_expert("late", ml.module_shapes(model, names), rank=2, seed=9))   # bank version changes
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert len(builds) == 2


# ------------------------------------------------------------------------------------------------ training hook

def test_trainable_expert_gradients_match_torch(tokenizer):
    model, _ = micro(tokenizer)
    ref_model, _ = micro(tokenizer)
    model.requires_grad_(False)
    ref_model.requires_grad_(False)
    names = ml.target_module_names(model, layers=[1])
    ctx = ml.wrap_model(model, ExpertBank(None), layers=[1])
    te = ml.new_trainable_expert(ctx, rank=3, alpha=6.0, seed=0)
    for _, b in te.weights.values():
        with torch.no_grad():
            b.normal_(0, 0.1)              # B = 0 at init would give A no gradient: make both live
    # reference: the same LoRA written as plain torch forward hooks on the unwrapped copy
    ref_params = {m: (a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True))
                  for m, (a, b) in te.weights.items()}

    def hook(name):
        def fn(mod, args, out):
            a, b = ref_params[name]
            return out + te.scale * (args[0] @ a.T) @ b.T
        return fn
    for m in names:
        ref_model.get_submodule(m).register_forward_hook(hook(m))
    ids, mask = inputs(tokenizer)
    labels = ids.clone()
    ctx.set_trainable(te)
    e1 = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    e2 = e1.detach().clone().requires_grad_(True)
    loss = model(inputs_embeds=e1, attention_mask=mask, labels=labels).loss
    loss_ref = ref_model(inputs_embeds=e2, attention_mask=mask, labels=labels).loss
    assert_close(loss, loss_ref, torch.float32, what="loss")
    loss.backward()
    loss_ref.backward()
    assert_close(e1.grad, e2.grad, torch.float32, scale=10, what="grad of the input embeddings (x)")
    for m in names:
        a, b = te.weights[m]
        ra, rb = ref_params[m]
        assert a.grad is not None and a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
        assert_close(a.grad, ra.grad, torch.float32, scale=10, what=f"dA {m}")
        assert_close(b.grad, rb.grad, torch.float32, scale=10, what=f"dB {m}")
        assert ctx.modules[m].base_layer.weight.grad is None
    assert all(p.grad is None for n, p in model.named_parameters() if "lora" not in n)
    ex = te.to_expert("trained", {"request": "r1"})
    ex.validate()
    assert ex.rank == 3 and set(ex.weights) == set(names)
    ctx.set_trainable(None)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                           micro(tokenizer)[0](input_ids=ids, attention_mask=mask).logits)


# ------------------------------------------------------------------------------------------------ 4-bit base

def test_4bit_base_wraps_and_runs(tokenizer, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from lumoe_engine.model.load import load_model

    model, processor = micro(tokenizer)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q, _ = load_model(tmp_path, load_in_4bit=True)
    names = ml.target_module_names(q, layers=[1])
    assert all(isinstance(q.get_submodule(n), bnb.nn.Linear4bit) for n in names)
    assert all(not q.get_submodule(n).support_avx512bf16_for_cpu for n in names)
    ids, mask = inputs(tokenizer)
    with torch.no_grad():
        ref = q(input_ids=ids, attention_mask=mask).logits.clone()
    bank = bank_for(model, names)
    ctx = ml.wrap_model(q, bank, layers=[1])
    layer = ctx.modules[names[0]]
    x = torch.randn(3, 5, layer.in_features)
    with torch.no_grad():
        assert torch.equal(q(input_ids=ids, attention_mask=mask).logits, ref)
        base = layer.base_layer(x)
        with ctx.routing([[0], [-1], [2]]):
            y = layer(x)
            out = q(input_ids=ids, attention_mask=mask).logits
    exp = base.double() + manual_delta(x, bank, layer.name, torch.tensor([[0], [-1], [2]]), torch.ones(3, 1))
    assert_close(y, exp.float(), torch.float32, what="4-bit base + experts")
    assert torch.isfinite(out).all() and not torch.equal(out[0], ref[0])
    # training through a 4-bit base: gradients reach the trainable expert, none the packed weights
    te = ml.new_trainable_expert(ctx, rank=2, seed=1)
    with ctx.training(te):
        loss = q(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
    assert all(a.grad is not None and b.grad.abs().sum() > 0 for a, b in te.weights.values())


def test_bad_inputs(tokenizer):
    model, _ = micro(tokenizer)
    with pytest.raises(ValueError, match="expected an ExpertBank"):
        ml.wrap_model(model, object())
    ctx = ml.wrap_model(model, ExpertBank(None), layers=[1])
    with pytest.raises(ValueError, match="TrainableExpert"):
        ctx.set_trainable("x")
    with pytest.raises(ValueError, match="rank"):
        ml.new_trainable_expert(ctx, rank=0)
    with pytest.raises(ValueError, match="nn.Linear"):
        ml.MultiLoRALinear(nn.Conv1d(2, 2, 1), "c", ctx)
    with pytest.raises(ValueError, match="not wrapped"):
        ml.unwrap_model(micro(tokenizer)[0])
