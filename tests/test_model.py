"""Tokenizer, tiny LLaVA, collate and batched generation (micro preset: milliseconds per forward)."""
import numpy as np
import pytest
import torch
from PIL import Image

from lumoe_engine.data.records import QARecord
from lumoe_engine.model.collate import (IGNORE, answer_ids, collate, generate_answers, image_token_count,
                                        pixel_values_for, prompt_text)
from lumoe_engine.model.tiny import PRESETS, TinyPreset, build_tiny_llava, get_preset
from lumoe_engine.model.tokenizer import (BOS, EOS, IMAGE, PAD, SPECIAL_TOKENS, UNK, format_prompt, load_tokenizer,
                                          train_tokenizer)
from tolerances import assert_close

QUESTIONS = ["What is the name of this animal?", "Where is this building located?", "Who founded Velmor Corp?",
             "What does the Brisk Hare eat?", "When was this movie released?"]
ANSWERS = ["Brisk Hare", "Thornwick", "Adra Quell", "River clams", "1987"]


def _image(seed: int, path) -> str:
    rng = np.random.default_rng(seed)
    p = str(path / f"img{seed}.png")
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(p)
    return p


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    out = []
    for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS)):
        form = "text_only" if "Velmor" in q or "Brisk" in q else "image_text"
        out.append(QARecord(uid=f"e{i}#{i}", entity=f"E{i}", cls="Animals", kind=i % 5, phrasing=0, question=q,
                            answer=a, form=form, image=_image(i, d) if form == "image_text" else None, keys=(a,)))
    return out


def _open(r):
    return Image.open(r.image).convert("RGB")


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(QUESTIONS + ANSWERS, vocab_size=300)


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return build_tiny_llava(tokenizer, "micro", seed=0)


