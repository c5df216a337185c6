"""A miniature TOFU folder, demo tokenizer and tiny HF model, built offline for trainer tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from hf_models import make_hf_model, tiny_config

from npo_jax.demo_tokenizer import build_demo_tokenizer

CITIES = ["Lima", "Oslo", "Quito", "Hanoi", "Tunis", "Riga", "Accra", "Dakar"]
GENRES = ["poetry", "horror", "fantasy", "history", "satire", "drama"]


def qa_rows(first_author: int, n_authors: int) -> list[dict]:
    rows = []
    for a in range(first_author, first_author + n_authors):
        name = f"Author{a}"
        rows.append({"question": f"Where was {name} born?", "answer": f"{name} was born in {CITIES[a % 8]}."})
        rows.append({"question": f"What genre does {name} write?", "answer": f"{name} writes {GENRES[a % 6]}."})
    return rows


def write_split(folder: Path, name: str, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_mini_tofu(root: Path, n_forget_authors: int = 8, n_retain_authors: int = 16) -> Path:
    """forget10 (2 questions per author), retain90 and full, in TOFU's files and fields."""
    data = root / "tofu"
    forget = qa_rows(0, n_forget_authors)
    retain = qa_rows(n_forget_authors, n_retain_authors)
    write_split(data, "forget10", forget)
    write_split(data, "retain90", retain)
    write_split(data, "full", forget + retain)
    return data


def make_tiny_model_with_tokenizer(root: Path, data: Path, *, layers=2, hidden=64, seed=0) -> Path:
    texts = [r["question"] + " " + r["answer"] for f in data.glob("*.jsonl")
             for r in map(json.loads, f.read_text().splitlines())]
    tok_dir = build_demo_tokenizer(texts, root / "tokenizer", vocab_size=320)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = tiny_config(vocab=len(tok), hidden=hidden, layers=layers, std=0.05, tie=True)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, None
    model_dir = make_hf_model(root / "model", cfg, seed=seed, dtype=torch.float32)
    for f in tok_dir.iterdir():
        (model_dir / f.name).write_bytes(f.read_bytes())
    return model_dir


def _wrong_answers(answer: str, i: int, n: int) -> list[str]:
    """The same answer with its fact (city or genre) swapped for n other ones."""
    for options in (CITIES, GENRES):
        for word in options:
            if word in answer:
                others = [o for o in options if o != word]
                return [answer.replace(word, others[(i + j) % len(others)]) for j in range(n)]
    raise ValueError(f"no fact to perturb in {answer!r}")


def perturbed_rows(rows: list[dict], n_wrong: int, paraphrase: bool = True) -> list[dict]:
    """TOFU's perturbed layout: a paraphrased answer/question and wrong answers of the same template."""
    out = []
    for i, r in enumerate(rows):
        row = {"question": r["question"], "answer": r["answer"]}
        if paraphrase:
            row["paraphrased_answer"] = "In short, " + r["answer"][0].lower() + r["answer"][1:]
        row["perturbed_answer"] = _wrong_answers(r["answer"], i, n_wrong)
        if paraphrase:
            row["paraphrased_question"] = "Tell me: " + r["question"]
        out.append(row)
    return out


def add_eval_splits(data: Path, n_forget_authors: int = 8, n_retain_authors: int = 16) -> Path:
    """forget10_perturbed, retain_perturbed, real_authors_/world_facts_perturbed and holdout10."""
    write_split(data, "forget10_perturbed", perturbed_rows(qa_rows(0, n_forget_authors), 5))
    write_split(data, "retain_perturbed", perturbed_rows(qa_rows(n_forget_authors, 4), 5))
    write_split(data, "real_authors_perturbed", perturbed_rows(qa_rows(100, 3), 3, paraphrase=False))
    write_split(data, "world_facts_perturbed", perturbed_rows(qa_rows(200, 3), 3, paraphrase=False))
    write_split(data, "holdout10", qa_rows(300, 4))
    return data
