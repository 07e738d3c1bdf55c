"""Real-model loading path: a saved tiny LLaVA (model + processor) comes back through ``load_model`` equal in fp32,
and loads and runs as a 4-bit NF4 base."""
import copy
from pathlib import Path
import json

import numpy as np
import pytest
import torch
from PIL import Image

from lumoe_engine.data.records import QARecord
from lumoe_engine.model.collate import collate, generate_answers
from lumoe_engine.model.load import attn_implementation, disable_cpu_bf16_repack, load_model
from lumoe_engine.model.tiny import build_tiny_llava
from lumoe_engine.model.tokenizer import train_tokenizer
from tolerances import assert_close

TEXTS = ["What is the name of this planet?", "Zorvath", "Which star does Zorvath orbit?", "Kelmira",
         "How many moons does this planet have?", "12 moons"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_llava")
    tok = train_tokenizer(TEXTS, vocab_size=300)
    model, processor = build_tiny_llava(tok, "tiny", seed=1)
    model.save_pretrained(d)
    processor.save_pretrained(d)
    img = d / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(img)
    recs = [QARecord("a#1", "Zorvath", "Astronomy", 0, 0, TEXTS[0], "Zorvath", image=str(img), keys=("Zorvath",)),
            QARecord("a#2#text", "Zorvath", "Astronomy", 1, 0, TEXTS[2], "Kelmira", form="text_only",
                     keys=("Kelmira",)),
            QARecord("a#3", "Zorvath", "Astronomy", 2, 0, TEXTS[4], "12 moons", image=str(img), keys=("12 moons",))]
    return d, model, processor, recs


def _open(r):
    return Image.open(r.image).convert("RGB")


def test_fp32_round_trip_is_exact(saved):
    d, model, processor, recs = saved
    loaded, lproc = load_model(d)
    assert type(loaded).__name__ == "LlavaForConditionalGeneration"
    assert type(lproc).__name__ == "LlavaProcessor"
    assert loaded.config._attn_implementation == attn_implementation() == "sdpa"  # no flash-attn on CPU
    assert not loaded.training
    b0 = collate(recs, processor, image_fn=_open)
    b1 = collate(recs, lproc, image_fn=_open)
    for k in b0:
        assert torch.equal(b0[k], b1[k]), f"processor round trip changed {k}"
    with torch.no_grad():
        ref, out = model(**b0), loaded(**b1)
    assert torch.equal(ref.logits, out.logits)
    assert generate_answers(model, processor, recs, 5, image_fn=_open) == \
        generate_answers(loaded, lproc, recs, 5, image_fn=_open)


def test_4bit_loads_runs_and_keeps_gradients(saved):
    import bitsandbytes as bnb

    d, model, processor, recs = saved
    q, qproc = load_model(d, load_in_4bit=True)
    lin4 = [m for m in q.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(lin4) == 4 * 7, "every LM linear (q, k, v, o, gate, up, down) of the 4 layers is NF4"
    assert all(m.support_avx512bf16_for_cpu is False for m in lin4)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in q.model.vision_tower.modules())
    assert not isinstance(q.lm_head, bnb.nn.Linear4bit)
    assert lin4[0].weight.quant_state.quant_type == "nf4"
    batch = collate(recs, qproc, image_fn=_open)
    with torch.no_grad():
        ref = model(**batch).logits
        out = q(**batch).logits
    err = (out - ref).norm() / ref.norm()
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    print(f"4-bit vs fp32 logits: relative error {err:.4f}, cosine {cos:.5f}")
    assert torch.isfinite(out).all()
    assert err < 0.4 and cos > 0.95  # close-ish: NF4 of random-init weights
    # exact view: the fp32 model carrying the dequantized NF4 weights gives the 4-bit model's logits
    deq = copy.deepcopy(model)
    mods = dict(deq.named_modules())
    for name, m in q.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            w = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
            assert w.shape == mods[name].weight.shape
            mods[name].weight.data.copy_(w)
    with torch.no_grad():
        dq = deq(**batch).logits
    assert_close(out, dq, dtype=torch.float32, scale=100, what="4-bit vs dequantized fp32")
    answers = generate_answers(q, qproc, recs, 4, image_fn=_open)
    assert len(answers) == len(recs) and all(isinstance(a, str) for a in answers)
    # after an eval forward without gradients, gradients still flow through the frozen 4-bit linears
    emb = q.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    q.train()
    loss = q(inputs_embeds=emb, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    loss.backward()
    q.eval()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    assert disable_cpu_bf16_repack(q) == len(lin4)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type"):
        load_model(tmp_path)


def test_teach_model_trains_one_merged_lora_never_a_full_fine_tune(tmp_path, monkeypatch):
    """``teach --model DIR`` (model_teaching="lora"): the optimizer holds only the LoRA's A/B (2 per LM linear), and
    what changes in the saved taught model is the LM linears' weights (the merge); embeddings, norms, vision tower,
    projector and head are bitwise the checkpoint's."""
    from safetensors.torch import load_file

    from lumoe_engine.data.synthetic import SyntheticConfig, ensure_synthetic
    from lumoe_engine.data.mlubench import load_benchmark
    from lumoe_engine.model.teach import TeachConfig, teach

    cache = tmp_path / "cache"
    bench = load_benchmark(ensure_synthetic(cache_dir=cache, config=SyntheticConfig.preset("tiny")))
    tok = train_tokenizer([r.question for r in bench.records] + [r.answer for r in bench.records], vocab_size=300)
    model, processor = build_tiny_llava(tok, "micro", seed=0)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    sizes = []
    real_adamw = torch.optim.AdamW

    def adamw(params, **kw):
        params = list(params)
        sizes.append(len(params))
        return real_adamw(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", adamw)
    cfg = TeachConfig(synthetic="tiny", model=str(ckpt), max_steps=4, check_every=1000, eval_max_records=8,
                      batch_size=4, lr=1e-2, model_lora_rank=4)
    _, _, summary = teach(cfg, tmp_path / "out", cache_dir=cache, progress=False)
    assert summary["teaching"] == "lora" and summary["trained"] and summary["steps"] == 4
    assert sizes == [2 * 7 * 2]  # A and B of q, k, v, o, gate, up, down in each of the 2 decoder layers
    before, after = load_file(str(ckpt / "model.safetensors")), load_file(str(Path(summary["model_dir"]) /
                                                                             "model.safetensors"))
    assert set(before) == set(after)
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed and all("language_model" in k and ".layers." in k and k.endswith("proj.weight") for k in changed), changed
    # measuring only: nothing changes, nothing is cached as a taught copy
    _, _, measured = teach(TeachConfig(synthetic="tiny", model=str(ckpt), model_teaching="none", max_steps=4,
                                       eval_max_records=8), tmp_path / "out2", cache_dir=cache, progress=False)
    assert measured["teaching"] == "none" and not measured["trained"] and measured["model_dir"] == str(ckpt)
    with pytest.raises(ValueError, match="model_teaching"):
        TeachConfig(model=str(ckpt), model_teaching="full").validate()
