"""`npo-jax demo OUT`: the whole pipeline, offline, on a CPU, in a few minutes.

Synthetic TOFU data and a demo tokenizer are generated; a tiny Llama (random init) is
fine-tuned on `full` (the base model) and on `retain90` (the retain reference), with the
padding-only attention mask, which their checkpoints record (`npo_jax.mask_convention`); the base is
unlearned with NPO on forget10 / retain90 with the seed recipe (alpha 2, beta 0.1, 5 epochs; lr
scaled to the tiny model); base, retain and unlearned models are evaluated with the TOFU suite;
the unlearned model is exported to an HF folder and reloaded in transformers with a logits check.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from npo_jax.errors import NpoJaxError
from npo_jax.fs import check_output_path
from npo_jax.run_config import LoraConfig, OptimConfig


@dataclass
class DemoData:
    n_authors: int = 60
    seed: int = 0
    vocab_size: int = 1024


@dataclass
class DemoModel:
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    seed: int = 0


@dataclass
class DemoConfig:
    data: DemoData = field(default_factory=DemoData)
    model: DemoModel = field(default_factory=DemoModel)
    # the optimizer of each training stage (every field of a run config's `optim`)
    finetune: OptimConfig = field(default_factory=lambda: OptimConfig(lr=4e-3, epochs=40, effective_batch=32,
                                                                      per_device_batch=32))
    unlearn: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, epochs=5, effective_batch=1,
                                                                     per_device_batch=1))
    alpha: float = 2.0
    beta: float = 0.1
    max_length: int = 80
    length_buckets: list[int] = field(default_factory=lambda: [64, 80])
    max_new_tokens: int = 48
    eval_batch_size: int = 32
    # LoRA for the unlearning stage (the run config's `lora` section; rank 0: the whole model trained)
    lora: LoraConfig = field(default_factory=LoraConfig)


# the default config, found from this file wherever the command runs (a wheel install has no
# configs/: then DemoConfig's defaults, which are the same values; tests/test_configs.py checks)
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def load_demo_config(path: str | Path | None, overrides=()) -> DemoConfig:
    """DemoConfig <- the YAML file (default: DEFAULT_CONFIG) <- dotted overrides; a given file that
    does not exist is an error."""
    layers = [OmegaConf.structured(DemoConfig)]
    if path is not None and not Path(path).is_file():
        raise NpoJaxError(f"{path}: demo config not found")
    path = path if path is not None else (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    if path is not None:
        layers.append(OmegaConf.load(path))
    layers.append(OmegaConf.from_dotlist(list(overrides)))
    try:
        return OmegaConf.to_object(OmegaConf.merge(*layers))
    except Exception as e:  # omegaconf's key/type errors
        raise NpoJaxError(f"demo config: {str(e).splitlines()[0]}") from None


def _init_model(out: Path, cfg: DemoConfig, tokenizer_dir: Path, vocab: int, eos_id: int, bos_id: int) -> Path:
    """A random tiny Llama saved as an Orbax params checkpoint with config and tokenizer."""
    from flax import nnx

    from npo_jax.checkpoint import save_params_checkpoint
    from npo_jax.config import LlamaConfig
    from npo_jax.model import LlamaForCausalLM, split_params
    from npo_jax.tree_paths import iter_paths

    m = cfg.model
    raw = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
           "hidden_size": m.hidden_size, "intermediate_size": m.intermediate_size,
           "num_hidden_layers": m.num_hidden_layers, "num_attention_heads": m.num_attention_heads,
           "num_key_value_heads": m.num_key_value_heads, "head_dim": m.hidden_size // m.num_attention_heads,
           "hidden_act": "silu", "max_position_embeddings": 1024, "rms_norm_eps": 1e-5,
           "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": True, "attention_bias": False,
           "mlp_bias": False, "bos_token_id": bos_id, "eos_token_id": eos_id, "torch_dtype": "float32"}
    llama = LlamaForCausalLM(LlamaConfig.from_hf_dict(raw), rngs=nnx.Rngs(m.seed))
    _, params = split_params(llama)
    src = out / "init_src"
    src.mkdir(parents=True, exist_ok=True)
    (src / "config.json").write_text(json.dumps(raw, indent=2))
    for f in tokenizer_dir.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    dst = out / "init"
    dst.mkdir()
    save_params_checkpoint(dst, ((p, np.asarray(a)) for p, a in iter_paths(params)), src, "float32")
    return dst


def _run_config(model_path, out_dir, data_dir, cache, stage: OptimConfig, cfg: DemoConfig, **extra):
    from npo_jax.run_config import load_run_config

    overrides = [f"model.path={model_path}", f"output_dir={out_dir}", f"data.dir={data_dir}", f"cache_dir={cache}",
                 f"data.max_length={cfg.max_length}", f"data.length_buckets={list(cfg.length_buckets)}",
                 *[f"optim.{k}={v}" for k, v in dataclasses.asdict(stage).items()], "parallel.data=1",
                 *[f"{k}={v}" for k, v in extra.items()]]
    return load_run_config(None, overrides)


def _check(cfg: DemoConfig) -> None:
    """Every value in range before anything is written (the run configs' own checks, and the
    number of authors the synthetic data has names for)."""
    from npo_jax.synthetic import FIRST_NAMES, SURNAMES

    most = min(len(FIRST_NAMES), len(SURNAMES)) * 10 // 11
    if not 10 <= cfg.data.n_authors <= most:
        raise NpoJaxError(f"demo config: data.n_authors={cfg.data.n_authors} is out of range: it must be 10 to {most}")
    for stage in (cfg.finetune, cfg.unlearn):
        _run_config(".", ".", ".", ".", stage, cfg, **{"method.alpha": cfg.alpha, "method.beta": cfg.beta},
                    **_lora_overrides(cfg))


def _lora_overrides(cfg: DemoConfig) -> dict:
    """The unlearning run's `lora` section as dotted overrides (none without LoRA)."""
    if not cfg.lora.rank:
        return {}
    return {f"lora.{k}": (f"[{','.join(v)}]" if isinstance(v, list) else v)
            for k, v in dataclasses.asdict(cfg.lora).items() if v is not None}


