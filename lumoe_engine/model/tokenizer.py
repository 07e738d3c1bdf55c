"""The offline tokenizer of the tiny LLaVA: trained with ``tokenizers`` on the benchmark's own text, nothing downloaded.

A BPE (default) or word-level model over sentencepiece-style words (``▁word``), punctuation and digits split off, so a
small vocabulary (~1-2k) holds whole words: one word, one token, which a tiny model learns fastest. A word never seen
in training becomes sub-word pieces (BPE; every printable ASCII character is in the vocabulary, so ASCII text always
round-trips) or ``<unk>`` (word level).

Special tokens, at fixed ids: ``<pad>`` 0, ``<s>`` 1 (prepended to every encoded text), ``</s>`` 2 (ends every
answer), ``<unk>`` 3, ``<image>`` 4 (the image placeholder the processor expands to one token per image patch).

The prompt format is llava-1.5's: ``USER: <image>\\n{question} ASSISTANT:`` and the answer ``" {answer}</s>"``
(text-only questions carry no ``<image>``). ``CHAT_TEMPLATE`` renders the same thing from chat messages, so
``processor.apply_chat_template`` works on the tiny model as on a real llava-1.5 checkpoint.
"""
from __future__ import annotations

import string
from pathlib import Path
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE)  # ids 0..4 in this order
KINDS = ("bpe", "word")

# llava-1.5 conversation format, one user turn (optionally with the answer turn) per sequence.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}</s>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Every printable ASCII character is a BPE token, so any ASCII text round-trips (other characters: those seen).
_ALPHABET = [c for c in string.printable if not c.isspace()] + ["▁"]
# Words of the prompt format: always in the vocabulary, whatever the training text.
_FORMAT_TEXT = ["USER: ASSISTANT:", "USER: a ASSISTANT: a"]


def format_prompt(question: str, with_image: bool, image_token: str = IMAGE) -> str:
    """The generation prompt for one question: ``USER: <image>\\n{question} ASSISTANT:`` (no image token when
    ``with_image`` is False). Equal to ``CHAT_TEMPLATE`` with ``add_generation_prompt=True``."""
    image = f"{image_token}\n" if with_image else ""
    return f"USER: {image}{question.strip()} ASSISTANT:"


def format_answer(answer: str) -> str:
    """The supervised continuation of a prompt: a leading space, the answer (the eos token is added as an id)."""
    return " " + answer.strip()


def _build(kind: str, vocab_size: int) -> tuple[Tokenizer, object]:
    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=UNK))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), min_frequency=1,
                                      initial_alphabet=_ALPHABET, show_progress=False)
    elif kind == "word":
        tok = Tokenizer(models.WordLevel(unk_token=UNK))
        # every word of the training text is kept (an answer word mapped to <unk> could never be generated)
        trainer = trainers.WordLevelTrainer(vocab_size=1 << 30, special_tokens=list(SPECIAL_TOKENS),
                                            min_frequency=1, show_progress=False)
    else:
        raise ValueError(f"kind={kind!r}: expected one of {KINDS}")
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
        pre_tokenizers.Punctuation("isolated"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return tok, trainer


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2000, kind: str = "bpe") -> PreTrainedTokenizerFast:
    """Train the tokenizer on ``texts`` (questions and answers) and wrap it as a ``PreTrainedTokenizerFast``.

    vocab_size: BPE stops merging there; a word-level vocabulary keeps every word of ``texts``.
    Returns a tokenizer that prepends ``<s>``, pads on the left (generation), carries ``CHAT_TEMPLATE``.
    """
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError("texts: no non-empty string to train the tokenizer on; pass the benchmark's questions/answers")
    if vocab_size < len(SPECIAL_TOKENS) + 32:
        raise ValueError(f"vocab_size={vocab_size}: too small, expected at least {len(SPECIAL_TOKENS) + 32}")
    tok, trainer = _build(kind, vocab_size)
    tok.train_from_iterator(list(texts) + _FORMAT_TEXT, trainer)
    for i, s in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(s) != i:  # the trainer places them first; the model config relies on it
            raise RuntimeError(f"special token {s!r} got id {tok.token_to_id(s)}, expected {i}")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, 1)])
    return wrap(tok)


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """A trained ``tokenizers.Tokenizer`` as the transformers tokenizer the processor and the model use."""
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE}, padding_side="left", model_max_length=4096,
        clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved with ``save_pretrained`` (a directory holding tokenizer.json)."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}/tokenizer.json not found: save the tokenizer with save_pretrained(dir) first")
    return PreTrainedTokenizerFast.from_pretrained(str(path))
