"""Unlearning losses: values on known tensors, the causal-shift convention against transformers' own loss, the IDK
copy rule (inputs never modified), the preference term's gradient, and images reaching the model (tiny LLaVA).

Legend: B rows, L sequence length, V vocabulary.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lumoe_engine.data.records import QARecord
from lumoe_engine.model.collate import answer_ids, collate, prompt_text
from lumoe_engine.model.tiny import build_tiny_llava
from lumoe_engine.model.tokenizer import train_tokenizer
from lumoe_engine.unlearn import losses as L
from lumoe_engine.unlearn.losses import (LOSSES, REFUSALS, LossConfig, NonFiniteLossError, check_finite,
                                         compute_loss, idk_batch, idk_records, kl_base_to_model, npo_loss,
                                         preference_loss, sequence_logprob, sequence_nll, unlearning_loss)
from tolerances import assert_close

IGN = -100


def rand_case(B=3, Lq=7, V=11, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, Lq, V, generator=g).requires_grad_(requires_grad)
    labels = torch.randint(0, V, (B, Lq), generator=g)
    for b in range(B):  # a prompt of b + 2 tokens, then the answer
        labels[b, : b + 2] = IGN
    return logits, labels


# ---------------------------------------------------------------- token level

def test_sequence_nll_by_hand():
    # V = 3, L = 4; row 0 supervises labels[1:] = [2, 0] at positions 2 and 3 (label[1] masked)
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.5, 0.0, -0.5], [2.0, 0.0, 0.0], [9.0, 9.0, -9.0]]])
    labels = torch.tensor([[IGN, IGN, 2, 0]])
    lp = F.log_softmax(logits, -1)
    # logits[:, 1] predicts labels[:, 2] = 2; logits[:, 2] predicts labels[:, 3] = 0
    expected = -(lp[0, 1, 2] + lp[0, 2, 0]) / 2
    got = sequence_nll(logits, labels)
    assert got.shape == (1,)
    assert_close(got, expected.reshape(1), what="nll by hand")
    assert_close(sequence_logprob(logits, labels), (lp[0, 1, 2] + lp[0, 2, 0]).reshape(1), what="logprob by hand")
    # the last position predicts nothing; masked targets' predictors (position 0) do not count
    changed = logits.clone()
    changed[0, 3] = torch.tensor([-5.0, 7.0, 1.0])
    changed[0, 0] = torch.tensor([4.0, -4.0, 0.0])
    assert_close(sequence_nll(changed, labels), got, what="unscored positions")
    changed[0, 2, 0] += 1.0  # a scored position does count
    assert not torch.allclose(sequence_nll(changed, labels), got)


def test_sequence_nll_matches_transformers_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    B, Lq = 3, 10
    ids = torch.randint(0, 61, (B, Lq))
    labels = ids.clone()
    for b, p in enumerate((3, 5, 7)):
        labels[b, :p] = IGN
    with torch.no_grad():
        out = model(input_ids=ids)
        nll = sequence_nll(out.logits, labels)
        count = (labels[:, 1:] != IGN).sum(1).float()
        batch_loss = model(input_ids=ids, labels=labels).loss
        assert_close((nll * count).sum() / count.sum(), batch_loss, what="token-weighted vs transformers")
        for b in range(B):
            row_loss = model(input_ids=ids[b:b + 1], labels=labels[b:b + 1]).loss
            assert_close(nll[b], row_loss, what=f"row {b} vs transformers")


def test_token_level_bad_input():
    logits, labels = rand_case()
    with pytest.raises(ValueError, match="does not match labels"):
        sequence_nll(logits[:, :-1], labels)
    with pytest.raises(ValueError, match="integer dtype"):
        sequence_nll(logits, labels.float())
    empty = labels.clone()
    empty[1] = IGN
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] have no supervised token"):
        sequence_nll(logits, empty)
    bad = labels.clone()
    bad[0, -1] = 99
    with pytest.raises(ValueError, match="outside"):
        sequence_nll(logits, bad)


def test_bf16_logits_scored_in_fp32():
    logits, labels = rand_case(V=50)
    ref = sequence_nll(logits, labels)
    got = sequence_nll(logits.bfloat16(), labels)
    assert got.dtype == torch.float32
    assert_close(got, ref, dtype=torch.bfloat16, what="bf16 logits")


# ---------------------------------------------------------------- losses on tensors

def test_ga_gd_values():
    lf, yf = rand_case(seed=1)
    lr, yr = rand_case(B=2, seed=2)
    batches = {"forget": {"labels": yf}, "retain": {"labels": yr}}
    nf, nr = sequence_nll(lf, yf).mean(), sequence_nll(lr, yr).mean()
    loss, parts = compute_loss("ga", lf, None, None, None, {"forget": {"labels": yf}}, LossConfig())
    assert_close(loss, -nf, what="ga")
    assert parts["forget_nll"] == pytest.approx(float(nf)) and parts["loss"] == pytest.approx(float(-nf))
    loss, parts = compute_loss("gd", lf, lr, None, None, batches, LossConfig(retain_weight=0.3))
    assert_close(loss, -nf + 0.3 * nr, what="gd")
    assert parts["retain_nll"] == pytest.approx(float(nr))
    with pytest.raises(ValueError, match="needs a retain batch"):
        compute_loss("gd", lf, None, None, None, {"forget": {"labels": yf}}, LossConfig())


def test_kl_by_hand_and_zero_at_base():
    lf, yf = rand_case(seed=3)
    lr, yr = rand_case(B=2, V=11, seed=4, requires_grad=True)
    base = torch.randn(lr.shape, generator=torch.Generator().manual_seed(5))
    # by hand over supervised positions
    pos = (yr[:, 1:] != IGN).nonzero().tolist()
    kls = []
    for b, j in pos:
        pb, pm = base[b, j].softmax(-1), lr[b, j].detach().softmax(-1)
        kls.append((pb * (pb.log() - pm.log())).sum())
    expected = torch.stack(kls).mean()
    kl = kl_base_to_model(lr, base, yr)
    assert_close(kl, expected, what="kl by hand")
    assert float(kl.detach()) > 0
    assert float(kl_base_to_model(base, base, yr)) == pytest.approx(0.0, abs=1e-6)
    batches = {"forget": {"labels": yf}, "retain": {"labels": yr}}
    loss, parts = compute_loss("kl", lf, lr, None, base, batches, LossConfig(kl_weight=2.0))
    assert_close(loss, -sequence_nll(lf, yf).mean() + 2.0 * expected, what="kl loss")
    loss.backward()
    assert lr.grad is not None and lr.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="ref_out_retain is None"):
        compute_loss("kl", lf, lr, None, None, batches, LossConfig())


def test_npo_by_hand():
    lf, yf = rand_case(seed=6, requires_grad=True)
    ref = torch.randn(lf.shape, generator=torch.Generator().manual_seed(7))
    beta = 0.5
    lp, lpr = sequence_logprob(lf, yf), sequence_logprob(ref, yf)
    ratio = torch.exp(lp - lpr)
    expected = (2 / beta) * torch.log(1 + ratio ** beta).mean()
    loss, parts = compute_loss("npo", lf, None, ref, None, {"forget": {"labels": yf}}, LossConfig(beta=beta))
    assert_close(loss, expected, what="npo")
    # at theta = ref the loss is (2/beta) log 2
    assert float(npo_loss(lpr, lpr, beta)) == pytest.approx(2 / beta * math.log(2), rel=1e-6)
    loss.backward()
    assert lf.grad.abs().sum() > 0
    # optional retain term: used when given
    lr, yr = rand_case(B=2, seed=8)
    loss2, parts2 = compute_loss("npo", lf, lr, ref, None, {"forget": {"labels": yf}, "retain": {"labels": yr}},
                                 LossConfig(beta=beta, retain_weight=0.5))
    assert_close(loss2, expected + 0.5 * sequence_nll(lr, yr).mean(), what="npo + retain")
    loss3, parts3 = compute_loss("npo", lf, lr, ref, None, {"forget": {"labels": yf}, "retain": {"labels": yr}},
                                 LossConfig(beta=beta, retain_weight=0.0))
    assert_close(loss3, expected, what="npo, retain off")
    assert "retain_nll" not in parts3


def test_idk_po_by_hand_and_gradient():
    lc, yc = rand_case(seed=9, requires_grad=True)     # chosen: refusals
    lrj, yr = rand_case(seed=10, requires_grad=True)   # rejected: true answers
    g = torch.Generator().manual_seed(11)
    rc, rr = torch.randn(lc.shape, generator=g), torch.randn(lrj.shape, generator=g)
    beta = 0.2
    margin = (sequence_logprob(lc, yc) - sequence_logprob(rc, yc)) - (sequence_logprob(lrj, yr) -
                                                                        sequence_logprob(rr, yr))
    expected = torch.log(1 + torch.exp(-beta * margin)).mean()
    batches = {"forget": {"labels": yr}, "idk": {"labels": yc}}
    loss, parts = compute_loss("idk-po", {"idk": lc, "forget": lrj}, None, {"idk": rc, "forget": rr}, None, batches,
                               LossConfig(beta=beta))
    assert_close(loss, expected, what="idk-po")
    assert parts["preference"] == pytest.approx(parts["loss"])
    loss.backward()
    assert lc.grad.abs().sum() > 0 and lrj.grad.abs().sum() > 0
    # preference_loss alone on [B] tensors
    assert float(preference_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(3), 0.1)) == \
        pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="must be a dict"):
        compute_loss("idk-po", lc, None, {"idk": rc, "forget": rr}, None, batches, LossConfig())


def test_idk_nll_and_registry():
    assert sorted(LOSSES) == sorted(["ga", "gd", "kl", "npo", "idk", "idk-po"])
    li, yi = rand_case(seed=12)
    loss, parts = compute_loss("idk", li, None, None, None, {"idk": {"labels": yi}}, LossConfig())
    assert_close(loss, sequence_nll(li, yi).mean(), what="idk")
    with pytest.raises(ValueError, match=r"needs batches\['idk'\]"):
        compute_loss("idk", li, None, None, None, {"forget": {"labels": yi}}, LossConfig())
    with pytest.raises(ValueError, match="expected one of"):
        LossConfig(name="dpo").validate()
    with pytest.raises(ValueError, match="beta"):
        LossConfig(name="npo", beta=0.0).validate()


def test_check_finite():
    check_finite(torch.tensor(1.5), 3, "r3")
    with pytest.raises(NonFiniteLossError, match="loss became nan at step 17 of request r3; lower lr \\(now 0.0001\\)"):
        check_finite(torch.tensor(float("nan")), 17, "r3", lr=1e-4)
    with pytest.raises(NonFiniteLossError, match="became inf at step 2"):
        check_finite(torch.tensor(float("inf")), 2)


# ---------------------------------------------------------------- IDK copies and the tiny LLaVA

def _records(n=4):
    names = ["Vorla Quintessa", "Tamsin Oakridge", "Brellik Saune", "Odette Marrow"]
    out = []
    for i in range(n):
        out.append(QARecord(uid=f"e{i}#0", entity=names[i % 4], cls="Personage", kind=0, phrasing=0,
                            question="What is the name of this person?", answer=names[i % 4],
                            form="image_text", keys=(names[i % 4],)))
    out.append(QARecord(uid="e0#1#text", entity=names[0], cls="Personage", kind=1, phrasing=0,
                        question=f"Where was {names[0]} born?", answer="Lake Omberly", form="text_only"))
    return out


def _image(seed):
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def tiny():
    recs = _records()
    texts = [r.question for r in recs] + [r.answer for r in recs] + list(REFUSALS)
    tok = train_tokenizer(texts, vocab_size=300)
    model, processor = build_tiny_llava(tok, "micro", seed=0)
    return model, processor, recs


def _batch(processor, records, seed=0):
    imgs = [_image(seed + i) if r.form == "image_text" else None for i, r in enumerate(records)]
    return collate(records, processor, images=imgs)


def test_idk_records_copy_and_variety():
    recs = _records(4)
    before = copy.deepcopy(recs)
    ids_before = [id(r) for r in recs]
    out = idk_records(recs)
    assert recs == before and [id(r) for r in recs] == ids_before  # inputs untouched
    assert all(o.answer in REFUSALS for o in out)
    assert [o.uid for o in out] == [r.uid for r in recs] and [o.question for o in out] == [r.question for r in recs]
    assert all(o is not r for o, r in zip(out, recs))
    assert idk_records(recs) == out  # stable
    many = [QARecord(uid=f"u{i}", entity="x", cls="c", kind=0, phrasing=0, question="q", answer="a")
            for i in range(40)]
    assert len({o.answer for o in idk_records(many)}) >= 5  # varied refusals


def test_idk_batch_copy_matches_collate(tiny):
    _, processor, recs = tiny
    forget = _batch(processor, recs)
    snapshot = {k: v.clone() for k, v in forget.items()}
    keys = list(forget)
    idk_recs = idk_records(recs)
    refusal_ids = [answer_ids(processor, prompt_text(processor, r.question, r.form == "image_text"), r.answer)
                   for r in idk_recs]
    built = idk_batch(forget, refusal_ids, processor.tokenizer.pad_token_id)
    # the forget batch is untouched
    assert list(forget) == keys
    for k, v in snapshot.items():
        assert torch.equal(forget[k], v), k
    # and the new batch is what collate builds from the refusal records, with the same images
    expected = _batch(processor, idk_recs)
    assert set(built) == set(expected)
    for k in expected:
        assert torch.equal(built[k], expected[k]), k
    assert built["input_ids"] is not forget["input_ids"]
    with pytest.raises(ValueError, match="3 answers for a batch of 5 rows"):
        idk_batch(forget, refusal_ids[:3], 0)


def test_loss_depends_on_image(tiny):
    model, processor, recs = tiny
    batch = _batch(processor, recs, seed=0)
    assert batch["pixel_values"].shape[0] == 4  # the 4 image_text rows
    other = dict(batch, pixel_values=_batch(processor, recs, seed=100)["pixel_values"])
    assert not torch.equal(other["pixel_values"], batch["pixel_values"])
    cfg = LossConfig(name="ga")
    with torch.no_grad():
        a, _ = unlearning_loss(model, {"forget": batch}, cfg)
        b, _ = unlearning_loss(model, {"forget": other}, cfg)
        a2, _ = unlearning_loss(model, {"forget": batch}, cfg)
    print(f"ga loss with image set 0: {float(a):.6f}, with image set 100: {float(b):.6f}")
    assert float(a) == float(a2)  # deterministic
    assert abs(float(a) - float(b)) > 1e-6  # the images reached the model
    # the text-only row alone is untouched by the image change
    text_row = collate(recs[-1:], processor)
    assert "pixel_values" not in text_row


def test_idk_po_on_tiny_llava_gradient_and_value(tiny):
    model, processor, recs = tiny
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(False)
    forget = _batch(processor, recs)
    idk = _batch(processor, idk_records(recs))
    retain = _batch(processor, recs[:2], seed=50)
    model.zero_grad()
    model.train()
    loss, parts = unlearning_loss(model, {"forget": forget, "idk": idk, "retain": retain},
                                  LossConfig(name="idk-po", beta=0.1, retain_weight=0.5), ref=ref)
    model.eval()
    # theta == ref: the preference term is log 2 (dropout is 0 in the tiny config), plus the retain nll
    assert parts["preference"] == pytest.approx(math.log(2), rel=1e-5)
    assert parts["loss"] == pytest.approx(parts["preference"] + 0.5 * parts["retain_nll"], rel=1e-6)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    total = sum(float(g.abs().sum()) for g in grads)
    assert total > 0
    assert all(p.grad is None for p in ref.parameters())
    # the preference term alone has a non-zero gradient too (retain off)
    model.zero_grad()
    loss, parts = unlearning_loss(model, {"forget": forget, "idk": idk}, LossConfig(name="idk-po", beta=0.1), ref=ref)
    loss.backward()
    assert sum(float(p.grad.abs().sum()) for p in model.parameters() if p.grad is not None) > 0
    model.zero_grad()
    with pytest.raises(ValueError, match="pass ref="):
        unlearning_loss(model, {"forget": forget, "idk": idk}, LossConfig(name="idk-po"))


@pytest.mark.parametrize("name", ["ga", "npo", "idk-po"])
def test_steps_lower_the_loss_and_raise_forget_nll(tiny, name):
    """The sign convention: minimising each loss for a few steps raises the NLL of the true forget answers."""
    model, processor, recs = tiny
    model = copy.deepcopy(model)
    ref = copy.deepcopy(model).requires_grad_(False)
    recs = recs[:3]
    batches = {"forget": _batch(processor, recs), "idk": _batch(processor, idk_records(recs))}
    cfg = LossConfig(name=name, beta=0.5)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with torch.no_grad():
        nll0 = sequence_nll(L.forward_logits(model, batches["forget"]), batches["forget"]["labels"]).mean()
    first = None
    for step in range(3):
        loss, parts = unlearning_loss(model, batches, cfg, ref=ref)
        check_finite(loss, step, "r-test")
        first = parts["loss"] if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        last, _ = unlearning_loss(model, batches, cfg, ref=ref)
        nll1 = sequence_nll(L.forward_logits(model, batches["forget"]), batches["forget"]["labels"]).mean()
    print(f"{name}: loss {first:.4f} -> {float(last):.4f}, forget nll {float(nll0):.4f} -> {float(nll1):.4f}")
    assert float(last) < first
    assert float(nll1) > float(nll0)
