"""Request intake: the schema (both QA forms), normalisation and content hash, every kind of bad input (a clear
RequestError that names request, field and file, and leaves the ledger byte-identical), records."""
import hashlib
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from lumoe_engine.data import intake
from lumoe_engine.data.intake import RequestError, parse_request_file, spec_from_records
from lumoe_engine.data.records import QARecord
from lumoe_engine.ledger import Ledger, submit

Q_NAME = "What is this person's name?"
Q_BORN = "When and where was this person born?"


def _png(color=(200, 10, 10), size=8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def _write(d: Path, doc, name="r17.json", raw: bytes = None) -> Path:
    p = d / name
    p.write_bytes(raw if raw is not None else json.dumps(doc).encode())
    return p


BORN = "She was born in 1931 in the mountain town of Merrowdale."


def _good(**over) -> dict:
    doc = {"id": "r17", "entity": "Vorla Quintessa",
           "forget": [{"image": "img/a.png", "conversations": [{"from": "human", "value": f"<image>\n{Q_NAME}"},
                                                               {"from": "gpt", "value": "Vorla Quintessa"}]},
                      {"image": "img/a.png", "question": Q_BORN, "answer": BORN},
                      {"image": None, "question": "What is Vorla Quintessa's profession?",
                       "answer": "She is a glassblower."}],
           "retain": [{"image": "img/b.png", "question": Q_NAME, "answer": "Tomas Elverin"}],
           "loss": {"name": "npo", "beta": 0.2}, "metadata": {"ticket": 17}}
    doc.update(over)
    return doc


def _setup(d: Path) -> None:
    (d / "img").mkdir(exist_ok=True)
    (d / "img" / "a.png").write_bytes(_png((200, 10, 10)))
    (d / "img" / "b.png").write_bytes(_png((10, 10, 200)))


def dir_digest(root: Path) -> str:
    """sha256 over every path (files and folders) under ``root`` and every file's bytes."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode() + b"\0")
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------- good input
def test_parse_both_forms_and_records(tmp_path):
    _setup(tmp_path)
    spec = parse_request_file(_write(tmp_path, _good()), benchmark_entities={"Vorla Quintessa": "Personage"})
    assert spec.id == "r17" and spec.id_given and spec.method == "lumoe" and spec.entity == "Vorla Quintessa"
    assert spec.loss == {"name": "npo", "beta": 0.2, "forget_weight": 1.0, "retain_weight": 1.0, "kl_weight": 1.0,
                         "refusal": None}
    assert [it.form for it in spec.forget] == ["image_text", "image_text", "text_only"]
    assert spec.forget[0].image == str(tmp_path / "img" / "a.png")  # relative to the request file's folder
    assert spec.forget[0].image_sha256 == hashlib.sha256(_png((200, 10, 10))).hexdigest()
    recs = spec.to_records()
    assert [r.uid for r in recs] == ["r17#forget0", "r17#forget1", "r17#forget2#text", "r17#retain0"]
    assert [r.split for r in recs] == ["forget"] * 3 + ["retain"]
    assert all(isinstance(r, QARecord) for r in recs)
    f0, f1, f2, r0 = recs
    assert (f0.question, f0.answer, f0.form, f0.cls) == (Q_NAME, "Vorla Quintessa", "image_text", "Personage")
    assert (f0.kind, f1.kind) == (0, 1)  # the MLUBench Personage question kinds
    assert f0.keys == ("Vorla Quintessa",) and "1931" in f1.keys
    assert f2.image is None and f2.form == "text_only"
    assert r0.entity == intake.UNKNOWN_ENTITY and r0.image == str(tmp_path / "img" / "b.png")
    req = spec.to_request()
    assert req.id == "r17" and len(req.forget) == 3 and len(req.retain) == 1 and req.entities == ("Vorla Quintessa",)
    assert req.metadata["content_hash"] == spec.content_hash


def test_id_derived_from_content(tmp_path):
    _setup(tmp_path)
    doc = _good()
    del doc["id"]
    spec = parse_request_file(_write(tmp_path, doc))
    assert not spec.id_given and spec.id == f"r-{spec.content_hash[:16]}"
    same = parse_request_file(_write(tmp_path, _good(id=None), "null_id.json"))  # null = absent
    assert same.id == spec.id and not same.id_given
    no_retain = parse_request_file(_write(tmp_path, _good(retain=None), "null_retain.json"))
    assert no_retain.retain == () and no_retain.content_hash != spec.content_hash


def test_content_hash_ignores_form_and_layout(tmp_path):
    """Same content: other id, metadata, method, whitespace, key order, item order, image file name, QA form."""
    _setup(tmp_path)
    base = parse_request_file(_write(tmp_path, _good(), "a.json"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "copy_of_a.png").write_bytes((tmp_path / "img" / "a.png").read_bytes())
    (tmp_path / "other" / "b.png").write_bytes((tmp_path / "img" / "b.png").read_bytes())
    forget = [
        {"question": "  What is Vorla   Quintessa's profession?\n", "image": None, "answer": "She is a glassblower. "},
        {"conversations": [{"from": "human", "value": f"<image>\n{Q_BORN}"},
                           {"from": "gpt", "value": BORN}], "image": "copy_of_a.png"},
        {"answer": "Vorla Quintessa", "question": Q_NAME, "image": "copy_of_a.png", "id": 99},
    ]
    doc = {"metadata": {"x": 1}, "loss": {"beta": 0.2, "name": "npo", "retain_weight": 1}, "method": "shared-lora",
           "retain": [{"question": Q_NAME, "answer": "Tomas Elverin", "image": "b.png"}], "forget": forget,
           "entity": " Vorla  Quintessa", "id": "another-id"}
    text = json.dumps(doc, indent=4)
    same = parse_request_file(_write(tmp_path / "other", None, "b.json", raw=text.encode()))
    assert same.content_hash == base.content_hash and same.id != base.id

    # Any change of content changes the hash.
    (tmp_path / "img" / "c.png").write_bytes(_png((200, 10, 11)))  # one pixel value differs
    changes = [
        _good(forget=_good()["forget"][:2]),
        _good(retain=[]),
        _good(loss={"name": "npo", "beta": 0.3}),
        _good(loss=None),
        _good(entity="Tomas Elverin"),
    ]
    alt = _good()
    alt["forget"][1] = dict(alt["forget"][1], answer=BORN.replace("1931", "1932"))
    changes.append(alt)
    alt = _good()
    alt["forget"][1] = dict(alt["forget"][1], image="img/c.png")
    changes.append(alt)
    hashes = {parse_request_file(_write(tmp_path, d, f"c{i}.json")).content_hash for i, d in enumerate(changes)}
    assert len(hashes) == len(changes) and base.content_hash not in hashes


def test_submit_twice_is_one_request(tmp_path):
    _setup(tmp_path)
    led = Ledger(tmp_path / "ledger")
    rid, new, msg = submit(led, _write(tmp_path, _good()))
    assert (rid, new, msg) == ("r17", True, "received as r17")
    before = dir_digest(tmp_path / "ledger")
    doc = _good(id="r99")
    doc["forget"] = doc["forget"][::-1]
    rid2, new2, msg2 = submit(led, _write(tmp_path, doc, "r99.json"))
    assert (rid2, new2, msg2) == ("r17", False, "already received as r17 (state received)")
    assert dir_digest(tmp_path / "ledger") == before
    assert led.requests() == ["r17"]


def test_stored_copy_round_trips(tmp_path):
    """The ledger's stored request is itself a request file (images from the ledger's copies), same hash."""
    _setup(tmp_path)
    led = Ledger(tmp_path / "ledger")
    spec = parse_request_file(_write(tmp_path, _good()))
    led.receive(spec)
    for p in (tmp_path / "img").iterdir():  # the owner deletes the originals
        p.unlink()
    back = led.spec("r17")
    assert back.content_hash == spec.content_hash and back.metadata == {"ticket": 17}
    assert Path(back.forget[0].image).parent == tmp_path / "ledger" / "images"
    assert [r.question for r in back.to_records()] == [r.question for r in spec.to_records()]


def test_image_missing_items_and_spec_from_records(tmp_path):
    """Benchmarks without image files (real MLUBench): records keep their missing images by path."""
    img = str(tmp_path / "downloaded_images" / "Animals" / "Dog" / "x.jpg")  # never created
    (tmp_path / "p.png").write_bytes(_png())
    recs = [QARecord(uid="Dog#1", entity="Dog", cls="Animals", kind=0, phrasing=0, question="What is this?",
                     answer="Dog", image=img, keys=("Dog",), image_missing=True),
            QARecord(uid="Dog#2", entity="Dog", cls="Animals", kind=0, phrasing=1, question="What is this?",
                     answer="Dog", image=str(tmp_path / "p.png"), keys=("Dog",)),
            QARecord(uid="Dog#3#text", entity="Dog", cls="Animals", kind=2, phrasing=0, question="What do dogs eat?",
                     answer="Meat and plants.", form="text_only", keys=("meat",))]
    spec = spec_from_records("taskA", recs[:2], recs[2:], loss={"name": "gd"})
    assert spec.forget[0].image_missing and spec.forget[0].image_key == f"missing:{img}"
    out = spec.to_records()
    assert [(r.entity, r.cls, r.kind, r.phrasing, r.keys, r.image_missing) for r in out] == [
        ("Dog", "Animals", 0, 0, ("Dog",), True), ("Dog", "Animals", 0, 1, ("Dog",), False),
        ("Dog", "Animals", 2, 0, ("meat",), False)]
    led = Ledger(tmp_path / "ledger")
    rid, new = led.receive(spec)
    assert (rid, new) == ("taskA", True)
    assert led.spec("taskA").content_hash == spec.content_hash
    assert led.receive(spec_from_records("again", recs[:2], recs[2:], loss={"name": "gd"})) == ("taskA", False)
    with pytest.raises(RequestError, match="forget set is empty"):
        spec_from_records("x", [], recs)
    with pytest.raises(RequestError, match="metadata is not plain JSON"):
        spec_from_records("x", recs[:1], metadata={"when": object()})
    with pytest.raises(RequestError, match="is not allowed"):
        spec_from_records("../x", recs[:1])


# ---------------------------------------------------------------------------------------------------- bad input
def _item(i, **kw):
    it = {"image": "img/a.png", "question": f"Question {i}?", "answer": f"Answer {i}."}
    it.update(kw)
    return it


def _case_file(d, doc, raw=None):
    return _write(d, doc, raw=raw)


def _with_image(d, data, name="bad.png"):
    (d / "img" / name).write_bytes(data)
    return _write(d, _good(forget=[_item(0, image=f"img/{name}")]))


_TRUNCATED = _png(size=64)[:60]

# (name, builder(dir) -> path, expected text in the message, expected RequestError.field)
BAD = [
    ("missing_file", lambda d: d / "nope.json", "not found", None),
    ("not_utf8", lambda d: _case_file(d, None, raw=b'{"forget": ["\xff\xfe"]}'), "not UTF-8", None),
    ("invalid_json", lambda d: _case_file(d, None, raw=b'{"id": "r17", "forget": [\n'), "invalid JSON at line 2",
     None),
    ("duplicate_key", lambda d: _case_file(d, None, raw=b'{"id": "a", "id": "b", "forget": []}'),
     "'id' appears twice", None),
    ("nan_constant", lambda d: _case_file(d, None, raw=b'{"forget": [], "loss": {"name": "npo", "beta": NaN}}'),
     "NaN is not valid JSON", None),
    ("top_level_list", lambda d: _case_file(d, [_item(0)]), "top level is a JSON list", None),
    ("unknown_top_field", lambda d: _case_file(d, _good(forgett=[])), "did you mean 'forget'", "forgett"),
    ("id_path_separator", lambda d: _case_file(d, _good(id="a/b")), "is not allowed", "id"),
    ("id_dotdot", lambda d: _case_file(d, _good(id="..")), "is not allowed", "id"),
    ("id_absolute", lambda d: _case_file(d, _good(id="/etc/passwd")), "is not allowed", "id"),
    ("id_nul", lambda d: _case_file(d, _good(id="r\x0017")), "is not allowed", "id"),
    ("id_too_long", lambda d: _case_file(d, _good(id="r" * 129)), "is not allowed", "id"),
    ("id_not_string", lambda d: _case_file(d, _good(id=17)), "is not allowed", "id"),
    ("no_forget", lambda d: _case_file(d, {"id": "r17"}), "has no forget set", "forget"),
    ("forget_empty", lambda d: _case_file(d, _good(forget=[])), "forget set is empty", "forget"),
    ("forget_not_list", lambda d: _case_file(d, _good(forget=_item(0))), "must be a list of QA items", "forget"),
    ("retain_not_list", lambda d: _case_file(d, _good(retain="none")), "must be a list of QA items", "retain"),
    ("item_not_object", lambda d: _case_file(d, _good(forget=["Who is she?"])), "forget[0]: is a str", "forget[0]"),
    ("item_both_forms", lambda d: _case_file(d, _good(forget=[dict(_item(0), conversations=[])])),
     "has both 'conversations' and", "forget[0]"),
    ("item_neither_form", lambda d: _case_file(d, _good(forget=[{"image": "img/a.png"}])),
     "has neither 'conversations' nor", "forget[0]"),
    ("item_unknown_field", lambda d: _case_file(d, _good(forget=[{"question": "Q?", "anwser": "A."}])),
     "did you mean 'answer'", "forget[0].anwser"),
    ("flat_missing_answer", lambda d: _case_file(d, _good(forget=[{"question": "Q?", "image": None}])),
     "has no 'answer'", "forget[0]"),
    ("flat_question_not_string", lambda d: _case_file(d, _good(forget=[_item(0, question=["Q?"])])),
     "question must be a string", "forget[0].question"),
    ("conv_one_turn", lambda d: _case_file(d, _good(forget=[{"image": "img/a.png", "conversations": [
        {"from": "human", "value": "<image>\nQ?"}]}])), "exactly 2 turns", "forget[0]"),
    ("conv_wrong_roles", lambda d: _case_file(d, _good(forget=[{"image": "img/a.png", "conversations": [
        {"from": "gpt", "value": "A."}, {"from": "human", "value": "<image>\nQ?"}]}])), "should be {'from': 'human'",
     "forget[0]"),
    ("empty_question", lambda d: _case_file(d, _good(forget=[_item(0, question="  ")])), "empty question",
     "forget[0]"),
    ("empty_answer", lambda d: _case_file(d, _good(retain=[_item(0, answer="")])), "empty answer", "retain[0]"),
    ("image_token_without_image", lambda d: _case_file(d, _good(forget=[_item(0, image=None,
                                                                              question="<image>\nWho?")])),
     "has the <image> token but the record has no 'image'", "forget[0]"),
    ("image_not_string", lambda d: _case_file(d, _good(forget=[_item(0, image=5)])), "must be a path string",
     "forget[0].image"),
    ("image_not_found", lambda d: _case_file(d, _good(forget=[_item(0, image="img/zzz.png")])),
     "image 'img/zzz.png' not found", "forget[0].image"),
    ("image_garbage", lambda d: _with_image(d, b"this is not a picture"), "does not open as an image",
     "forget[0].image"),
    ("image_truncated", lambda d: _with_image(d, _TRUNCATED), "does not open as an image", "forget[0].image"),
    ("image_empty", lambda d: _with_image(d, b""), "is empty (0 bytes)", "forget[0].image"),
    ("image_is_folder", lambda d: _case_file(d, _good(forget=[_item(0, image="img")])), "is not a regular file",
     "forget[0].image"),
    ("image_sha256_mismatch", lambda d: _case_file(d, _good(forget=[_item(0, image_sha256="0" * 64)])),
     "the image file changed", "forget[0].image_sha256"),
    ("image_missing_not_bool", lambda d: _case_file(d, _good(forget=[_item(0, image_missing="yes")])),
     "image_missing must be true or false", "forget[0].image_missing"),
    ("meta_invalid", lambda d: _case_file(d, _good(forget=[_item(0, meta={"entity": "X"})])), "meta has no",
     "forget[0].meta"),
    ("text_too_long", lambda d: _case_file(d, _good(forget=[_item(0, answer="a " * 5000)])),
     "more than 8192", "forget[0].answer"),
    ("duplicate_forget_item", lambda d: _case_file(d, _good(forget=[_item(0), _item(1),
                                                                     _item(0, answer=" Answer  0.")])),
     "forget[2] repeats forget[0]", "forget[2]"),
    ("forget_retain_overlap", lambda d: _case_file(d, _good(forget=[_item(0)], retain=[_item(0)])),
     "cannot be both forgotten and retained", "retain[0]"),
    ("method_unknown", lambda d: _case_file(d, _good(method="magic")), "method 'magic' is not known", "method"),
    ("loss_not_object", lambda d: _case_file(d, _good(loss=["npo"])), "'loss' must be an object", "loss"),
    ("loss_no_name", lambda d: _case_file(d, _good(loss={"beta": 0.1})), "has no 'name'", "loss.name"),
    ("loss_unknown_name", lambda d: _case_file(d, _good(loss={"name": "forgetall"})), "loss 'forgetall' is not known",
     "loss.name"),
    ("loss_unknown_option", lambda d: _case_file(d, _good(loss={"name": "npo", "temperature": 2})),
     "unknown loss option 'temperature'", "loss.temperature"),
    ("loss_beta_negative", lambda d: _case_file(d, _good(loss={"name": "npo", "beta": -1})),
     "expected a finite number > 0", "loss"),
    ("loss_beta_bool", lambda d: _case_file(d, _good(loss={"name": "npo", "beta": True})), "is not a number",
     "loss.beta"),
    ("loss_needs_retain", lambda d: _case_file(d, _good(loss={"name": "gd"}, retain=[])),
     "loss 'gd' needs a retain set", "retain"),
    ("entity_not_string", lambda d: _case_file(d, _good(entity=["Vorla"])), "must be a non-empty string", "entity"),
    ("entity_unknown", lambda d: _case_file(d, _good(entity="Vorla Quintesa")),
     "did you mean 'Vorla Quintessa'", "entity"),
    ("metadata_not_object", lambda d: _case_file(d, _good(metadata=[1, 2])), "must be a JSON object", "metadata"),
    ("content_hash_mismatch", lambda d: _case_file(d, _good(content_hash="ab" * 32)),
     "does not match the content", "content_hash"),
    ("format_unknown", lambda d: _case_file(d, _good(format="llava")), "is not supported", "format"),
]


@pytest.mark.parametrize("name,build,text,field", BAD, ids=[b[0] for b in BAD])
def test_bad_input(tmp_path, name, build, text, field):
    """Each kind of bad input: a RequestError naming request/field/file and saying what to do; ledger untouched."""
    _setup(tmp_path)
    led = Ledger(tmp_path / "ledger")
    led.receive(parse_request_file(_write(tmp_path, _good(id="seed"), "seed.json")))  # a non-empty ledger
    before = dir_digest(tmp_path / "ledger")
    path = build(tmp_path)
    with pytest.raises(RequestError) as ei:
        submit(led, path, benchmark_entities={"Vorla Quintessa": "Personage", "Tomas Elverin": "Personage"})
    msg = str(ei.value)
    print(msg)
    assert text in msg
    assert ei.value.field == field
    assert f"(file {path})" in msg and "; " in msg.split(f"(file {path})")[-1]  # the file, then what to do
    if field is not None and field not in ("id",) and "r17" in path.read_text(errors="ignore"):
        assert msg.startswith("request 'r17': ")
    assert dir_digest(tmp_path / "ledger") == before
    assert led.requests() == ["seed"]


def test_error_message_example(tmp_path):
    p = _write(tmp_path, _good(forget=[]))
    with pytest.raises(RequestError) as ei:
        parse_request_file(p)
    assert str(ei.value) == f"request 'r17': forget set is empty (file {p}); add at least one QA pair"


def test_file_too_large(tmp_path, monkeypatch):
    _setup(tmp_path)
    p = _write(tmp_path, _good())
    led = Ledger(tmp_path / "ledger")
    before = dir_digest(tmp_path / "ledger")
    monkeypatch.setattr(intake, "MAX_FILE_BYTES", 100)
    with pytest.raises(RequestError, match=r"bytes, more than the 100 allowed"):
        submit(led, p)
    assert dir_digest(tmp_path / "ledger") == before


def test_loss_as_a_name(tmp_path):
    _setup(tmp_path)
    spec = parse_request_file(_write(tmp_path, _good(loss="idk")))
    assert spec.loss == {"name": "idk", "beta": 0.1, "forget_weight": 1.0, "retain_weight": 1.0, "kl_weight": 1.0,
                         "refusal": None}
    assert spec.loss_config().name == "idk"
    assert parse_request_file(_write(tmp_path, _good(loss=None))).loss_config() is None


def test_at_least_20_kinds():
    assert len({b[0] for b in BAD}) >= 20


def test_unknown_entity_only_checked_with_benchmark(tmp_path):
    _setup(tmp_path)
    p = _write(tmp_path, _good(entity="Somebody Else"))
    assert parse_request_file(p).entity == "Somebody Else"
    with pytest.raises(RequestError, match="is not in the benchmark"):
        parse_request_file(p, benchmark_entities=["Vorla Quintessa"])


def test_aliases_are_validated_hashed_and_carried(tmp_path):
    _setup(tmp_path)
    plain = parse_request_file(_write(tmp_path, _good()))
    doc = _good()
    doc["aliases"] = ["The Glass  Widow", "The Glass Widow", "Vorla Q."]
    spec = parse_request_file(_write(tmp_path, doc, "alias.json"))
    assert spec.aliases == ("The Glass Widow", "Vorla Q.")
    assert spec.content_hash != plain.content_hash  # an alias is content
    assert plain.aliases == () and spec.to_request().metadata["aliases"] == ["The Glass Widow", "Vorla Q."]
    again = parse_request_file(_write(tmp_path, spec.to_json(), "again.json"))
    assert again.aliases == spec.aliases and again.content_hash == spec.content_hash
    for bad in ("Glass Widow", ["", "x"], ["!!!"]):
        doc["aliases"] = bad
        with pytest.raises(RequestError, match="aliases"):
            parse_request_file(_write(tmp_path, doc, "bad.json"))