def _train(mode: str, model_path, out_dir, data_dir, cache, stage: OptimConfig, cfg: DemoConfig, **extra):
    from npo_jax.train import Trainer

    trainer = Trainer(_run_config(model_path, out_dir, data_dir, cache, stage, cfg, **extra), mode, overwrite=True)
    trainer.train()
    return Path(out_dir)


def run_demo(out: str | Path, config: str | Path | None = None, overrides=()) -> dict:
    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)  # Orbax's info/warnings would drown the demo's own output
    cfg = load_demo_config(config, overrides)
    _check(cfg)
    out = check_output_path(out)
    if out.exists() and any(out.iterdir()):
        raise NpoJaxError(f"{out}: output folder exists; choose a new one")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    print("[1/6] synthetic TOFU data and demo tokenizer")
    data, tok_dir, init = _prepare(out, cfg)
    runs = _train_models(out, cfg, data, init)
    print("[5/6] TOFU evaluation of base, retain and unlearned models")
    summaries = _evaluate(out, cfg, data, tok_dir, runs)
    print("[6/6] export check: the HF folder in transformers vs our params")
    unlearned = runs["unlearned"]
    max_rel = _export_check(unlearned)
    elapsed = time.perf_counter() - start
    result = {**summaries, "elapsed_s": elapsed, "hf_export": str(unlearned / "hf"),
              "export_logits_max_rel_diff": max_rel, "config": dataclasses.asdict(cfg),
              "checks": _checks(summaries)}
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    _print_result(result, out)
    return result


def _prepare(out: Path, cfg: DemoConfig) -> tuple[Path, Path, Path]:
    """Synthetic TOFU data, a tokenizer built on it, and a random tiny model: (data, tokenizer, init)."""
    from npo_jax.data.tokenize import load_tokenizer
    from npo_jax.demo_tokenizer import build_demo_tokenizer
    from npo_jax.synthetic import make_synthetic_tofu

    data = make_synthetic_tofu(out / "data", cfg.data.n_authors, cfg.data.seed)
    # questions and answers as separate texts: an answer starts a segment (no leading space) as in the chat
    texts = [t for r in map(json.loads, (data / "full.jsonl").read_text().splitlines())
             for t in (r["question"], r["answer"])]
    tok_dir = build_demo_tokenizer(texts, out / "tokenizer", cfg.data.vocab_size)
    tok = load_tokenizer(tok_dir)
    return data, tok_dir, _init_model(out, cfg, tok_dir, len(tok), tok.eos_token_id, tok.bos_token_id)