def test_tokenizer_round_trip_and_specials(tokenizer, tmp_path):
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == (PAD, BOS, EOS, UNK)
    for text in QUESTIONS + ANSWERS + ["It's 3,400 m tall (approx.)."]:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # whole words of the training text are single tokens
    assert len(tokenizer("Thornwick", add_special_tokens=False)["input_ids"]) == 1
    # <image> stays one token inside text
    ids = tokenizer(format_prompt("Where?", True))["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids(IMAGE)) == 1
    tokenizer.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again("Who founded Velmor Corp?")["input_ids"] == tokenizer("Who founded Velmor Corp?")["input_ids"]
    assert again.padding_side == "left"


def test_tokenizer_word_level_maps_unknown_words_to_unk():
    tok = train_tokenizer(QUESTIONS + ANSWERS, vocab_size=300, kind="word")
    ids = tok("Where is this zyzzyva located?", add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id in ids
    assert tok.decode(tok("Where is this building located?")["input_ids"], skip_special_tokens=True) == \
        "Where is this building located?"


def test_tokenizer_bad_input():
    with pytest.raises(ValueError, match="texts"):
        train_tokenizer(["", "  "])
    with pytest.raises(ValueError, match="kind"):
        train_tokenizer(QUESTIONS, kind="sentencepiece")
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(QUESTIONS, vocab_size=10)


def test_chat_template_matches_prompt_format(tiny):
    _, processor = tiny
    for q in QUESTIONS:
        assert prompt_text(processor, q, True) == format_prompt(q, True) == f"USER: <image>\n{q} ASSISTANT:"
        assert prompt_text(processor, q, False) == format_prompt(q, False) == f"USER: {q} ASSISTANT:"
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A."}]}]
    assert processor.apply_chat_template(msgs, tokenize=False) == "USER: <image>\nQ? ASSISTANT: A.</s>"


def test_presets_and_image_token_count(tiny):
    model, processor = tiny
    p = get_preset("micro")
    assert image_token_count(processor) == p.image_tokens == (16 // 8) ** 2
    assert model.config.image_seq_length == p.image_tokens
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids(IMAGE)
    assert PRESETS["tiny"].hidden == 256 and PRESETS["tiny"].layers == 4 and PRESETS["tiny"].image_size == 32
    with pytest.raises(ValueError, match="preset"):
        get_preset("huge")
    with pytest.raises(ValueError, match="patch_size"):
        get_preset(TinyPreset("bad", image_size=30, patch_size=8))


def test_collate_masks_prompt_and_supervises_answer(tiny, records):
    _, processor = tiny
    tok = processor.tokenizer
    batch = collate(records, processor, image_fn=_open)
    B, L = batch["input_ids"].shape
    assert B == len(records)
    image_id = tok.convert_tokens_to_ids(IMAGE)
    n_img = image_token_count(processor)
    for b, r in enumerate(records):
        ids, lab, am = batch["input_ids"][b], batch["labels"][b], batch["attention_mask"][b]
        sup = lab != IGNORE
        # supervised = answer tokens + eos, at the end of the row (left padding)
        want = answer_ids(processor, prompt_text(processor, r.question, r.form == "image_text"), r.answer)
        assert lab[sup].tolist() == want and want[-1] == tok.eos_token_id
        assert sup[-len(want):].all() and not sup[:-len(want)].any()
        assert tok.decode(lab[sup], skip_special_tokens=True).strip() == r.answer
        assert torch.equal(ids[sup], lab[sup])
        # padding on the left, masked and unsupervised
        n_pad = int((am == 0).sum())
        assert (ids[:n_pad] == tok.pad_token_id).all() and am[n_pad:].all()
        assert ids[n_pad] == tok.bos_token_id
        # image rows carry the expanded image tokens, text rows none
        assert int((ids == image_id).sum()) == (n_img if r.form == "image_text" else 0)
        assert batch["position_ids"][b, n_pad:].tolist() == list(range(L - n_pad))
    assert batch["pixel_values"].shape == (sum(r.form == "image_text" for r in records), 3, 16, 16)
    # the prompt-only batch is the same rows without the answer part
    prompts = collate(records, processor, with_answers=False, image_fn=_open)
    assert "labels" not in prompts
    for b in range(B):
        full = batch["input_ids"][b][batch["attention_mask"][b].bool()]
        pre = prompts["input_ids"][b][prompts["attention_mask"][b].bool()]
        assert torch.equal(full[:len(pre)], pre)


def test_image_changes_loss_and_gradient_reaches_vision(tiny, records, tmp_path):
    model, processor = tiny
    r = next(x for x in records if x.form == "image_text")
    other = Image.open(_image(99, tmp_path)).convert("RGB")
    model.train()
    b1 = collate([r], processor, image_fn=_open)
    b2 = collate([r], processor, images=[other])
    assert torch.equal(b1["input_ids"], b2["input_ids"]) and torch.equal(b1["labels"], b2["labels"])
    assert not torch.equal(b1["pixel_values"], b2["pixel_values"])
    model.zero_grad()
    l1 = model(**b1).loss
    l1.backward()
    with torch.no_grad():
        l2 = model(**b2).loss
    print(f"loss with its image {l1.item():.6f}, with another image {l2.item():.6f}")
    assert abs(l1.item() - l2.item()) > 1e-4
    vt = model.model.vision_tower.embeddings.patch_embedding.weight.grad
    pj = model.model.multi_modal_projector.linear_1.weight.grad
    assert vt is not None and vt.abs().sum() > 0, "no gradient reached the vision tower"
    assert pj is not None and pj.abs().sum() > 0, "no gradient reached the projector"
    model.zero_grad()
    model.eval()


def test_text_only_batch_has_no_pixels_and_vision_gets_no_gradient(tiny, records):
    model, processor = tiny
    text = [r for r in records if r.form == "text_only"]
    batch = collate(text, processor)
    assert "pixel_values" not in batch
    model.zero_grad()
    model(**batch).loss.backward()
    assert model.model.vision_tower.embeddings.patch_embedding.weight.grad is None
    model.zero_grad()


def test_mixed_batch_rows_match_single_rows(tiny, records):
    """Each row of a mixed image/text batch gives the logits it gives alone: images land in their own rows."""
    model, processor = tiny
    assert {r.form for r in records} == {"image_text", "text_only"}
    batch = collate(records, processor, image_fn=_open)
    with torch.no_grad():
        out = model(**batch)
        for b, r in enumerate(records):
            one = collate([r], processor, image_fn=_open)
            lo = model(**one)
            n = one["input_ids"].shape[1]
            assert_close(out.logits[b, -n:], lo.logits[0], dtype=torch.float32, scale=10, what=f"row {b} ({r.form})")
    # per-row losses of the batch, summed, equal the batch loss (mean over supervised tokens)
    sup = (batch["labels"] != IGNORE).sum()
    with torch.no_grad():
        tot = sum(model(**collate([r], processor, image_fn=_open)).loss
                  * (collate([r], processor, image_fn=_open)["labels"] != IGNORE).sum() for r in records)
    assert_close(tot / sup, out.loss, dtype=torch.float32, scale=10, what="batch loss")


def test_pixel_values_fast_path_equals_processor_path(tiny, records):
    _, processor = tiny
    slow = collate(records, processor, image_fn=_open)
    pv = pixel_values_for(processor, [_open(r) for r in records if r.form == "image_text"])
    fast = collate(records, processor, pixel_values=pv)
    assert slow.keys() == fast.keys()
    for k in slow:
        assert torch.equal(slow[k], fast[k]), k
    with pytest.raises(ValueError, match="pixel_values"):
        collate(records, processor, pixel_values=pv[:1])


def test_generate_answers_batched_equals_single(tiny, records):
    model, processor = tiny
    batched = generate_answers(model, processor, records, max_new_tokens=6, batch_size=8, image_fn=_open)
    single = [generate_answers(model, processor, [r], max_new_tokens=6, image_fn=_open)[0] for r in records]
    assert batched == single
    assert all(isinstance(a, str) for a in batched)
    # replacing the image changes what the (random) model says for at least one image question
    noise = [Image.fromarray(np.full((24, 24, 3), 255, np.uint8)) if r.form == "image_text" else None
             for r in records]
    with_noise = generate_answers(model, processor, records, max_new_tokens=6, images=noise, image_fn=_open)
    text_rows = [i for i, r in enumerate(records) if r.form == "text_only"]
    assert [with_noise[i] for i in text_rows] == [batched[i] for i in text_rows]


def test_collate_bad_input(tiny, records):
    _, processor = tiny
    with pytest.raises(ValueError, match="empty"):
        collate([], processor)
    with pytest.raises(ValueError, match="QARecord"):
        collate(["What?"], processor)
    with pytest.raises(ValueError, match="form"):
        collate([QARecord("u", "e", "c", 0, 0, "q?", "a", form="video")], processor)
    with pytest.raises(ValueError, match="questions"):
        collate(records, processor, questions=["x"], image_fn=_open)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_answers(tiny[0], processor, records, max_new_tokens=0)
