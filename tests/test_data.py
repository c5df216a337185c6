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

from npo_jax.data.batches import (
    RetainPairing,
    StepPlan,
    epoch_order,
    group_tokens,
    label_width,
    length_sorted_batches,
    pad_examples,
    retain_pairing,
    step_batch,
)
from npo_jax.data.tofu import SPLIT_FIELDS, Tofu, load_split
from npo_jax.data.tokenize import IGNORE, Example, encode_qa, encode_qa_pairs, load_tokenizer
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
    """The real download code path (`fetch`, locuslab/TOFU file names), pointed at a loopback HTTP
    server that serves NAME.json files."""
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
    # each question twice (its answer and the next row's), as the evaluator scores several answers per question
    pairs = [(r["question"], r["answer"]) for r in rows] + [(r["question"], rows[(i + 1) % len(rows)]["answer"])
                                                           for i, r in enumerate(rows)]
    batched = encode_qa_pairs(tok, pairs)
    for (question, answer), ex_batched in zip(pairs, batched, strict=True):
        ex = encode_qa(tok, question, answer)
        user = {"role": "user", "content": question}
        full = tok.apply_chat_template([system, user, {"role": "assistant", "content": answer}],
                                       tokenize=False, date_string="10 Apr 2025")
        prompt = tok.apply_chat_template([system, user], tokenize=False, add_generation_prompt=True,
                                         date_string="10 Apr 2025")
        full_ids = tok(full, add_special_tokens=False)["input_ids"]
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        assert ex.input_ids.tolist() == full_ids == ex_batched.input_ids.tolist()
        assert full.endswith("<|eot_id|>") and full_ids[-1] == tok.convert_tokens_to_ids("<|eot_id|>")
        assert (ex.labels[: len(prompt_ids)] == IGNORE).all()
        assert ex.labels[len(prompt_ids):].tolist() == full_ids[len(prompt_ids):]
        np.testing.assert_array_equal(ex_batched.labels, ex.labels)
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


def test_label_positions_pick_the_answer_rows():
    """Positions t whose next token is labelled, ascending, -1 padded to half the padded length
    (or all of it); a step's width is computed over all its examples, so every host's share has
    the same shape."""
    a = Example(np.arange(1, 8, dtype=np.int32), np.array([IGNORE] * 4 + [5, 6, 7], np.int32))
    b = Example(np.arange(1, 5, dtype=np.int32), np.array([IGNORE, 2, IGNORE, 4], np.int32))
    batch = pad_examples([a, b], 40, pad_id=0)
    assert batch["label_positions"].shape == (2, 20)  # 3 labels fit half of 40
    assert batch["label_positions"][0, :4].tolist() == [3, 4, 5, -1]
    assert batch["label_positions"][1, :3].tolist() == [0, 2, -1]
    for row, pos in enumerate(batch["label_positions"]):  # exactly the labelled next tokens
        want = np.flatnonzero(batch["labels"][row, 1:] != IGNORE)
        np.testing.assert_array_equal(pos[pos >= 0], want)
    assert pad_examples([a], 6, pad_id=0)["label_positions"].tolist() == [[3, 4, -1]]  # truncated to 6: 2 labels
    c = Example(np.arange(1, 6, dtype=np.int32), np.arange(1, 6, dtype=np.int32))
    assert pad_examples([c], 5, pad_id=0)["label_positions"].tolist() == [[0, 1, 2, 3]]  # 4 > half of 5: L - 1
    assert label_width([Example(np.zeros(300, np.int32), np.zeros(300, np.int32))], 512) == 511
    plan = StepPlan(4, 4, 1, seed=0)
    long = Example(np.arange(1, 41, dtype=np.int32), np.r_[[IGNORE] * 5, np.arange(35)].astype(np.int32))
    examples = [a, b, a, long]
    whole = step_batch(plan, 0, examples, buckets=[64], pad_id=0, eot_id=None, eot_mask_quirk=False)
    shares = [step_batch(plan, 0, examples, buckets=[64], pad_id=0, eot_id=None, eot_mask_quirk=False,
                         rows=np.array(r)) for r in ([0, 1], [2, 3])]
    assert whole["forget"]["label_positions"].shape == (4, 63)  # 34 labels > half of 64
    assert all(s["forget"]["label_positions"].shape == (2, 63) for s in shares)
    np.testing.assert_array_equal(np.concatenate([s["forget"]["label_positions"] for s in shares]),
                                  whole["forget"]["label_positions"])


def test_pairing_and_epoch_plan():
    pairing = retain_pairing(400, 3600, seed=0)
    assert pairing.min() >= 0 and pairing.max() < 3600 and len(set(pairing.tolist())) > 300
    np.testing.assert_array_equal(pairing, retain_pairing(400, 3600, seed=0))
    plan = StepPlan(400, 32, 5, seed=0)
    assert plan.steps_per_epoch == 12 and plan.total_steps == 60
    epoch0 = np.concatenate([plan.indices(s) for s in range(12)])
    assert len(set(epoch0.tolist())) == 384  # no repeats within an epoch; 16 left for other epochs
    assert not np.array_equal(plan.indices(0), plan.indices(12))


