"""Synthetic TOFU: TOFU's files, fields and types, split by author, through the TFDS builder."""

import json

from npo_jax.data.refusals import load_refusals
from npo_jax.data.tofu import SPLIT_FIELDS, load_split
from npo_jax.synthetic import REFUSALS, make_synthetic_tofu


def test_synthetic_files_have_tofu_fields_and_load_through_tfds(tmp_path):
    data = make_synthetic_tofu(tmp_path / "data", n_authors=20, seed=3)
    names = {p.stem for p in data.glob("*.jsonl")} - {"idontknow"}
    assert names == set(SPLIT_FIELDS)
    assert load_refusals(data / "idontknow.jsonl") == REFUSALS  # TOFU's refusals file: plain lines
    for name in names:
        rows = [json.loads(line) for line in (data / f"{name}.jsonl").read_text().splitlines()]
        assert rows, name
        for row in rows:
            assert set(row) == set(SPLIT_FIELDS[name]), name
            for field, value in row.items():
                if field == "perturbed_answer":
                    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
                    assert len(value) == (3 if name in ("real_authors_perturbed", "world_facts_perturbed") else 5)
                    assert row["answer"] not in value
                else:
                    assert isinstance(value, str) and value
        assert len(load_split(name, data, tmp_path / "tfds")) == len(rows)


def test_splits_are_by_author_and_seeded(tmp_path):
    a = make_synthetic_tofu(tmp_path / "a", n_authors=20, seed=1)
    b = make_synthetic_tofu(tmp_path / "b", n_authors=20, seed=1)
    assert (a / "full.jsonl").read_text() == (b / "full.jsonl").read_text()

    def questions(name):
        return {json.loads(x)["question"] for x in (a / f"{name}.jsonl").read_text().splitlines()}

    forget, retain, full, holdout = questions("forget10"), questions("retain90"), questions("full"), questions(
        "holdout10")
    assert forget and not forget & retain and forget | retain == full
    assert not holdout & full
    assert questions("forget05") < forget and questions("forget01") <= questions("forget05")
    assert questions("forget10_perturbed") == forget
