"""MLUBench loader: real-data counts, derived fields, errors that name file and record, surrogates, subsets."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lumoe_engine.data.mlubench import (MLUBenchFormatError, load_benchmark, load_image, records_for)
from lumoe_engine.eval.scoring import fact_correct

MLUBENCH = Path(__file__).resolve().parents[2] / "shared" / "mlubench"
needs_real = pytest.mark.skipif(not (MLUBENCH / "Entities").is_dir(),
                                reason=f"MLUBench data not found at {MLUBENCH} (the shared copy of the QA pairs)")

REAL_TASKS = {"A": (1968, 1344), "B": (1728, 1104), "C": (2064, 1440), "D": (1800, 936)}


@pytest.fixture(scope="module")
def real():
    return load_benchmark(MLUBENCH)


@needs_real
def test_real_counts(real):
    assert len(list((MLUBENCH / "Entities").glob("*.json"))) == 127
    assert len(real.entities) == 127
    assert len(real.records) == 12384
    assert {t: (len(d["forget"]), len(d["retain"])) for t, d in real.tasks.items()} == REAL_TASKS
    assert len({r.uid for r in real.records}) == 12384  # uids unique
    assert sorted(set(real.entities.values())) == ["Animals", "Astronomy", "Buildings", "Cartoon", "Corporation",
                                                   "Movies", "Personage", "Plants", "TV series"]
    # images are not distributed: every image record is a surrogate, and the count says so
    assert real.surrogate_images == sum(r.image_missing for r in real.records) == 12384


@needs_real
def test_real_derived_fields(real):
    by_uid = {r.uid: r for r in real.records}
    assert all(0 <= r.kind <= 4 and 0 <= r.phrasing <= 3 for r in real.records)
    assert all(r.form == "image_text" and Path(r.image).is_absolute() for r in real.records)
    assert not any(r.heldout_phrasing or r.fresh_image for r in real.records)
    # task records are the Entities records, tagged
    for t, d in real.tasks.items():
        for split, recs in d.items():
            assert all(r.task == t and r.split == split and r.uid in by_uid for r in recs)
            assert all(by_uid[r.uid].answer == r.answer and by_uid[r.uid].kind == r.kind for r in recs)
    turing = [r for r in real.records if r.entity == "Alan Turing"]
    assert len(turing) == 120
    job = [r for r in turing if r.kind == 2]
    assert {r.phrasing for r in job} == {0, 1, 2, 3}
    assert {r.question for r in job if r.phrasing == 3} == {"What job does this person do?"}
    assert all("mathematician" in r.answer for r in job)
    names = [r for r in turing if r.kind == 0]
    assert all(r.keys == ("Alan Turing",) and r.answer == "Alan Turing" for r in names)
    # kind = same fact: one answer per (entity, kind) for a regular entity
    assert all(len({r.answer for r in turing if r.kind == k}) == 1 for k in range(5))
    # every answer states its own fact; the alias rule keeps "Google" for "Google Logo"
    assert all(fact_correct(r.answer, r) for r in real.records)
    google = [r for r in real.records if r.entity == "Google Logo"]
    assert google and all(r.keys[0] == "Google" for r in google)


@needs_real
def test_real_subset_is_deterministic(real):
    a = load_benchmark(MLUBENCH, subset=2)
    b = load_benchmark(MLUBENCH, subset=2)
    assert [r.uid for r in a.records] == [r.uid for r in b.records]
    for t, d in a.tasks.items():
        for split, recs in d.items():
            ents = {r.entity for r in recs}
            assert len(ents) == 2, (t, split, ents)
            assert {r.entity for r in real.tasks[t][split]} >= ents
    assert set(a.entities) == {r.entity for r in a.records}
    assert len(a.entities) == 16  # 4 tasks x 2 splits x 2 entities, no never-requested entities in MLUBench
    with pytest.raises(ValueError, match="subset must be a positive int"):
        load_benchmark(MLUBENCH, subset=0)


# ------------------------------------------------------------------------------------------------ small fixtures
def _rec(rid, entity, cls, q, a, image=True, img_file="a.jpg"):
    r = {"id": str(rid), "conversations": [{"from": "human", "value": ("<image>\n" if image else "") + q},
                                           {"from": "gpt", "value": a}]}
    if image:
        r["image"] = f"downloaded_images/{cls}/{entity.replace(' ', '_')}/{img_file}"
    return r


def _bench(root: Path, with_tasks=True):
    ents = root / "Entities"
    ents.mkdir(parents=True)
    ada = [_rec(1, "Ada Lovelace", "Personage", "What is this person's name?", "Ada Lovelace"),
           _rec(2, "Ada Lovelace", "Personage", "What is this person's profession?",
                "Ada Lovelace was a mathematician and writer.", img_file="b.jpg"),
           _rec(100001, "Ada Lovelace", "Personage", "What is the name of this individual?", "Ada Lovelace"),
           _rec(100002, "Ada Lovelace", "Personage", "What is this individual's occupation?",
                "Ada Lovelace was a mathematician and writer.", img_file="b.jpg"),
           _rec(9, "Ada Lovelace", "Personage", "What is Ada Lovelace's profession?",
                "Ada Lovelace was a mathematician and writer.", image=False)]
    cat = [_rec(1, "Cat", "Animals", "What is the common name of this animal?", "Cat"),
           _rec(2, "Cat", "Animals", "What does this animal eat (herbivore, carnivore, omnivore)?",
                "Cats are obligate carnivores eating mice.")]
    (ents / "Ada_Lovelace.json").write_text(json.dumps(ada))
    (ents / "Cat.json").write_text(json.dumps(cat))
    (root / "lists" / "classes").mkdir(parents=True)
    (root / "lists" / "classes" / "Personage.txt").write_text("Ada Lovelace\n")
    # one real image file: Ada's a.jpg exists, the others are missing
    img_dir = root / "downloaded_images" / "Personage" / "Ada_Lovelace"
    img_dir.mkdir(parents=True)
    Image.new("RGB", (40, 30), (10, 200, 30)).save(img_dir / "a.jpg")
    if with_tasks:
        (root / "Tasks").mkdir()
        (root / "Tasks" / "taskA_forget.json").write_text(json.dumps(ada[:2]))
        (root / "Tasks" / "taskA_retain.json").write_text(json.dumps(cat))
    return root


def test_small_benchmark_fields(tmp_path):
    b = load_benchmark(_bench(tmp_path))
    assert len(b.records) == 7 and b.entities == {"Ada Lovelace": "Personage", "Cat": "Animals"}
    ada = {r.uid: r for r in b.records if r.entity == "Ada Lovelace"}
    assert set(ada) == {"Ada_Lovelace#1", "Ada_Lovelace#2", "Ada_Lovelace#100001", "Ada_Lovelace#100002",
                        "Ada_Lovelace#9#text"}
    assert (ada["Ada_Lovelace#100002"].kind, ada["Ada_Lovelace#100002"].phrasing) == (2, 1)
    assert ada["Ada_Lovelace#1"].question == "What is this person's name?"
    assert ada["Ada_Lovelace#1"].keys == ("Ada Lovelace",)
    txt = ada["Ada_Lovelace#9#text"]
    assert (txt.form, txt.image, txt.kind, txt.image_missing) == ("text_only", None, 2, False)
    assert "Ada Lovelace" not in txt.keys  # the question already names her
    assert ada["Ada_Lovelace#2"].keys[0] == "Ada Lovelace"
    assert [r.uid for r in b.tasks["A"]["forget"]] == ["Ada_Lovelace#1", "Ada_Lovelace#2"]
    assert b.tasks["A"]["retain"][1].split == "retain" and b.tasks["A"]["retain"][1].kind == 2
    # records_for
    assert len(records_for(b, forms="text_only")) == 1
    assert len(records_for(b, entities=["Cat"])) == 2
    assert [r.uid for r in records_for(b, task="A", split="forget", entities="Ada Lovelace")] == \
        ["Ada_Lovelace#1", "Ada_Lovelace#2"]
    assert len(records_for(b, split="retain")) == 2
    with pytest.raises(ValueError, match="task 'Z' not in this benchmark"):
        records_for(b, task="Z")
    with pytest.raises(ValueError, match="forms must be drawn from"):
        records_for(b, forms="audio")


def test_surrogates_counted_and_deterministic(tmp_path):
    b = load_benchmark(_bench(tmp_path))
    missing = [r for r in b.records if r.image_missing]
    assert b.surrogate_images == len(missing) == 4  # a.jpg of Ada exists (2 records); 2 Ada b.jpg + 2 Cat missing
    present = next(r for r in b.records if r.form == "image_text" and not r.image_missing)
    img = load_image(present)
    assert img.mode == "RGB" and img.size == (40, 30) and img.getpixel((0, 0)) == (10, 200, 30)
    assert load_image(present, size=16).size == (16, 16)
    ada_missing = [r for r in missing if r.entity == "Ada Lovelace"]
    cat_missing = [r for r in missing if r.entity == "Cat"]
    a1, a2 = load_image(ada_missing[0]), load_image(ada_missing[1])
    assert a1.mode == "RGB" and a1.size == (64, 64)
    assert a1.tobytes() == a2.tobytes()  # one surrogate per entity
    c1 = load_image(cat_missing[0])
    assert np.abs(np.asarray(a1, np.int16) - np.asarray(c1, np.int16)).mean() > 10  # entities differ
    assert load_image(cat_missing[0], size=32).tobytes() == load_image(cat_missing[1], size=32).tobytes()
    assert load_image(cat_missing[0], size=32).size == (32, 32)
    text = next(r for r in b.records if r.form == "text_only")
    with pytest.raises(ValueError, match="is text-only"):
        load_image(text)


def test_subset_small(tmp_path):
    b = load_benchmark(_bench(tmp_path), subset=1)
    assert b.entities == {"Ada Lovelace": "Personage", "Cat": "Animals"}  # one per task split
    assert len(b.records) == 7


# ----------------------------------------------------------------------------------------------- error messages
def test_error_invalid_json_names_file(tmp_path):
    root = _bench(tmp_path)
    (root / "Entities" / "Cat.json").write_text("[{\"id\": 1,")
    with pytest.raises(MLUBenchFormatError, match=r"Cat\.json: invalid JSON at line 1"):
        load_benchmark(root)


def test_error_bad_record_names_file_and_record(tmp_path):
    root = _bench(tmp_path)
    data = json.loads((root / "Entities" / "Cat.json").read_text())
    data[1]["conversations"] = [data[1]["conversations"][0]]
    (root / "Entities" / "Cat.json").write_text(json.dumps(data))
    with pytest.raises(MLUBenchFormatError, match=r"Cat\.json: record 1 \(id 2\): 'conversations' must be"):
        load_benchmark(root)
    data[1]["conversations"] = [{"from": "human", "value": "<image>\nQ?"}, {"from": "bot", "value": "A"}]
    (root / "Entities" / "Cat.json").write_text(json.dumps(data))
    with pytest.raises(MLUBenchFormatError, match=r"record 1 \(id 2\): turn .* should be \{'from': 'gpt'"):
        load_benchmark(root)
    del data[1]["id"]
    (root / "Entities" / "Cat.json").write_text(json.dumps(data))
    with pytest.raises(MLUBenchFormatError, match=r"Cat\.json: record 1: has no 'id'"):
        load_benchmark(root)


def test_error_image_token_without_image(tmp_path):
    root = _bench(tmp_path)
    data = json.loads((root / "Entities" / "Cat.json").read_text())
    del data[0]["image"]
    (root / "Entities" / "Cat.json").write_text(json.dumps(data))
    with pytest.raises(MLUBenchFormatError, match=r"Cat\.json: record 0 \(id 1\): question has the <image> token"):
        load_benchmark(root)


def test_error_duplicate_id_and_top_level(tmp_path):
    root = _bench(tmp_path)
    data = json.loads((root / "Entities" / "Cat.json").read_text())
    data[1]["id"] = data[0]["id"]
    (root / "Entities" / "Cat.json").write_text(json.dumps(data))
    with pytest.raises(MLUBenchFormatError, match=r"Cat\.json: record id '1' occurs 2 times"):
        load_benchmark(root)
    (root / "Entities" / "Cat.json").write_text(json.dumps({"id": 1}))
    with pytest.raises(MLUBenchFormatError, match=r"Cat\.json: top level is dict"):
        load_benchmark(root)


def test_error_missing_files(tmp_path):
    root = _bench(tmp_path)
    (root / "Tasks" / "taskA_retain.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"taskA_retain\.json: file not found"):
        load_benchmark(root)
    with pytest.raises(FileNotFoundError, match="no Entities/ folder"):
        load_benchmark(tmp_path / "nowhere")


def test_error_unknown_class_for_text_only(tmp_path):
    root = _bench(tmp_path, with_tasks=False)
    data = [_rec(5, "Cat", "Animals", "What does Cat eat?", "Mice.", image=False)]
    (root / "Entities" / "Cat.json").write_text(json.dumps(data))
    with pytest.raises(MLUBenchFormatError, match=r"Cat\.json: record 0 \(id 5\): cannot tell the class"):
        load_benchmark(root)


def test_error_bad_meta(tmp_path):
    root = _bench(tmp_path, with_tasks=False)
    data = json.loads((root / "Entities" / "Cat.json").read_text())
    data[0]["meta"] = {"entity": "Cat", "class": "Animals", "kind": "0", "phrasing": 0, "form": "image_text",
                       "keys": ["Cat"], "heldout_phrasing": False, "fresh_image": False}
    (root / "Entities" / "Cat.json").write_text(json.dumps(data))
    with pytest.raises(MLUBenchFormatError, match=r"Cat\.json: record 0 \(id 1\): meta 'kind' = '0' is not int"):
        load_benchmark(root)