def _hf_445_updates(n: int, micro: int, accum: int, epochs: int) -> list[list[tuple[int, int]]]:
    """The (epoch, position in the epoch's order) of each item of each optimizer update, as HF
    Trainer 4.45's `_inner_training_loop` runs them (open-unlearning pins 4.45.1): micro-batches of
    `micro` items (the last one of an epoch short unless `micro` divides n), max_steps = epochs x
    (len(dataloader) // accum), an update when `total_batched_samples % accum == 0` (the counter
    runs on across epochs) or at the end of an epoch shorter than `accum` micro-batches."""
    batches = -(-n // micro)
    max_steps, updates, pending, total = epochs * max(batches // accum, 1), [], [], 0
    for epoch in range(epochs):
        for step in range(batches):
            total += 1
            pending += [(epoch, k) for k in range(step * micro, min((step + 1) * micro, n))]
            if total % accum == 0 or (batches <= accum and step + 1 == batches):
                updates.append(pending)
                pending = []
                if len(updates) == max_steps:
                    return updates
    return updates


@pytest.mark.parametrize(("n", "micro", "accum", "epochs"), [(400, 4, 8, 5), (40, 4, 8, 5), (200, 4, 8, 10),
                                                             (48, 8, 4, 3)])
def test_stream_epochs_are_hf_trainers_updates(n, micro, accum, epochs):
    """optim.epoch_mode=stream: the same items in the same updates as HF Trainer 4.45 (an epoch's
    leftover micro-batches open the next epoch's first update), whenever the micro-batch divides
    the data set (TOFU's forget sets with 4 per device); the same number of steps."""
    hf = _hf_445_updates(n, micro, accum, epochs)
    plan = StepPlan(n, micro * accum, epochs, seed=0, mode="stream")
    assert plan.total_steps == len(hf)
    for step, items in enumerate(hf):
        epochs_, positions = zip(*items, strict=True)
        got_epochs, got_items = plan.positions(step)
        np.testing.assert_array_equal(got_epochs, epochs_)
        want = [epoch_order(n, 0, e)[k] for e, k in items]
        np.testing.assert_array_equal(got_items, want)
        assert plan.epoch(step) == epochs_[0]


def test_stream_and_drop_on_forget10():
    drop, stream = StepPlan(400, 32, 5, seed=0), StepPlan(400, 32, 5, seed=0, mode="stream")
    assert drop.total_steps == stream.total_steps == 60
    np.testing.assert_array_equal(drop.indices(3), stream.indices(3))  # the first 12 steps agree
    used = [stream.positions(s) for s in range(60)]
    epochs = np.concatenate([e for e, _ in used])
    assert np.bincount(epochs).tolist() == [400, 400, 400, 400, 320]  # 80 items short of epoch 5's end
    for e in range(4):  # every item once per epoch
        assert sorted(np.concatenate([i for ep, i in used for i in [i[ep == e]]]).tolist()) == list(range(400))
    np.testing.assert_array_equal(used[12][0], [0] * 16 + [1] * 16)  # epoch 0's last 16 open step 13
    assert [stream.epoch(s) for s in (11, 12, 13)] == [0, 0, 1]
    with pytest.raises(ValueError, match="epoch mode"):
        StepPlan(400, 32, 5, seed=0, mode="keep")


def test_fresh_retain_pairing_draws_each_epoch():
    fixed, fresh = RetainPairing(400, 3600, 0), RetainPairing(400, 3600, 0, "fresh")
    items = np.arange(400)
    np.testing.assert_array_equal(fixed.partners(items, np.zeros(400, int)), retain_pairing(400, 3600, seed=0))
    np.testing.assert_array_equal(fixed.partners(items, np.full(400, 3)), retain_pairing(400, 3600, seed=0))
    e0, e1 = fresh.partners(items, np.zeros(400, int)), fresh.partners(items, np.ones(400, int))
    assert (e0 != e1).mean() > 0.99 and e0.min() >= 0 and max(e0.max(), e1.max()) < 3600
    np.testing.assert_array_equal(RetainPairing(400, 3600, 0, "fresh").partners(items, np.ones(400, int)), e1)
    mixed = fresh.partners(np.array([5, 5, 7]), np.array([0, 1, 1]))  # a step across two epochs
    assert mixed.tolist() == [e0[5], e1[5], e1[7]]
    # uniform: every retain item about equally often over many epochs
    counts = np.bincount(np.concatenate([RetainPairing(400, 40, 1, "fresh").partners(items, np.full(400, e))
                                         for e in range(50)]), minlength=40)
    assert counts.min() > 400 and counts.max() < 600  # 500 expected


def test_group_tokens_sum_each_groups_labels():
    ex = [Example(np.arange(6, dtype=np.int32), np.r_[[IGNORE] * k, np.arange(6 - k)].astype(np.int32))
          for k in (1, 2, 3, 4)]
    # labels[1:] labelled: 5, 4, 3, 2; groups of 2: 9, 5; truncated to length 4: 3, 2, 1, 0
    assert group_tokens(ex, 6, 2).tolist() == [9, 9, 5, 5]
    assert group_tokens(ex, 4, 2).tolist() == [5, 5, 1, 1]
    assert group_tokens(ex, 6, 4).tolist() == [14] * 4


def test_length_sorted_batches():
    lengths = [5, 2, 9, 2, 7]
    assert list(length_sorted_batches(lengths, 2)) == [([1, 3], [1, 3]), ([0, 4], [0, 4]), ([2], [2, 2])]
    # the last batch filled to a row count of the caller's choosing
    assert list(length_sorted_batches(lengths, 4, rows=lambda n: 1 << (n - 1).bit_length()))[-1] == ([2], [2])
    assert list(length_sorted_batches([], 4)) == []


def test_part_rows_next_power_of_two_up_to_the_batch():
    from npo_jax.eval.batching import part_rows

    assert [part_rows(n, 16) for n in (1, 2, 3, 5, 9, 16)] == [1, 2, 4, 8, 16, 16]
    assert part_rows(3, 4) == 4
