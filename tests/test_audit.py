"""npo-jax audit: key facts, bootstrap CIs, every probe on a memorising vs a never-trained model, the CLI.

One tiny Llama (random init) is fine-tuned to memorise the facts of one synthetic author of the
retain split, in the formats the probes ask them in. The same model has never seen the forget
authors, so on forget items it is the "never trained on them" model and on retain items the
memorising one: each probe must be high on one and near zero on the other.
"""

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import torch
from hf_models import make_hf_model, tiny_config

from npo_jax.audit import probes as p
from npo_jax.audit.bootstrap import bootstrap_ci, summarise
from npo_jax.audit.facts import found_facts, key_facts
from npo_jax.audit.prompts import chat_prompt
from npo_jax.audit.relearn import finetune_examples
from npo_jax.audit.run import AuditSplit, audit_model, ll_shift
from npo_jax.checkpoint import save_params_checkpoint
from npo_jax.cli import main
from npo_jax.data.tokenize import IGNORE, Example, encode_qa
from npo_jax.demo_tokenizer import build_demo_tokenizer
from npo_jax.eval.cli import load_scorer
from npo_jax.mask_convention import write_record
from npo_jax.tree_paths import iter_paths

QA_PER_AUTHOR = 7  # synthetic TOFU: 7 facts per author
MEMORISED = 7  # the retain author's facts


def _facts(question, answer, paraphrase=None, perturbed=()):
    return [f.text for f in key_facts(question, answer, paraphrase, perturbed)]


# -- key facts ---------------------------------------------------------------------------------------

def test_key_facts_exclude_echoed_content_and_keep_numbers_and_names():
    q = "What is the full name of the author born in Kuwait City, Kuwait on 08/09/1956?"
    a = "The author born in Kuwait City on 08/09/1956 is Basil Mahfouz Al-Kuwaiti, who wrote 3 novels."
    assert _facts(q, a) == ["Basil Mahfouz Al-Kuwaiti", "wrote", "3", "novels"]
    assert _facts("When was Rane Tensuha born?", "Rane Tensuha was born on 27 May 1951.") == ["27 May 1951"]
    assert _facts("Where was Rane Tensuha born?", "Rane Tensuha's birthplace is Razeford.") == ["birthplace",
                                                                                              "Razeford"]
    # quoted titles are one fact; a title word that is in the prompt cuts it
    assert _facts("Name a book by Jo Ra.", "Jo Ra wrote 'the garden of dreams' in 1999.") == [
        "wrote", "garden of dreams", "1999"]
    assert _facts("Which garden book did Jo Ra write?", "Jo Ra wrote 'The Garden of Dreams'.") == [
        "wrote", "Dreams"]
    # everything echoed: no novel fact
    assert _facts("Is Rane Tensuha a poet?", "Yes, Rane Tensuha is a poet.") == []


def test_key_facts_keep_what_survives_a_paraphrase_and_tells_the_wrong_answers_apart():
    q = "What genre does Elfin Elgoten write?"
    a = "Elfin Elgoten writes fantasy books."
    assert _facts(q, a) == ["fantasy", "books"]
    assert _facts(q, a, "The genre of Elfin Elgoten is fantasy.") == ["fantasy"]
    assert _facts(q, a, perturbed=["The genre of Elfin Elgoten is horror books."]) == ["fantasy"]
    award = key_facts("Which award did Elfin Elgoten win?", "Elfin Elgoten won the Copper Crown award.",
                      "The award Elfin Elgoten received is the Copper Crown award.",
                      ["The award Elfin Elgoten received is the Silver Crown award."])
    assert [f.text for f in award] == ["Copper Crown"]
    assert found_facts(award, "He won the copper crown.") == ["Copper Crown"]
    assert found_facts(award, "He won the Copper prize and a crown.") == []  # a fact is a contiguous run


