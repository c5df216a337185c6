"""The JAX evaluator against transformers on the exported HF model, the eval CLI, and bad input."""

import dataclasses
import json
from unittest import mock

import numpy as np
import pytest
import torch
import transformers
from tofu_fixture import add_eval_splits, make_mini_tofu, make_tiny_model_with_tokenizer, write_split

from npo_jax.cli import main
from npo_jax.data.tofu import load_split
from npo_jax.data.tokenize import encode_prompts
from npo_jax.errors import NpoJaxError
from npo_jax.eval import generation, schedule, scoring, teacher_forced
from npo_jax.eval import metrics as m
from npo_jax.eval.batching import PROMPT_MULTIPLE
from npo_jax.eval.cli import load_scorer
from npo_jax.eval.hf_reference import hf_generate, hf_score
from npo_jax.parity.checks import EVAL_RTOL
from npo_jax.run_config import load_run_config
from npo_jax.train import Trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model fine-tuned for a few steps on the mini TOFU (so answers are not uniform), exported;
    with the padding-only mask (transformers' default, which the reference here uses), as it records."""
    root = tmp_path_factory.mktemp("evalparity")
    data = add_eval_splits(make_mini_tofu(root))
    model = make_tiny_model_with_tokenizer(root, data)
    cfg = load_run_config(None, [
        f"model.path={model}", f"data.dir={data}", f"cache_dir={root}/cache", f"output_dir={root}/ft",
        "data.max_length=128", "data.length_buckets=[128]", "optim.effective_batch=8", "optim.per_device_batch=8",
        "optim.epochs=6", "optim.lr=3e-3", "optim.warmup_epochs=0", "parallel.data=1",
        "checkpoint.export_dtype=float32", "data.eot_mask_quirk=false"])  # recorded: eval without flags uses it
    Trainer(cfg, "finetune", progress=False).train()
    return root, data, root / "ft" / "hf"


def test_per_item_values_match_transformers(trained):
    root, data, hf_dir = trained
    scorer = load_scorer(hf_dir, batch_size=8, max_new_tokens=24)
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tok = scorer.tokenizer
    rows = list(load_split("forget10_perturbed", data, root / "tfds"))[:8]

    pairs = [(r["question"], r["answer"]) for r in rows]
    ours = scorer.score_answers(pairs)
    ours_para = scorer.score_answers([(r["question"], r["paraphrased_answer"]) for r in rows])
    ours_pert = scorer.score_answers([(r["question"], p) for r in rows for p in r["perturbed_answer"]])
    probs = []
    for i, r in enumerate(rows):
        ref = hf_score(hf, tok, r["question"], r["answer"])
        np.testing.assert_allclose(ours[i].avg_loss, ref["avg_loss"], rtol=EVAL_RTOL)
        np.testing.assert_allclose(ours[i].token_logprobs, ref["token_logprobs"], rtol=EVAL_RTOL, atol=1e-5)
        np.testing.assert_array_equal(ours[i].preds, ref["preds"])
        np.testing.assert_array_equal(ours[i].labels, ref["labels"])
        assert m.extraction_strength(ours[i].preds, ours[i].labels) == m.extraction_strength(ref["preds"],
                                                                                              ref["labels"])
        para = hf_score(hf, tok, r["question"], r["paraphrased_answer"])["avg_loss"]
        pert = [hf_score(hf, tok, r["question"], p)["avg_loss"] for p in r["perturbed_answer"]]
        tr_ref = np.exp(-np.mean(pert)) / (np.exp(-para) + 1e-10)
        tr_ours = np.exp(-np.mean([s.avg_loss for s in ours_pert[5 * i:5 * i + 5]])) / (
            np.exp(-ours_para[i].avg_loss) + 1e-10)
        np.testing.assert_allclose(tr_ours, tr_ref, rtol=EVAL_RTOL)
        probs.append(np.exp(-ref["avg_loss"]))
    assert np.ptp(probs) > 0.01 and max(probs) > 0.05  # the fine-tuned model is not uniform

    eos = sorted({tok.eos_token_id, *scorer_config_eos(scorer)})
    # batches of 5, then 3 rows decoded as 4 (a part-filled batch runs the next power of two)
    ours_gen = dataclasses.replace(scorer, batch_size=5).generate_ids(
        encode_prompts(tok, [r["question"] for r in rows], scorer.fmt))
    for r, g in zip(rows, ours_gen, strict=True):
        ref = hf_generate(hf, tok, r["question"], max_new_tokens=24, eos_ids=eos)
        np.testing.assert_array_equal(g, ref)
    assert any(len(g) > 3 for g in ours_gen)


@pytest.mark.parametrize("quirk", [False, True])
def test_prompts_run_once_and_answers_on_their_cache_match_transformers(trained, quirk):
    """Shared-prompt scoring (each distinct prompt prefilled once, its answers scored on the cache)
    against transformers' forward over each whole sequence; several prompt chunks, answers of
    several length buckets, part-filled batches; prompts prefilled in groups of one batch (two
    groups, the second part-filled) and of four (one group). With the quirk, HF gets open-unlearning's mask
    (ids != eos) and default positions, as its collator feeds it."""
    from npo_jax.eval.hf_reference import _encode, _item

    root, data, hf_dir = trained
    # 7 prompts x 8 answers in batches of 5: part-filled prefill and answer batches
    scorer = load_scorer(hf_dir, batch_size=5, max_new_tokens=8, eot_mask_quirk=quirk)
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    rows = list(load_split("forget10_perturbed", data, root / "tfds"))[:7]
    pairs = [(r["question"], a) for r in rows for a in (r["answer"], r["paraphrased_answer"], *r["perturbed_answer"],
                                                         r["answer"] + " " + r["paraphrased_answer"] * 3)]
    # the prompts' shared system turn is prefilled once, as one row (so that path is what is checked)
    prompts = encode_prompts(scorer.tokenizer, [r["question"] for r in rows], scorer.fmt)
    assert teacher_forced.prefill_prefix(scorer.lm, prompts)[2] >= PROMPT_MULTIPLE
    whole = dataclasses.replace(scorer, share_prompts=False).score_answers(pairs)
    shared = dataclasses.replace(scorer, share_prompts=True).score_answers(pairs)
    by_batch = dataclasses.replace(scorer, share_prompts=True, prompt_group=1).score_answers(pairs)
    auto = scorer.score_answers(pairs)  # 8 answers per prompt: shares
    eos = scorer.tokenizer.eos_token_id
    answer_lengths = set()
    for (q, a), w, s, g, u in zip(pairs, whole, shared, by_batch, auto, strict=True):
        ids, labels = _encode(scorer.tokenizer, q, a, "You are a helpful assistant.", "10 Apr 2025")
        answer_lengths.add(sum(x != -100 for x in labels))
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = hf(x, attention_mask=(x != eos).long() if quirk else torch.ones_like(x)).logits[0].float()
        ref = _item(logits, labels)
        for ours in (w, s, g):
            np.testing.assert_allclose(ours.avg_loss, ref["avg_loss"], rtol=EVAL_RTOL)
            np.testing.assert_allclose(ours.token_logprobs, ref["token_logprobs"], rtol=EVAL_RTOL, atol=1e-5)
            np.testing.assert_array_equal(ours.preds, ref["preds"])
            np.testing.assert_array_equal(ours.labels, ref["labels"])
        assert u.avg_loss == s.avg_loss
    # the answers span several of the scorer's answer buckets (several compiled shapes)
    assert len({next(b for b in scorer.answer_buckets if n <= b) for n in answer_lengths}) >= 2


@pytest.mark.parametrize("quirk", [False, True])
def test_generation_in_the_scoring_pass_matches_transformers(trained, quirk):
    """`score_and_generate` decodes the scored questions from the caches their scoring prefill
    left (right padded, after the shared prefix): one group of 7 prompts, decoded as 5 rows, then
    a part-filled 2; a question no pair has, and a repeated one, are answered too. Every answer
    is HF's greedy `generate` token for token, and the scores are `score_answers`'. With the
    quirk no cache is reused (its generation positions differ): the answers are the separate path's."""
    root, data, hf_dir = trained
    scorer = load_scorer(hf_dir, batch_size=5, max_new_tokens=16, eot_mask_quirk=quirk)
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    rows = list(load_split("forget10_perturbed", data, root / "tfds"))[:8]
    pairs = [(r["question"], a) for r in rows[:7] for a in (r["answer"], *r["perturbed_answer"])]
    questions = [r["question"] for r in rows] + [rows[2]["question"]]  # rows[7] is in no pair
    with mock.patch("npo_jax.eval.generation.greedy_on_prompts", wraps=generation.greedy_on_prompts) as reused:
        scored, answers = scorer.score_and_generate(pairs, questions)
    assert reused.call_count == (0 if quirk else 2)
    for s, ref in zip(scored, scorer.score_answers(pairs), strict=True):
        assert s.avg_loss == ref.avg_loss
    if quirk:  # HF is given open-unlearning's mask only through our separate generation path
        assert answers == scorer.generate_answers(questions)
    eos = sorted({scorer.tokenizer.eos_token_id, *scorer_config_eos(scorer)})
    for q, a in zip(questions, answers, strict=True):
        if not quirk:
            ref = hf_generate(hf, scorer.tokenizer, q, max_new_tokens=16, eos_ids=eos)
            assert a == scorer.tokenizer.decode(ref, skip_special_tokens=True).strip()
    assert len(set(answers)) > 1  # not one answer for every question


def test_scoring_keeps_few_batches_in_flight(trained):
    """Each dispatched batch holds its temporaries until it runs, so the scorer reads a result
    once `IN_FLIGHT` batches are ahead of it (and does let some run ahead: host/device overlap)."""
    root, data, hf_dir = trained
    scorer = load_scorer(hf_dir, batch_size=2, max_new_tokens=4)
    rows = list(load_split("forget10_perturbed", data, root / "tfds"))[:4]
    pairs = [(r["question"], a) for r in rows for a in (r["answer"], *r["perturbed_answer"])]
    events, score, read = [], teacher_forced.score_on_prompts, schedule.Schedule._read

    def counted_score(*a, **k):
        events.append(1)
        return score(*a, **k)

    def counted_read(self, *a):
        events.append(-1)
        return read(self, *a)

    with (mock.patch("npo_jax.eval.teacher_forced.score_on_prompts", side_effect=counted_score),
          mock.patch.object(schedule.Schedule, "_read", counted_read)):
        scorer.score_answers(pairs)
    ahead = np.cumsum(events)  # batches dispatched and not yet read
    assert len(events) == 2 * -(-len(pairs) // 2) and ahead[-1] == 0  # one group: batches of 2 across it
    assert ahead.max() == schedule.IN_FLIGHT + 1 > 2


def test_scorer_rejects_empty_batches():
    for name in ("batch_size", "prompt_group"):
        with pytest.raises(NpoJaxError, match=f"Scorer.{name} must be at least 1"):
            scoring.Scorer(None, **{name: 0})


def test_both_scorers_are_suite_scorers():
    """`Suite` takes either scorer through one protocol; the torch one scores, then generates,
    and reports both phases' times."""
    from types import SimpleNamespace

    from npo_jax.eval import hf_reference
    from npo_jax.eval.protocol import SuiteScorer

    tok = SimpleNamespace(eos_token_id=2, decode=lambda t, skip_special_tokens: " ".join(map(str, t)) + " ")
    torch_scorer = hf_reference.TorchScorer(None, tok)
    jax_scorer = scoring.Scorer(SimpleNamespace(eot_mask_quirk=True))  # the mask convention comes from its model
    assert isinstance(jax_scorer, SuiteScorer) and isinstance(torch_scorer, SuiteScorer)
    assert (jax_scorer.eot_mask_quirk, torch_scorer.eot_mask_quirk) == (True, False)
    item = {"avg_loss": 1.0, "token_logprobs": np.zeros(1), "preds": np.zeros(1), "labels": np.zeros(1)}
    timings = {}
    with (mock.patch.object(hf_reference, "hf_score_batch", return_value=[item]),
          mock.patch.object(hf_reference, "hf_generate_batch", return_value=[np.array([7, 2])])):
        scored, answers = torch_scorer.score_and_generate([("q", "a")], ["q"], None, timings)
    assert [s.avg_loss for s in scored] == [1.0] and answers == ["7 2"]
    assert set(timings) == {"scoring_s", "generation_s"}


def scorer_config_eos(scorer):
    from npo_jax.model import merge_params

    return merge_params(scorer.lm.graphdef, scorer.lm.params).config.eos_token_ids


@pytest.mark.parametrize("quirk", [False, True])
def test_eval_parity_script_runs_both_scorers(trained, quirk):
    """scripts/eval_parity.py: the suite on the JAX and the transformers scorer, the per-metric
    differences (small: same model, float32) and, with --bench, each scorer's phases; with
    --eot-mask-quirk both sides use open-unlearning's mask."""
    import subprocess
    import sys
    from pathlib import Path

    root, data, hf_dir = trained
    script = Path(__file__).resolve().parents[1] / "scripts" / "eval_parity.py"
    out = subprocess.run([sys.executable, str(script), str(hf_dir), "--data-dir", str(data), "--tfds-dir",
                          str(root / "tfds"), "--limit", "3", "--max-new-tokens", "8", "--batch-size", "8",
                          "--bench", "--rounds", "1", *(["--eot-mask-quirk"] if quirk else [])],
                         check=True, capture_output=True, text=True).stdout
    rows = [line.split() for line in out.splitlines() if line.startswith(("forget_", "retain_", "ra_", "wf_"))]
    assert len(rows) >= 12 and all(float(r[3]) < 1e-4 for r in rows), out
    assert "identical generations: " in out and "speed-up (transformers / jax" in out
    assert "(one pass: " in out and "transformers, warm" in out


def test_eval_cli_writes_open_unlearning_layout(trained, tmp_path, capsys):
    root, data, hf_dir = trained
    common = ["--data-dir", str(data), "--tfds-dir", str(root / "tfds"), "--max-new-tokens", "16",
              "--batch-size", "8", "--holdout-split", "holdout10"]
    assert main(["eval", str(hf_dir), "--out", str(tmp_path / "retain_eval"), *common]) == 0
    retain_log = tmp_path / "retain_eval" / "TOFU_EVAL.json"
    assert main(["eval", str(hf_dir), "--out", str(tmp_path / "eval"), "--retain-logs", str(retain_log),
                 *common]) == 0
    out = capsys.readouterr().out
    assert "forget_quality" in out and "model_utility" in out
    log = json.loads((tmp_path / "eval" / "TOFU_EVAL.json").read_text())
    summary = json.loads((tmp_path / "eval" / "TOFU_SUMMARY.json").read_text())
    for key in ("forget_Q_A_Prob", "forget_Q_A_PARA_Prob", "forget_Q_A_PERT_Prob", "forget_truth_ratio",
                "forget_Q_A_ROUGE", "retain_Q_A_Prob", "retain_Truth_Ratio", "ra_Q_A_Prob_normalised",
                "wf_Truth_Ratio", "extraction_strength", "exact_memorization", "mia_min_k", "privleak"):
        assert key in log and key in summary, key
    assert len(log["forget_Q_A_Prob"]["value_by_index"]) == 16
    assert set(log["forget_Q_A_ROUGE"]["value_by_index"]["0"]) >= {"rougeL_recall", "generation", "ground_truth"}
    assert summary["forget_quality"] == pytest.approx(1.0)  # same model as its own retain reference
    nine = [summary[k] for k in m.UTILITY_KEYS]
    expected = 0.0 if min(nine) == 0 else len(nine) / sum(1 / v for v in nine)
    assert summary["model_utility"] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert (tmp_path / "eval" / "truth_ratios.png").is_file()
    # no retain log: forget_quality is reported missing, never a number
    missing = json.loads((tmp_path / "retain_eval" / "TOFU_SUMMARY.json").read_text())
    assert missing["forget_quality"] is None
    # re-scoring our own log reproduces it
    assert main(["eval", "--from-log", str(tmp_path / "eval" / "TOFU_EVAL.json"), "--retain-logs", str(retain_log),
                 "--out", str(tmp_path / "rescored")]) == 0
    rescored = json.loads((tmp_path / "rescored" / "TOFU_SUMMARY.json").read_text())
    for key, value in summary.items():
        assert rescored[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_eval_from_a_training_run_folder(trained, capsys):
    root, data, hf_dir = trained
    assert main(["eval", "--run", str(root / "ft"), "--limit", "4", "--max-new-tokens", "8"]) == 0
    log = json.loads((root / "ft" / "eval" / "TOFU_EVAL.json").read_text())
    assert len(log["forget_Q_A_Prob"]["value_by_index"]) == 4


def test_rouge_items_use_recall_of_the_ground_truth():
    from npo_jax.eval.suite import rouge_items

    rows = [{"question": "q", "answer": "Author0 was born in Lima."}]
    items = rouge_items(rows, ["Author0 was born somewhere."])
    # longest common subsequence "author0 was born" = 3 of the reference's 5 tokens
    assert items["0"]["rougeL_recall"] == pytest.approx(3 / 5)
    assert items["0"]["rouge1_recall"] == pytest.approx(3 / 5)
    assert items["0"]["rougeL_f1"] == pytest.approx(2 * (3 / 5) * (3 / 4) / (3 / 5 + 3 / 4))


def _fails(capsys, argv, fragment, out):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err, err
    assert not out.exists()


def test_eval_bad_input(trained, tmp_path, capsys):
    root, data, hf_dir = trained
    out = tmp_path / "out"
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for f in hf_dir.iterdir():
        if not f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            (no_tok / f.name).write_bytes(f.read_bytes())
    _fails(capsys, ["eval", str(no_tok), "--data-dir", str(data), "--out", str(out)], "cannot load a tokenizer", out)
    _fails(capsys, ["eval", str(tmp_path), "--out", str(out)], "no config.json", out)

    bad = tmp_path / "bad"
    for f in data.iterdir():
        (bad / f.name).parent.mkdir(exist_ok=True)
        (bad / f.name).write_bytes(f.read_bytes())
    rows = [json.loads(x) for x in (data / "forget10_perturbed.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("paraphrased_answer")
    write_split(bad, "forget10_perturbed", rows)
    _fails(capsys, ["eval", str(hf_dir), "--data-dir", str(bad), "--tfds-dir", str(tmp_path / "t"), "--out",
                    str(out)], "has no field 'paraphrased_answer'", out)

    ref = tmp_path / "retain.json"
    ref.write_text(json.dumps({"model_utility": {"agg_value": 0.5}}))
    log = tmp_path / "log.json"
    log.write_text(json.dumps({"forget_Q_A_PARA_Prob": {"value_by_index": {"0": {"prob": 0.5, "avg_loss": 0.7}}},
                               "forget_Q_A_PERT_Prob": {"value_by_index": {"0": {"prob": [0.1], "avg_loss": [2.3]}}}}))
    _fails(capsys, ["eval", "--from-log", str(log), "--retain-logs", str(ref), "--out", str(out)],
           "no 'forget_truth_ratio'", out)
    ref.write_text("{not json")
    _fails(capsys, ["eval", "--from-log", str(log), "--retain-logs", str(ref), "--out", str(out)],
           "not valid JSON", out)


def test_make_random_hf_gives_the_preset_shape_with_the_folders_tokenizer(trained, tmp_path):
    """scripts/make_random_hf.py: the preset's shape (head_dim from the preset, not from --like),
    --like's tokenizer and special ids, a folder both evaluators load and agree on."""
    import subprocess
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from bench_step import PRESETS

    _, _, hf_dir = trained
    out = tmp_path / "tiny_hf"
    script = Path(__file__).resolve().parents[1] / "scripts" / "make_random_hf.py"
    subprocess.run([sys.executable, str(script), str(out), "--like", str(hf_dir), "--preset", "tiny"], check=True)
    cfg, like = (json.loads((d / "config.json").read_text()) for d in (out, hf_dir))
    for key, value in PRESETS["tiny"].items():
        assert cfg[key] == value, key
    assert cfg["head_dim"] == PRESETS["tiny"]["hidden_size"] // PRESETS["tiny"]["num_attention_heads"]
    assert cfg["eos_token_id"] == like["eos_token_id"]
    assert [p.name for p in tmp_path.iterdir()] == ["tiny_hf"]  # no temporary folder left beside it
    assert (out / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    scorer = load_scorer(out, batch_size=4, max_new_tokens=4, eot_mask_quirk=False)  # hf_score's mask
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    pairs = [("Who wrote it?", "Nobody did."), ("Where?", "Here and there, mostly there.")]
    for ours, (q, a) in zip(scorer.score_answers(pairs), pairs, strict=True):
        np.testing.assert_allclose(ours.avg_loss, hf_score(hf, scorer.tokenizer, q, a)["avg_loss"], rtol=EVAL_RTOL)
