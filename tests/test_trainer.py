"""Expert trainer and sequential baselines on a micro LLaVA over the tiny synthetic benchmark (a few steps each).

The trainer: a new expert's B becomes non-zero, the base weights stay bitwise unchanged (hash), a nan loss is a clear
error with nothing returned, images reach the loss through the processor, bad requests fail before training, the
bank's experts do not take part in training. The baselines: the merge adds exactly scale * B @ A into the weights,
one shared LoRA per model (fresh each request, merged, no bank).
"""
import copy
import dataclasses
import hashlib

import pytest
import torch

from lumoe_engine.data.mlubench import load_benchmark, load_image
from lumoe_engine.data.streams import Request, build_stream
from lumoe_engine.data.synthetic import SyntheticConfig, ensure_synthetic
from lumoe_engine.model.bank import ExpertBank
from lumoe_engine.model.collate import pixel_values_for
from lumoe_engine.model.multilora import module_shapes, random_expert, target_module_names, wrap_model
from lumoe_engine.model.tiny import build_tiny_llava
from lumoe_engine.model.tokenizer import train_tokenizer
from lumoe_engine.unlearn.baselines import SequentialBaseline, baseline_loss, merge_expert
from lumoe_engine.unlearn.losses import REFUSALS, LossConfig, NonFiniteLossError, unlearning_loss
from lumoe_engine.unlearn.trainer import (RecordBatches, RequestError, TrainConfig, check_request, train_expert)