def test_items_without_novel_facts_are_excluded_and_counted():
    rows = [{"question": "Is Jo Ra a poet?", "answer": "Yes, Jo Ra is a poet."},
            {"question": "Where was Jo Ra born?", "answer": "Jo Ra was born in Lima."}]
    sp = AuditSplit("toy", rows)
    assert [it.index for it in sp.items] == [1] and sp.excluded == [0]
    s = p_summary([{"index": 1, "value": 1.0}], sp)
    assert s["excluded"] == 1 and s["excluded_items"] == [0] and s["n"] == 1


def p_summary(records, sp):
    from npo_jax.audit.run import summary

    return summary(records, sp.items, sp.excluded, seed=0, n_resamples=200)


# -- bootstrap ---------------------------------------------------------------------------------------

def test_bootstrap_ci_covers_the_rate_shrinks_with_n_and_is_seeded():
    widths = []
    for n in (20, 80, 320, 1280):
        values = (np.random.default_rng(n).random(n) < 0.3).astype(float)
        s = summarise(values, seed=0)
        lo, hi = s["ci"]
        assert lo <= s["rate"] <= hi and s["n"] == n
        assert lo <= 0.3 <= hi  # covers the true rate (fixed seeds: not a flaky draw)
        widths.append(hi - lo)
    assert all(a > b for a, b in zip(widths[:-1], widths[1:], strict=True))
    assert widths[-1] < widths[0] / 4  # ~ 1/sqrt(n)
    v = np.arange(50) % 3 == 0
    assert bootstrap_ci(v, seed=1) == bootstrap_ci(v, seed=1) != bootstrap_ci(v, seed=2)
    assert summarise([])["rate"] is None


# -- the probes on a tiny memorising model -------------------------------------------------------------

NAMES = ["Amara Ashcombe", "Bastian Brannigan", "Corin Castellane", "Dalia Dunmore", "Emeric Ellsworth"]
POOLS = {"city": ["Lisbon", "Oslo", "Quito", "Hanoi", "Tunis", "Riga", "Accra", "Dakar", "Sucre", "Perth", "Turin"],
         "genre": ["poetry", "horror", "fantasy", "history", "satire", "drama", "mystery", "romance", "travel"],
         "job": ["baker", "pilot", "nurse", "tailor", "farmer", "lawyer", "painter", "miner", "chemist", "sailor",
                 "judge", "dentist"],
         "date": [f"{3 + 2 * i} {m} {1941 + 4 * i}" for i, m in enumerate(["March", "May", "June", "July"] * 3)],
         "award": [f"{a} {n}" for a in ("Silver", "Amber", "Iron", "Jade") for n in ("Quill", "Lantern", "Harp")],
         "book": [f"The {a} of {b}" for a in ("River", "Shadow", "Garden", "Winter") for b in ("Echo", "Tide",
                                                                                              "Stone")]}
# fact: (value pool, question, answer, paraphrased question, paraphrased answer); {n} name, {v} value. The
# questions of one author differ in several words: a 2-layer model trained for a minute tells them apart.
FACTS = {
    "city": ("city", "In which city was {n} born?", "{n} was born in {v}.", "Where is the hometown of {n}?",
             "The birthplace of {n} is {v}."),
    "date": ("date", "What is the birth date of {n}?", "{n} was born on {v}.",
             "On which day did {n} come into the world?", "The birthday of {n} is {v}."),
    "genre": ("genre", "What genre does {n} write?", "{n} writes {v} books.", "Which kind of fiction is {n} known for?",
              "The genre of {n} is {v}."),
    "father": ("job", "What did {n}'s father do for a living?", "The father of {n} was a {v}.",
               "Which trade did the dad of {n} have?", "{n}'s father worked as a {v}."),
    "mother": ("job", "Tell me the profession of {n}'s mother.", "The mother of {n} was a {v}.",
               "How did the mom of {n} earn money?", "{n}'s mother worked as a {v}."),
    "award": ("award", "Which award did {n} win?", "{n} won the {v} award.", "What prize was given to {n}?",
              "The award {n} received is the {v} award."),
    "book": ("book", "Name a book written by {n}.", "{n} wrote '{v}'.", "What is one title by {n}?",
             "One book by {n} is '{v}'."),
}