def _train_models(out: Path, cfg: DemoConfig, data: Path, init: Path) -> dict[str, Path]:
    """The base (fine-tuned on full), the retain reference (on retain90) and the unlearned runs' folders."""
    cache = out / "cache"
    # models trained from scratch use the padding-only mask and record it: the unlearning run and
    # the evaluation read it from the base's and each run's checkpoints
    scratch = {"checkpoint.export_hf": "false", "data.eot_mask_quirk": "false"}
    print("[2/6] fine-tune on full -> base model")
    base = _train("finetune", init, out / "base", data, cache, cfg.finetune, cfg,
                  **{"data.finetune_split": "full", **scratch})
    print("[3/6] fine-tune on retain90 -> retain reference")
    retain = _train("finetune", init, out / "retain", data, cache, cfg.finetune, cfg,
                    **{"data.finetune_split": "retain90", **scratch})
    print("[4/6] unlearn the base model with NPO on forget10 / retain90")
    unlearned = _train("unlearn", base / "checkpoints", out / "unlearned", data, cache, cfg.unlearn, cfg,
                       **{"method.name": "NPO", "method.alpha": cfg.alpha, "method.beta": cfg.beta,
                          "checkpoint.export_hf": "true", "checkpoint.export_dtype": "float32",
                          **_lora_overrides(cfg)})
    return {"base": base, "retain": retain, "unlearned": unlearned}


def _evaluate(out: Path, cfg: DemoConfig, data: Path, tok_dir: Path, runs: dict[str, Path]) -> dict[str, dict]:
    """The TOFU suite on each run (the retain model first: forget quality compares with it), logs
    and truth-ratio plot written under `out`; returns each run's summary (base, retain, unlearned)."""
    from npo_jax.eval.aggregate import summary
    from npo_jax.eval.cli import load_scorer
    from npo_jax.eval.report import plot_truth_ratios
    from npo_jax.eval.suite import Suite, write_outputs

    logs = {}
    for name in ("retain", "base", "unlearned"):
        scorer = load_scorer(runs[name] / "checkpoints", tok_dir, batch_size=cfg.eval_batch_size,
                             max_new_tokens=cfg.max_new_tokens)
        suite = Suite(scorer, data_dir=data, tfds_dir=out / "cache" / "tfds", holdout_split="holdout10")
        logs[name] = suite.run(logs.get("retain"))
        write_outputs(out / "eval" / name, logs[name])
    plot_truth_ratios(out / "truth_ratios.png", {"unlearned": logs["unlearned"], "retain": logs["retain"],
                                                 "base": logs["base"]})
    return {name: summary(logs[name]) for name in ("base", "retain", "unlearned")}


def _print_result(result: dict, out: Path) -> None:
    from npo_jax.eval.report import format_table

    keys = ("forget_quality", "model_utility", "forget_Q_A_Prob", "forget_Q_A_ROUGE", "retain_Q_A_Prob",
            "retain_Q_A_ROUGE", "forget_truth_ratio", "privleak")
    print()
    print(format_table({k: result[k] for k in ("base", "retain", "unlearned")}, keys))
    print()
    for text, ok in result["checks"].items():
        print(f"  [{'ok' if ok else 'FAILED'}] {text}")
    print(f"\nexported HF model: {result['hf_export']} (transformers logits within "
          f"{result['export_logits_max_rel_diff']:.1e} of ours)")
    print(f"demo finished in {result['elapsed_s']:.0f} s; summary: {out / 'summary.json'}")


def _checks(s: dict) -> dict:
    b, u = s["base"], s["unlearned"]
    return {
        f"forget_Q_A_Prob {u['forget_Q_A_Prob']:.4f} <= 1/5 of base {b['forget_Q_A_Prob']:.4f}":
            u["forget_Q_A_Prob"] <= b["forget_Q_A_Prob"] / 5,
        f"retain_Q_A_Prob {u['retain_Q_A_Prob']:.4f} >= 0.8 x base {b['retain_Q_A_Prob']:.4f}":
            u["retain_Q_A_Prob"] >= 0.8 * b["retain_Q_A_Prob"],
        f"forget_quality {u['forget_quality']:.3g} > base {b['forget_quality']:.3g}":
            u["forget_quality"] > b["forget_quality"],
    }


def _export_check(run: Path) -> float:
    import torch
    import transformers

    from npo_jax.model import abstract_model, merge_params, split_params
    from npo_jax.model_io import load_model

    hf = transformers.LlamaForCausalLM.from_pretrained(run / "hf", dtype=torch.float32).eval()
    loaded = load_model(run / "checkpoints")  # a LoRA run: its base with the adapters merged in
    graphdef, _ = split_params(abstract_model(loaded.config))
    ids = np.arange(1, 25)[None] % loaded.config.vocab_size
    ours = np.asarray(merge_params(graphdef, loaded.params)(ids))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    rel = float(np.abs(ours - ref).max() / np.abs(ref).max())
    if rel > 1e-4:
        raise NpoJaxError(f"export check: transformers logits differ from ours by {rel:.2e} (relative)")
    return rel