FAST = TrainConfig(steps=3, lr=1e-2, batch_size=8, retain_batch_size=8, progress=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = ensure_synthetic(cache_dir=tmp_path_factory.mktemp("syn"), config=SyntheticConfig.preset("tiny"))
    bench = load_benchmark(root)
    texts = [r.question for r in bench.records] + [r.answer for r in bench.records] + list(REFUSALS)
    tok = train_tokenizer(texts, vocab_size=400)
    model, processor = build_tiny_llava(tok, "micro", seed=0)
    req = build_stream(bench, "abcd")[0]
    img = [r for r in req.forget if r.form == "image_text"][:6]
    txt = [r for r in req.forget if r.form == "text_only"][:4]
    small = dataclasses.replace(req, forget=img + txt, retain=req.retain[:10])
    return model, processor, bench, small


def _hash(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _wrapped(model):
    m = copy.deepcopy(model)
    return m, wrap_model(m, ExpertBank(None), layers=[1])


@pytest.mark.parametrize("loss", ["idk", "npo"])
def test_expert_trains_and_base_stays_frozen(setup, loss):
    model, processor, _, req = setup
    m, ctx = _wrapped(model)
    before = _hash(m)
    expert, stats = train_expert(m, processor, ctx, req, LossConfig(name=loss), FAST)
    assert _hash(m) == before, "base weights changed during expert training"
    assert all(not p.requires_grad for p in m.parameters())
    assert ctx.trainable is None
    assert expert.id == req.id and set(expert.weights) == set(ctx.modules)
    bmax = {name: float(b.abs().max()) for name, (a, b) in expert.weights.items()}
    print(f"{loss}: |B| max per module min {min(bmax.values()):.2e}; loss {stats['first']['loss']:.4f} -> "
          f"{stats['final']['loss']:.4f} in {stats['seconds']:.2f} s")
    assert min(bmax.values()) > 0, "some module's B stayed zero"
    assert stats["steps"] == 3 and stats["loss"] == loss and stats["n_retain"] == len(req.retain)
    for k in ("method", "loss", "steps", "final", "seconds", "entities"):
        assert k in expert.metadata
    expert.validate()  # finite, JSON metadata: the bank would accept it


def test_bank_experts_do_not_take_part_in_training(setup):
    """Only the new expert is active: the same seed gives the same expert whether the bank holds 0 or 3 experts."""
    model, processor, _, req = setup
    m1, ctx1 = _wrapped(model)
    e1, _ = train_expert(m1, processor, ctx1, req, LossConfig(name="idk"), FAST)
    m2 = copy.deepcopy(model)
    names = target_module_names(m2, layers=[1])
    bank = ExpertBank(None)
    for i in range(3):
        bank.add(random_expert(f"old{i}", module_shapes(m2, names), rank=4, seed=i, std=0.5))
    ctx2 = wrap_model(m2, bank, layers=[1])
    ctx2.set_routing([[0], [1]])  # a stale routing must not leak into training either
    e2, _ = train_expert(m2, processor, ctx2, req, LossConfig(name="idk"), FAST)
    worst = max(float((e1.weights[k][1] - e2.weights[k][1]).abs().max()) for k in e1.weights)
    print(f"max |B(empty bank) - B(3 experts)| = {worst:.2e}")
    assert worst < 1e-5


def test_nan_loss_is_a_clear_error_and_nothing_is_returned(setup):
    model, processor, _, req = setup
    m, ctx = _wrapped(model)
    with torch.no_grad():  # a diverged base: every logit nan
        m.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match=rf"nan at step 0 of request {req.id}.*lower lr"):
        train_expert(m, processor, ctx, req, LossConfig(name="idk"), FAST)
    assert ctx.trainable is None  # the half-trained expert is gone


def test_images_reach_the_loss_through_the_processor(setup):
    model, processor, _, req = setup
    loader = RecordBatches(req.forget, processor, batch_size=10, seed=0)
    rows, batch = next(loader)
    img_rows = [r for r in rows if r.form == "image_text"]
    assert 0 < len(img_rows) < len(rows)  # both forms in one batch
    pv = batch["pixel_values"]
    assert pv.shape[0] == len(img_rows) and pv.dim() == 4
    expected = pixel_values_for(processor, [load_image(r) for r in img_rows])
    assert torch.equal(pv, expected)  # what the processor makes of each record's own image
    cfg = LossConfig(name="ga")
    with torch.no_grad():
        a, _ = unlearning_loss(model, {"forget": batch}, cfg)
        b, _ = unlearning_loss(model, {"forget": dict(batch, pixel_values=torch.zeros_like(pv))}, cfg)
    print(f"ga loss with the records' images {float(a):.6f}, with blank pixels {float(b):.6f}")
    assert abs(float(a) - float(b)) > 1e-6


def test_record_batches_shard_the_global_batch(setup):
    _, processor, _, req = setup
    full = RecordBatches(req.forget, processor, batch_size=6, seed=3)
    shards = [RecordBatches(req.forget, processor, batch_size=6, seed=3, rank=k, world=2) for k in (0, 1)]
    for _ in range(3):
        rows = [r.uid for r in next(full)[0]]
        got = [[r.uid for r in next(s)[0]] for s in shards]
        assert got[0] == rows[0::2] and got[1] == rows[1::2]


def test_bad_requests_fail_before_training(setup, tmp_path):
    model, processor, _, req = setup
    empty = dataclasses.replace(req, id="empty", forget=[])
    with pytest.raises(RequestError, match="'empty': forget set is empty"):
        check_request(empty, LossConfig(name="idk"))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    bad_img = dataclasses.replace(req.forget[0], image=str(broken), image_missing=False)
    with pytest.raises(RequestError, match=r"image .*broken.png .* cannot be opened"):
        check_request(dataclasses.replace(req, id="badimg", forget=[bad_img] + req.forget[1:]),
                      LossConfig(name="idk"))
    with pytest.raises(RequestError, match="loss 'gd' needs retain records"):
        check_request(dataclasses.replace(req, retain=[]), LossConfig(name="gd"))
    m, ctx = _wrapped(model)
    before = _hash(m)
    with pytest.raises(RequestError):
        train_expert(m, processor, ctx, empty, LossConfig(name="idk"), FAST)
    assert _hash(m) == before and ctx.trainable is None


# ------------------------------------------------------------------------------------------------- baselines
def test_merge_adds_scale_b_a_into_the_weights(setup):
    model, processor, _, req = setup
    m, ctx = _wrapped(model)
    expert, _ = train_expert(m, processor, ctx, req, baseline_loss("gd"), FAST)
    before = {n: ctx.modules[n].base_layer.weight.detach().clone() for n in expert.weights}
    assert merge_expert(ctx, expert) == len(expert.weights)
    worst = 0.0
    for n, (a, b) in expert.weights.items():
        delta = ctx.modules[n].base_layer.weight - before[n]
        want = expert.scale * b @ a
        assert float(want.abs().max()) > 0
        worst = max(worst, float((delta - want).abs().max()))
    print(f"max |(W_after - W_before) - scale * B @ A| = {worst:.2e}")
    assert worst < 1e-6


def test_sequential_baseline_one_shared_lora_merged_each_request(setup):
    model, processor, bench, req = setup
    m = copy.deepcopy(model)
    n_params = len(list(m.parameters()))
    req2 = dataclasses.replace(build_stream(bench, "abcd")[1], forget=build_stream(bench, "abcd")[1].forget[:8],
                               retain=req.retain)
    base = SequentialBaseline(m, processor, "gd", train_cfg=FAST, layers=[0, 1])
    names = list(base.ctx.modules)
    assert len(names) == 14  # 7 targets x both decoder layers: the paper's LoRA over the whole LM
    w = [{n: base.ctx.modules[n].base_layer.weight.detach().clone() for n in names}]
    for r in (req, req2):
        stats = base.learn(r)
        assert stats["merged_modules"] == len(names)
        w.append({n: base.ctx.modules[n].base_layer.weight.detach().clone() for n in names})
        assert base.ctx.trainable is None and base.ctx.bank.num_resident == 0  # no bank, no gate
    for k in (1, 2):
        changed = sum(not torch.equal(w[k][n], w[k - 1][n]) for n in names)
        assert changed == len(names), f"request {k}: only {changed} of {len(names)} weights changed"
    base.close()
    assert len(list(m.parameters())) == n_params  # the LoRA lives only in the merged weights
    assert all(type(m.get_submodule(n)).__name__ == "Linear" for n in names)
    assert torch.equal(m.get_submodule(names[0]).weight, w[2][names[0]])
    with pytest.raises(ValueError, match="baseline 'lumoe'"):
        baseline_loss("lumoe")


def _probe_logits(model, processor, records):
    from lumoe_engine.model.collate import collate

    batch = collate(records, processor, image_fn=load_image)
    batch.pop("labels")
    with torch.no_grad():
        return model(**batch).logits.float()


def test_baseline_on_a_4bit_base_changes_the_model_after_each_request(setup, tmp_path):
    """NF4 weights cannot absorb a LoRA: the baseline keeps every earlier request's LoRA active on every token (the
    merge, through the grouped-LoRA op); the model's answers change after each request, its weights never."""
    import bitsandbytes as bnb

    from lumoe_engine.model.load import load_model

    model, processor, bench, req = setup
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    q, qproc = load_model(tmp_path / "m", load_in_4bit=True)
    n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in q.modules())
    with pytest.raises(ValueError, match="quantised"):  # the weight merge refuses NF4 ...
        merge_expert(wrap_model(copy.deepcopy(q), ExpertBank(None), layers=[1]),
                     random_expert("x", {target_module_names(q, layers=[1])[0]: (64, 64)}))
    before = _hash(q)
    base = SequentialBaseline(q, qproc, "ga", train_cfg=FAST, layers=[0, 1])
    assert base.merge == "active"
    probe = req.forget[:3] + req.retain[:3]
    logits = [_probe_logits(q, qproc, probe)]
    r2 = dataclasses.replace(build_stream(bench, "abcd")[1], forget=build_stream(bench, "abcd")[1].forget[:8],
                             retain=req.retain)
    for k, r in enumerate((req, r2), start=1):
        stats = base.learn(r)  # ... the baseline does not fail: its LoRA joins the model
        assert stats["merged_modules"] == 14 and base.ctx.bank.num_resident == k
        assert base.ctx.always is not None and base.ctx.always.tolist() == list(range(k))
        logits.append(_probe_logits(q, qproc, probe))
        change = float((logits[k] - logits[k - 1]).abs().max())
        print(f"4-bit baseline, request {k}: max |logit change| {change:.4f}")
        assert change > 1e-3, f"request {k} did not change the 4-bit baseline's model"
    base.close()
    assert _hash(q) == before and sum(isinstance(m, bnb.nn.Linear4bit) for m in q.modules()) == n4
    assert torch.allclose(_probe_logits(q, qproc, probe), logits[0])  # unwrapped: the base again


def test_active_loras_are_the_merge(setup):
    """On a full-precision base, keeping the LoRAs active gives the merged model's outputs (2 requests)."""
    model, processor, bench, req = setup
    r2 = dataclasses.replace(build_stream(bench, "abcd")[1], forget=build_stream(bench, "abcd")[1].forget[:8],
                             retain=req.retain)
    probe = req.forget[:3] + req.retain[:3]
    out = {}
    for merge in ("weights", "active"):
        m = copy.deepcopy(model)
        base = SequentialBaseline(m, processor, "gd", train_cfg=FAST, layers=[0, 1], merge=merge)
        for r in (req, r2):
            base.learn(r)
        out[merge] = _probe_logits(m, processor, probe)
        base.close()
    err = float((out["weights"] - out["active"]).abs().max())
    print(f"merged weights vs active LoRAs: max |logit diff| {err:.2e}")
    assert float((out["weights"] - _probe_logits(model, processor, probe)).abs().max()) > 1e-3
    assert err < 1e-3
