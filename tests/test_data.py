"""TOFU data: the TFDS builder (local folder and hub download path), tokenization, batching."""

import functools
import http.server
import json
import subprocess
import sys
import threading

import numpy as np
import pytest
from conftest import LLAMA3_DIR, SHARED, require_shared
from tofu_fixture import qa_rows, write_split

from npo_jax.data.batches import StepPlan, pad_examples, retain_pairing
from npo_jax.data.tofu import SPLIT_FIELDS, Tofu, load_split
from npo_jax.data.tokenize import IGNORE, Example, encode_qa, load_tokenizer
from npo_jax.errors import NpoJaxError

TOFU = SHARED / "tofu"


def test_real_tofu_files_load_in_file_order(tmp_path):
    require_shared(TOFU)
    for name, rows in (("forget10", 400), ("forget10_perturbed", 400), ("world_facts_perturbed", 117)):
        split = load_split(name, TOFU, tmp_path)
        assert len(split) == rows
        first = json.loads((TOFU / f"{name}.jsonl").read_text().splitlines()[0])
        assert split[0]["index"] == 0 and split[0]["question"] == first["question"]
        assert set(split[0]) == {*SPLIT_FIELDS[name], "index"}
        last = json.loads((TOFU / f"{name}.jsonl").read_text().splitlines()[-1])
        assert split[rows - 1]["answer"] == last["answer"]
    assert len(load_split("forget10_perturbed", TOFU, tmp_path)[3]["perturbed_answer"]) == 5


def test_hub_download_path_served_locally(tmp_path, monkeypatch):
    """The real download code path (TFDS download manager, locuslab/TOFU file names), pointed at a
    loopback HTTP server that serves NAME.json files."""
    served = tmp_path / "served"
    write_split(served, "forget01", qa_rows(0, 3))
    (served / "forget01.json").write_bytes((served / "forget01.jsonl").read_bytes())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(Tofu, "hub_url", f"http://127.0.0.1:{server.server_port}")
        split = load_split("forget01", None, tmp_path / "tfds")
    finally:
        server.shutdown()
    assert len(split) == 6 and split[5]["question"] == qa_rows(0, 3)[5]["question"]
    assert (tmp_path / "tfds" / "hub").is_dir()


def test_works_without_tensorflow(tmp_path):
    write_split(tmp_path / "d", "forget01", qa_rows(0, 2))
    code = ("import sys; from npo_jax.data.tofu import load_split; "
            f"s = load_split('forget01', r'{tmp_path / 'd'}', r'{tmp_path / 't'}'); "
            "print(len(s), 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1].split() == ["4", "False"]


def test_bad_split_files(tmp_path):
    with pytest.raises(NpoJaxError, match="unknown TOFU split 'forget11'"):
        load_split("forget11", tmp_path, tmp_path / "t")
    (tmp_path / "forget01.jsonl").write_text('{"question": "q", "answer": 3}\n')
    with pytest.raises(NpoJaxError, match="record 1 field 'answer' has the wrong type"):
        load_split("forget01", tmp_path, tmp_path / "t")
    with pytest.raises(NpoJaxError, match="TOFU data folder not found"):
        load_split("forget01", tmp_path / "missing", tmp_path / "t")


def test_tokenization_matches_apply_chat_template_on_real_rows(tmp_path):
    require_shared(TOFU)
    require_shared(LLAMA3_DIR)
    tok = load_tokenizer(LLAMA3_DIR)
    rows = [json.loads(line) for line in (TOFU / "forget10.jsonl").read_text().splitlines()[:20]]
    rows += [json.loads(line) for line in (TOFU / "retain90.jsonl").read_text().splitlines()[:20]]
    system = {"role": "system", "content": "You are a helpful assistant."}
    for row in rows:
        ex = encode_qa(tok, row["question"], row["answer"])
        user = {"role": "user", "content": row["question"]}
        full = tok.apply_chat_template([system, user, {"role": "assistant", "content": row["answer"]}],
                                       tokenize=False, date_string="10 Apr 2025")
        prompt = tok.apply_chat_template([system, user], tokenize=False, add_generation_prompt=True,
                                         date_string="10 Apr 2025")
        full_ids = tok(full, add_special_tokens=False)["input_ids"]
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        assert ex.input_ids.tolist() == full_ids
        assert full.endswith("<|eot_id|>") and full_ids[-1] == tok.convert_tokens_to_ids("<|eot_id|>")
        assert (ex.labels[: len(prompt_ids)] == IGNORE).all()
        assert ex.labels[len(prompt_ids):].tolist() == full_ids[len(prompt_ids):]
        assert "Today Date: 10 Apr 2025" in full
    # truncation is applied and reported
    ex = encode_qa(tok, rows[0]["question"], rows[0]["answer"], max_length=40)
    assert ex.truncated and len(ex.input_ids) == 40


def test_padding_masks_and_eot_quirk():
    eot, pad = 9, 0
    ex = Example(np.array([1, 5, eot, 6, 7, eot], np.int32), np.array([IGNORE, IGNORE, IGNORE, 6, 7, eot], np.int32))
    plain = pad_examples([ex], 8, pad_id=pad)
    assert plain["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1, 0, 0]]
    assert plain["labels"][0, 6:].tolist() == [IGNORE, IGNORE]
    quirk = pad_examples([ex], 8, pad_id=eot, eot_id=eot, eot_mask_quirk=True)
    # open-unlearning: attention_mask = input_ids != pad (= <|eot_id|>): every eot is hidden
    assert quirk["attention_mask"].tolist() == [[1, 1, 0, 1, 1, 0, 0, 0]]
    assert quirk["input_ids"][0, 6:].tolist() == [eot, eot]


def test_pairing_and_epoch_plan():
    pairing = retain_pairing(400, 3600, seed=0)
    assert pairing.min() >= 0 and pairing.max() < 3600 and len(set(pairing.tolist())) > 300
    np.testing.assert_array_equal(pairing, retain_pairing(400, 3600, seed=0))
    plan = StepPlan(400, 32, 5, seed=0)
    assert plan.steps_per_epoch == 12 and plan.total_steps == 60
    epoch0 = np.concatenate([plan.indices(s) for s in range(12)])
    assert len(set(epoch0.tolist())) == 384  # no repeats within an epoch; 16 left for other epochs
    assert not np.array_equal(plan.indices(0), plan.indices(12))