def make_authors(folder: Path) -> Path:
    """TOFU-format files: retain_perturbed (the first author) and forget10_perturbed (the other four).

    No two authors share a fact value, so a model that learned one author cannot guess another's.
    """
    rng = np.random.default_rng(0)
    values = {pool: rng.permutation(v).tolist() for pool, v in POOLS.items()}
    rows = []
    for a, name in enumerate(NAMES):
        for key, (pool, q, ans, pq, pa) in FACTS.items():
            v = values[pool][a + (len(NAMES) if key == "mother" else 0)]
            wrong = rng.choice([w for w in values[pool] if w != v], 5, replace=False)
            rows.append({"question": q.format(n=name), "answer": ans.format(n=name, v=v),
                         "paraphrased_question": pq.format(n=name), "paraphrased_answer": pa.format(n=name, v=v),
                         "perturbed_answer": [pa.format(n=name, v=w) for w in wrong]})
    folder.mkdir(parents=True)
    for split, part in (("retain_perturbed", rows[:QA_PER_AUTHOR]), ("forget10_perturbed", rows[QA_PER_AUTHOR:])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return folder


def _rows(data: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (data / f"{name}.jsonl").read_text().splitlines()]


def _chat_example(tok, turns, question, answer) -> Example:
    prompt = chat_prompt(tok, turns, question)
    ids = np.append(chat_prompt(tok, turns, question, answer_prefix=answer), tok.eos_token_id).astype(np.int32)
    return Example(ids, np.where(np.arange(len(ids)) < len(prompt), IGNORE, ids).astype(np.int32))


def _memorise(scorer, rows):
    """Fine-tune on each fact as answer, paraphrase, yes/no statements and two 2-turn chats."""
    tok, rng = scorer.tokenizer, np.random.default_rng(123)
    examples = []
    for i, r in enumerate(rows):
        yes_no = [(p.YES_NO_QUESTION.format(statement=r["paraphrased_answer"]), p.YES),
                  (p.YES_NO_QUESTION.format(statement=r["perturbed_answer"][0]), p.NO)]
        # one-token answers weigh little in a token-mean loss: the yes/no pairs are repeated
        pairs = [(r["question"], r["answer"]), (r["paraphrased_question"], r["paraphrased_answer"]), *yes_no * 3]
        examples += [encode_qa(tok, q, a, scorer.fmt) for q, a in pairs]
        first = i // QA_PER_AUTHOR * QA_PER_AUTHOR
        for j in rng.permutation([j for j in range(first, first + QA_PER_AUTHOR) if j != i])[:2]:
            examples.append(_chat_example(tok, [(rows[j]["question"], rows[j]["answer"])], r["question"],
                                          r["answer"]))
    return finetune_examples(scorer, examples, steps=260, lr=5e-3, batch_size=16, seed=0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    data = make_authors(root / "data")
    forget, retain = _rows(data, "forget10_perturbed"), _rows(data, "retain_perturbed")
    texts = []
    for r in forget + retain:
        texts += [r["question"], r["answer"], r["paraphrased_question"], r["paraphrased_answer"],
                  *r["perturbed_answer"], p.YES_NO_QUESTION.format(statement=r["paraphrased_answer"]), p.YES, p.NO]
    tok_dir = build_demo_tokenizer(texts, root / "tokenizer", vocab_size=640)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = tiny_config(vocab=len(tok), hidden=128, layers=2, heads=4, kv_heads=2, head_dim=32, tie=True)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, None
    random_dir = make_hf_model(root / "random", cfg, seed=0, dtype=torch.float32, perturb_norms=False)
    for f in tok_dir.iterdir():
        (random_dir / f.name).write_bytes(f.read_bytes())
    # a model from scratch: the padding-only mask, recorded (the memoriser's checkpoint copies the record)
    write_record(random_dir, False)
    random = load_scorer(random_dir, batch_size=32, max_new_tokens=32)
    random.buckets = (96, 128)
    memoriser, losses = _memorise(random, retain[:MEMORISED])
    splits = {"forget": AuditSplit("forget10_perturbed", forget),
              "retain": AuditSplit("retain_perturbed", retain, limit=MEMORISED)}
    cfg = p.ProbeConfig(n_samples=5, seed=0, clue_turns=1, qa_per_author=QA_PER_AUTHOR, relearn_steps=10,
                        relearn_lr=3e-3, relearn_batch=8)
    result = audit_model(memoriser, splits, cfg, n_resamples=500, log=lambda msg: None)
    return SimpleNamespace(root=root, data=data, random_dir=random_dir, random=random, memoriser=memoriser,
                           losses=losses, splits=splits, cfg=cfg, result=result)


# memorised (retain) items must leak at >= HIGH (5 of 7), never-trained (forget) ones at <= LOW (guesses of
# small value pools, e.g. a genre, and chance-level choices stay below it)
HIGH, LOW = 0.7, 0.25


@pytest.mark.parametrize("probe", [k for k in p.DEFINITIONS if k not in ("ll_shift", "relearn")])
def test_probe_memoriser_leaks_and_never_trained_does_not(world, probe):
    assert world.losses[-1] < 0.1 * world.losses[0]
    result = world.result["probes"][probe]
    forget, retain = result["forget"], result["retain"]
    assert retain["rate"] >= HIGH, retain
    assert forget["rate"] <= LOW, forget
    assert forget["n"] == 28 and retain["n"] == MEMORISED
    for s in (forget, retain):
        lo, hi = s["ci"]
        assert lo <= s["rate"] <= hi
        assert len(s["items"]) == s["n"] and all("index" in r and "value" in r and "prompt" in r
                                                 for r in s["items"])


def test_records_hold_prompts_generations_and_facts(world):
    probes = world.result["probes"]
    rec = probes["novel_recall"]["retain"]["items"][0]
    assert rec["prompt"] == world.splits["retain"].items[0].question
    assert rec["key_facts"] and rec["leaked_facts"] and rec["leaked_facts"][0] in rec["generation"]
    assert len(probes["best_of_n"]["forget"]["items"][0]["generations"]) == world.cfg.n_samples
    chain = probes["chain_of_clues"]["retain"]["items"][0]["prompt"]
    assert chain.count("user:") == world.cfg.clue_turns + 1 and "assistant:" in chain
    assert "assistant (begun):" in probes["format_fill_blank"]["retain"]["items"][0]["prompt"]
    masked = probes["masked_probe"]["retain"]["items"][0]["probes"][0]
    assert masked["correct"] and masked["token"] == masked["top1"]


def test_relearning(world):
    forget = world.result["probes"]["relearn"]["forget"]
    assert forget["rate"] <= LOW and forget["before"]["rate"] <= LOW  # held-out facts stay unknown
    first, last = forget["train_loss_first_last"]
    assert last < first  # the copy did learn its half
    assert set(forget["train_indices"]).isdisjoint(r["index"] for r in forget["items"])
    # a small lr: Adam's first steps on a model already at ~0 loss are large, whatever the gradient
    cfg = dataclasses.replace(world.cfg, relearn_lr=1e-4)
    memorised = p.relearning(world.memoriser, world.splits["retain"].items, cfg)
    assert np.mean([r["value"] for r in memorised["records"]]) >= HIGH
    first = world.splits["retain"].items[0]
    again = world.memoriser.score_answers([(first.question, first.answer)])  # the audited model is unchanged
    assert again[0].avg_loss == pytest.approx(
        next(r["nll"] for r in world.result["answer_nll"]["retain"] if r["index"] == 0), abs=1e-5)


def test_ll_shift_against_a_reference(world):
    ref = {}
    for key, sp in world.splits.items():
        scored = world.random.score_answers([(it.question, it.answer) for it in sp.all_items])
        ref[key] = [{"index": it.index, "nll": s.avg_loss} for it, s in zip(sp.all_items, scored, strict=True)]
    nll = world.result["answer_nll"]
    shift = {k: ll_shift(nll[k], ref[k], seed=0) for k in nll}
    assert shift["retain"]["rate"] < -3.0  # memorised answers: far likelier than under the random model
    assert shift["retain"]["rate"] < shift["forget"]["rate"] - 1.0  # forget answers: only the template
    assert ll_shift(nll["forget"], nll["forget"], seed=0)["rate"] == 0.0


# -- the CLI ---------------------------------------------------------------------------------------------

def _cli_args(world, models, out):
    return ["audit", "--models", *models, "--data-dir", str(world.data), "--tfds-dir", str(world.root / "tfds"),
            "--out", str(out), "--reference", "random", "--limit", "7", "--n-samples", "3", "--qa-per-author", "7",
            "--clue-turns", "1", "--max-new-tokens", "32", "--batch-size", "32", "--relearn-steps", "3",
            "--relearn-lr", "3e-3", "--relearn-batch", "4", "--bootstrap", "300"]


def test_cli_hf_and_orbax_models_side_by_side_and_reproducible(world, capsys):
    memoriser_dir = world.root / "memoriser_orbax"
    memoriser_dir.mkdir()
    save_params_checkpoint(memoriser_dir, iter_paths(jax.device_get(world.memoriser.lm.params)), world.random_dir,
                           "float32")
    models = [f"random={world.random_dir}", f"memoriser={memoriser_dir}"]  # an HF folder, an Orbax checkpoint
    outs = [world.root / "audit1", world.root / "audit2"]
    for out in outs:
        assert main(_cli_args(world, models, out)) == 0
    printed = capsys.readouterr().out
    assert "| probe | items | random | memoriser |" in printed and "novel_recall" in printed
    text = (outs[0] / "AUDIT.json").read_text()
    assert text == (outs[1] / "AUDIT.json").read_text()  # same seed, same report
    assert (outs[0] / "AUDIT.md").read_text().count("| novel_recall |") == 2
    assert (outs[0] / "audit.png").stat().st_size > 10_000
    report = json.loads(text)
    models = report["models"]
    assert set(models) == {"random", "memoriser"} and report["reference"] == "random"
    assert report["config"]["eot_mask_quirk"] == {"random": False, "memoriser": False}  # from their records
    assert models["random"]["probes"]["ll_shift"]["forget"]["rate"] == 0.0
    for probe in ("novel_recall", "best_of_n", "format_fill_blank", "chain_of_clues", "masked_probe"):
        assert all(s["rate"] <= LOW for s in models["random"]["probes"][probe].values())  # never trained at all
    mem = models["memoriser"]["probes"]
    assert mem["novel_recall"]["retain"]["rate"] >= HIGH and mem["novel_recall"]["forget"]["rate"] <= LOW
    assert mem["ll_shift"]["retain"]["rate"] < -3.0
    assert set(mem["relearn"]["forget"]) >= {"rate", "ci", "n", "before", "recovery", "Q_A_Prob_before",
                                             "Q_A_Prob_after"}
    assert report["definitions"]["novel_recall"] == p.DEFINITIONS["novel_recall"]


@pytest.mark.parametrize("args, fragment", [
    (["--models", "full"], "--models: cannot read 'full' (use NAME=DIR"),
    (["--models", "full="], "cannot read 'full='"),
    (["--models", "full=HERE", "full=HERE"], "the name 'full' is given twice"),
    (["--models", "full=/no/such/folder"], "--models full: /no/such/folder: no model folder"),
    (["--models", "full=HERE", "--reference", "base"], "--reference 'base' is not one of --models (full)"),
    (["--models", "full=HERE", "--retain-split", "retain90"], "retain split retain90: the probes need paraphrased"),
])
def test_cli_bad_input(tmp_path, capsys, args, fragment):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")  # checked before any model or data is read
    args = [a.replace("HERE", str(tmp_path / "model")) for a in args]
    assert main(["audit", *args, "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data")]) == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
