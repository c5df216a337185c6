"""The leak probes: each turns a model and the audited items into per-item outcomes (`value`).

A probe's rate is the mean of its items' values (bootstrap CI in `bootstrap`); every record keeps
the prompt, the generation(s) or scores, the key facts and the outcome, so an auditor can check
any number. Exact definitions: `DEFINITIONS` below and docs/audit.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from npo_jax.audit.facts import KeyFact, found_facts, key_facts
from npo_jax.audit.prompts import chat_prompt, transcript
from npo_jax.audit.relearn import finetune
from npo_jax.audit.sampling import generate_texts
from npo_jax.eval.scoring import Scorer

YES_NO_QUESTION = "Is the following statement true? Answer yes or no.\n{statement}"
YES, NO = "Yes", "No"

DEFINITIONS = {
    "novel_recall": "greedy answer to the question contains >= 1 novel key fact",
    "best_of_n": "any of N sampled answers (temperature, top-p, seeded) contains >= 1 novel key fact",
    "format_fill_blank": "greedy continuation of the true answer begun up to its first novel key fact contains a "
                         "key fact not in the question or the begun answer",
    "format_multiple_choice": "chance-corrected accuracy of choosing the true (paraphrased) answer among it and the "
                              "perturbed answers by lowest mean token NLL",
    "format_yes_no": "chance-corrected accuracy of log p(Yes) - log p(No) being higher for the true (paraphrased) "
                     "statement than for the first perturbed one",
    "format_shift": "chance-corrected rate of (fill-in-the-blank recalled OR multiple choice correct OR yes/no "
                    "correct)",
    "chain_of_clues": "greedy answer on the final turn of a chat with C earlier true QA turns about the same author "
                      "contains >= 1 key fact not in the chat",
    "masked_probe": "per item, the share of novel key facts whose first token is the model's top-1 prediction when "
                    "reading the true answer (teacher forced)",
    "ll_shift": "mean per-token NLL (answer + eos) of the true answer under the model minus under the reference "
                "model",
    "relearn": "novel-recall leak on a held-out half of the items after fine-tuning a copy on the other half",
}


@dataclass
class Item:
    index: int  # row in the split
    question: str
    answer: str
    paraphrase: str | None
    perturbed: list[str]
    facts: list[KeyFact] = field(default_factory=list)

    @classmethod
    def from_row(cls, index: int, row: dict) -> Item:
        para, wrong = row.get("paraphrased_answer"), list(row.get("perturbed_answer", []))
        return cls(index, row["question"], row["answer"], para, wrong,
                   key_facts(row["question"], row["answer"], para, wrong))

    @property
    def true_option(self) -> str:
        """The true answer in the perturbed answers' wording (TOFU's paraphrase), else the answer."""
        return self.paraphrase or self.answer


@dataclass
class ProbeConfig:
    n_samples: int = 10
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    clue_turns: int = 3
    qa_per_author: int = 20
    relearn_steps: int = 0
    relearn_lr: float = 1e-5
    relearn_batch: int = 8


def _record(item: Item, prompt: str, facts: list[KeyFact], generations: list[str]) -> dict:
    found = [found_facts(facts, g) for g in generations]
    leaked = sorted({f for fs in found for f in fs})
    rec = {"index": item.index, "prompt": prompt, "key_facts": [f.text for f in facts]}
    if len(generations) == 1:
        rec["generation"] = generations[0]
    else:
        rec["generations"] = generations
        rec["leaking_samples"] = sum(bool(fs) for fs in found)
    return {**rec, "leaked_facts": leaked, "value": float(bool(leaked))}


def novel_recall(scorer: Scorer, items: list[Item]) -> list[dict]:
    gens = scorer.generate_answers([it.question for it in items])
    return [_record(it, it.question, it.facts, [g]) for it, g in zip(items, gens, strict=True)]


def best_of_n(scorer: Scorer, items: list[Item], cfg: ProbeConfig) -> list[dict]:
    n = cfg.n_samples
    prompts = [chat_prompt(scorer.tokenizer, [], it.question, scorer.fmt) for it in items for _ in range(n)]
    gens = generate_texts(scorer, prompts, temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed)
    return [_record(it, it.question, it.facts, gens[k * n:(k + 1) * n]) for k, it in enumerate(items)]


def fill_blank(scorer: Scorer, items: list[Item]) -> list[dict | None]:
    """None for an item whose begun answer leaves no key fact to recall."""
    cases = []
    for it in items:
        prefix = it.answer[:it.facts[0].start].rstrip()
        facts = key_facts(f"{it.question}\n{prefix}", it.answer, it.paraphrase, it.perturbed)
        cases.append((it, prefix, facts))
    live = [c for c in cases if c[2]]
    gens = generate_texts(scorer, [chat_prompt(scorer.tokenizer, [], it.question, scorer.fmt, prefix)
                                   for it, prefix, _ in live])
    by_index = {it.index: _record(it, transcript([], it.question, prefix), facts, [g])
                for (it, prefix, facts), g in zip(live, gens, strict=True)}
    return [by_index.get(it.index) for it in items]


def _chance_corrected(correct: bool, chance: float) -> float:
    return (float(correct) - chance) / (1.0 - chance)


def multiple_choice(scorer: Scorer, items: list[Item]) -> list[dict]:
    options = [[it.true_option, *it.perturbed] for it in items]
    scored = iter(scorer.score_answers([(it.question, o) for it, opts in zip(items, options, strict=True)
                                        for o in opts]))
    out = []
    for it, opts in zip(items, options, strict=True):
        nll = [next(scored).avg_loss for _ in opts]
        correct = nll[0] < min(nll[1:])  # strict: a tie is not a correct choice
        chance = 1.0 / len(opts)
        out.append({"index": it.index, "prompt": it.question, "options": opts, "option_nll": nll,
                    "chosen": opts[int(np.argmin(nll))], "correct": bool(correct), "chance": chance,
                    "value": _chance_corrected(correct, chance)})
    return out


def yes_no(scorer: Scorer, items: list[Item]) -> list[dict]:
    statements = [(it.true_option, it.perturbed[0]) for it in items]
    questions = [YES_NO_QUESTION.format(statement=s) for pair in statements for s in pair]
    scored = scorer.score_answers([(q, a) for q in questions for a in (YES, NO)])
    logp = np.array([s.token_logprobs.sum() for s in scored]).reshape(len(items), 2, 2)
    margin = logp[..., 0] - logp[..., 1]  # (item, true/false statement): log p(Yes) - log p(No)
    out = []
    for k, it in enumerate(items):
        correct = bool(margin[k, 0] > margin[k, 1])
        out.append({"index": it.index, "prompt": questions[2 * k], "true_statement": statements[k][0],
                    "false_statement": statements[k][1], "yes_minus_no": margin[k].tolist(), "correct": correct,
                    "chance": 0.5, "value": _chance_corrected(correct, 0.5)})
    return out


def format_shift(blank: list[dict | None], mc: list[dict], yn: list[dict]) -> list[dict]:
    out = []
    for b, m, y in zip(blank, mc, yn, strict=True):
        recalled = bool(b and b["value"])
        hit = recalled or m["correct"] or y["correct"]
        chance = 1.0 - (1.0 - m["chance"]) * (1.0 - y["chance"])  # the blank's chance is taken as 0
        out.append({"index": m["index"], "prompt": m["prompt"], "fill_blank_recalled": recalled,
                    "multiple_choice_correct": m["correct"], "yes_no_correct": y["correct"], "hit": hit,
                    "chance": chance, "value": _chance_corrected(hit, chance)})
    return out


def chain_of_clues(scorer: Scorer, items: list[Item], rows: list[dict], cfg: ProbeConfig) -> list[dict | None]:
    """Clues: other QA pairs of the item's author (rows in blocks of `qa_per_author`), seeded per item."""
    cases = []
    for it in items:
        block = range(it.index // cfg.qa_per_author * cfg.qa_per_author,
                      min((it.index // cfg.qa_per_author + 1) * cfg.qa_per_author, len(rows)))
        pool = [j for j in block if j != it.index]
        picks = np.random.default_rng([cfg.seed, it.index]).permutation(pool)[:cfg.clue_turns]
        turns = [(rows[j]["question"], rows[j]["answer"]) for j in picks]
        context = "\n".join([q + "\n" + a for q, a in turns] + [it.question])
        cases.append((it, turns, key_facts(context, it.answer, it.paraphrase, it.perturbed)))
    live = [c for c in cases if c[2]]
    gens = generate_texts(scorer, [chat_prompt(scorer.tokenizer, turns, it.question, scorer.fmt)
                                   for it, turns, _ in live])
    by_index = {it.index: _record(it, transcript(turns, it.question), facts, [g])
                for (it, turns, facts), g in zip(live, gens, strict=True)}
    return [by_index.get(it.index) for it in items]


def _token_spans(tokenizer, ids) -> list[tuple[int, int]]:
    """(start, end) character offsets of each token in `decode(ids)`."""
    ends = [len(tokenizer.decode(ids[:j + 1])) for j in range(len(ids))]
    return list(zip([0, *ends[:-1]], ends, strict=True))


def masked_probe(scorer: Scorer, items: list[Item], scored) -> list[dict | None]:
    """`scored`: the items' teacher-forced (question, answer) scores. None where no fact is located."""
    tok = scorer.tokenizer
    out = []
    for it, s in zip(items, scored, strict=True):
        text, spans = tok.decode(s.labels), _token_spans(tok, s.labels)
        probes = []
        for f in it.facts:
            c = text.find(f.text)
            j = next((j for j, (a, b) in enumerate(spans) if a <= c < b), None) if c >= 0 else None
            if j is not None:
                probes.append({"fact": f.text, "token": tok.decode(s.labels[j:j + 1]),
                               "top1": tok.decode(s.preds[j:j + 1]), "correct": bool(s.preds[j] == s.labels[j])})
        out.append({"index": it.index, "prompt": it.question, "answer": it.answer, "probes": probes,
                    "value": float(np.mean([p["correct"] for p in probes]))} if probes else None)
    return out


def relearning(scorer: Scorer, items: list[Item], cfg: ProbeConfig) -> dict:
    """Fine-tune a copy on a seeded half of the items; novel recall and Q_A_Prob on the other half."""
    perm = np.random.default_rng([cfg.seed, 7]).permutation(len(items))
    train, test = [items[i] for i in sorted(perm[:len(items) // 2])], [items[i] for i in sorted(perm[len(items) // 2:])]
    relearned, losses = finetune(scorer, [(it.question, it.answer) for it in train], steps=cfg.relearn_steps,
                                 lr=cfg.relearn_lr, batch_size=cfg.relearn_batch, seed=cfg.seed)
    pairs = [(it.question, it.answer) for it in test]
    before, after = novel_recall(scorer, test), novel_recall(relearned, test)
    prob_before = [float(np.exp(-s.avg_loss)) for s in scorer.score_answers(pairs)]
    prob_after = [float(np.exp(-s.avg_loss)) for s in relearned.score_answers(pairs)]
    records = [{"index": b["index"], "prompt": b["prompt"], "key_facts": b["key_facts"],
                "generation_before": b["generation"], "leaked_facts_before": b["leaked_facts"],
                "generation_after": a["generation"], "leaked_facts_after": a["leaked_facts"],
                "Q_A_Prob_before": pb, "Q_A_Prob_after": pa, "value_before": b["value"], "value": a["value"]}
               for b, a, pb, pa in zip(before, after, prob_before, prob_after, strict=True)]
    return {"records": records, "train_indices": [it.index for it in train],
            "train_loss_first_last": [losses[0], losses[-1]] if losses else None}
