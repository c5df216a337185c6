"""`npo-jax parity MODEL`: does our JAX code agree with transformers on these weights?

Application layer (it runs the converters). MODEL is an HF folder, an npo-jax params or training
checkpoint, or a training run folder (its `checkpoints/` and `config.yaml`). The parts, each timed:
1. round trip: HF -> Orbax -> HF (an HF MODEL) or Orbax -> HF -> Orbax (a checkpoint), in the stored
   dtype, in a temporary folder: bit-identical tensor by tensor, and the same model config;
2. JAX on the Orbax checkpoint (the converted one for an HF MODEL): logits, greedy generation,
   the training objective and the evaluator's per-item values on N TOFU items, kept (logits on
   disk), then freed;
3. transformers (float32) on the HF folder (the export for a checkpoint): the same quantities,
   each compared with ours within the parity tests' tolerances (`npo_jax.parity.checks`).
Only one framework's model is in memory at a time. Writes parity.json and parity.txt (the
table); exit code 0 when every check passes, 1 when one fails (2: bad input).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from convert import hf_to_orbax, orbax_to_hf
from npo_jax.checkpoint import TOKENIZER_FILES, ParamsReader
from npo_jax.config import LlamaConfig
from npo_jax.data.tokenize import ChatFormat, load_tokenizer
from npo_jax.errors import NpoJaxError
from npo_jax.fs import atomic_output_dir, cache_dir
from npo_jax.mask_convention import describe, recorded_mask, resolve_eot_mask
from npo_jax.model_io import is_hf_folder
from npo_jax.params import IGNORED_HF_SUFFIXES
from npo_jax.parity.checks import Check, Timings, format_table, peak_rss_gib
from npo_jax.parity.inputs import Settings, build_items
from npo_jax.safetensors_io import HFWeights

PARITY_METHODS = ("NPO", "SimNPO", "GradAscent", "GradDiff")  # the methods the torch objective implements

TAG_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


@dataclasses.dataclass
class Source:
    path: Path  # the HF folder or the checkpoint folder
    kind: str  # "hf" | "checkpoint"
    run: Path | None = None  # the training run folder MODEL named, if any


def require_torch() -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise NpoJaxError("parity: transformers' model is the reference and needs PyTorch, which is not "
                          "installed: pip install 'npo-jax[parity]'") from None


def resolve_model(path: Path) -> Source:
    if not path.is_dir():
        raise NpoJaxError(f"{path}: no such folder (MODEL: an HF folder, an npo-jax checkpoint or a training run)")
    if (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():
        return Source(path / "checkpoints", "checkpoint", run=path)
    if is_hf_folder(path):
        return Source(path, "hf")
    if (path / "config.json").is_file():
        return Source(path, "checkpoint")
    raise NpoJaxError(f"{path}: not an HF model folder (config.json + safetensors), an npo-jax checkpoint or a "
                      f"training run folder (config.yaml + checkpoints/)")


def load_settings(source: Source, args) -> tuple[Settings, object, list[str]]:
    """Settings from --config (or the run's config.yaml), else the seed's NPO recipe and RunConfig's
    defaults; the mask from --eot-mask-quirk, the config, the model's record or open-unlearning's
    (`mask_convention.resolve_eot_mask`); notes say which."""
    from npo_jax.run_config import RunConfig, load_run_config

    config = args.config or (source.run / "config.yaml" if source.run else None)
    kw = dict(items=args.items, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    for name, value in kw.items():
        if value < 1:
            raise NpoJaxError(f"--{name.replace('_', '-')} must be at least 1 (got {value})")
    cfg = RunConfig(output_dir="-") if config is None else load_run_config(
        config, [], output_dir="-", model={"path": str(source.path)})
    explicit = args.eot_mask_quirk if args.eot_mask_quirk is not None else cfg.data.eot_mask_quirk
    quirk = resolve_eot_mask(explicit, source.path, say=None)
    origin = ("--eot-mask-quirk" if args.eot_mask_quirk is not None else "the config" if explicit is not None
              else "the model's record" if recorded_mask(source.path) is not None
              else "no record: open-unlearning's")
    mask_note = f"mask: {describe(quirk)}, from {origin}"
    if config is None:
        s = Settings(**kw, eot_mask_quirk=quirk, max_length=cfg.data.max_length)
        return s, cfg, [f"no --config: the seed's NPO recipe (beta {s.beta:g}, alpha {s.alpha:g}, gamma {s.gamma:g}, "
                        f"NLL retain)", mask_note]
    d, m = cfg.data, cfg.method
    if m.name not in PARITY_METHODS:
        raise NpoJaxError(f"parity: {config}: method.name={m.name} has no objective check yet (the check covers "
                          f"{', '.join(PARITY_METHODS)})")
    s = Settings(**kw, fmt=ChatFormat(d.system_prompt, d.date_string), eot_mask_quirk=quirk,
                 max_length=d.max_length, method=m.name, beta=m.beta, alpha=m.alpha, gamma=m.gamma, delta=m.delta,
                 retain_loss=m.retain_loss, reference=m.reference)
    return s, cfg, [f"settings from {config}: method {m.name}", mask_note]


def load_rows(cfg, args, n: int) -> tuple[list, list, list]:
    from npo_jax.data.tofu import load_split

    data_dir = args.data_dir or cfg.data.dir
    tfds_dir = args.tfds_dir or cfg.data.tfds_dir or str(cache_dir(cfg.cache_dir) / "tfds")

    def first(name):
        split = load_split(name, data_dir, tfds_dir)
        return [split[i] for i in range(min(n, len(split)))]

    return (first(f"{cfg.data.forget_split}_perturbed"), first(cfg.data.forget_split),
            first(cfg.data.retain_split))


def _same_bytes(x: np.ndarray, y: np.ndarray, chunk: int = 1 << 26) -> bool:
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    a, b = x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8)
    return all(np.array_equal(a[i:i + chunk], b[i:i + chunk]) for i in range(0, a.size, chunk))


def _tensor_check(what: str, dtype: str, differ: list[str], total: int) -> Check:
    detail = f"differ: {', '.join(differ[:5])}{' ...' if len(differ) > 5 else ''}" if differ else ""
    return Check(f"round trip: tensors ({what}, {dtype})", "round trip", f"{total - len(differ)}/{total} identical",
                 f"{total} tensors", len(differ), 0, "bit-identical", detail)


def compare_hf(src: Path, back: Path, what: str, dtype: str) -> Check:
    a, b = HFWeights(src), HFWeights(back)
    names = sorted(n for n in a.names() | b.names() if not n.endswith(IGNORED_HF_SUFFIXES))
    differ = [n for n in names if n not in a.location or n not in b.location or not _same_bytes(a.read(n), b.read(n))]
    return _tensor_check(what, dtype, differ, len(names))


def compare_orbax(src: Path, back: Path, what: str, dtype: str) -> Check:
    a, b = ParamsReader(src), ParamsReader(back)
    paths = sorted(set(a.metadata) | set(b.metadata))
    differ = ["/".join(p) for p in paths
              if p not in a.metadata or p not in b.metadata or not _same_bytes(a.read(p), b.read(p))]
    return _tensor_check(what, dtype, differ, len(paths))


def config_check(src: LlamaConfig, back: LlamaConfig, what: str) -> Check:
    ours, ref = dataclasses.asdict(back), dataclasses.asdict(src)
    differ = [f"{k}: {ours.get(k)!r} vs {ref.get(k)!r}" for k in sorted(ref.keys() | ours.keys())
              if k != "dtype" and ours.get(k) != ref.get(k)]
    return Check(f"round trip: model config ({what})", "round trip", f"{len(ours) - len(differ)}/{len(ours)} fields",
                 f"{len(ref)} fields", len(differ), 0, "equal", "; ".join(differ))


def _hf_dtype(folder: Path) -> str:
    weights = HFWeights(folder)
    tags = collections.Counter(weights.info(n)[0] for n in weights.names())
    tag = tags.most_common(1)[0][0]
    if tag not in TAG_DTYPES:
        raise NpoJaxError(f"{folder}: weights in {tag}; the round trip supports {', '.join(TAG_DTYPES.values())}")
    return TAG_DTYPES[tag]


def round_trip(source: Source, work: Path, tokenizer_from: Path | None) -> tuple[list[Check], Path, Path, str]:
    """The conversion round trip in the stored dtype; (checks, folder JAX loads, folder
    transformers loads, the dtype)."""
    if source.kind == "hf":
        dtype = _hf_dtype(source.path)
        ckpt = hf_to_orbax(source.path, work / "orbax", dtype=dtype, progress=False)
        back = orbax_to_hf(ckpt, work / "hf_back", dtype=dtype, progress=False)
        checks = [compare_hf(source.path, back, "HF -> Orbax -> HF", dtype),
                  config_check(LlamaConfig.from_folder(source.path), ParamsReader(ckpt).config, "HF -> Orbax")]
        shutil.rmtree(back)
        return checks, ckpt, source.path, dtype
    reader = ParamsReader(source.path)
    dtype = str(reader.dtype(next(iter(reader.metadata))))
    dtype = dtype if dtype in TAG_DTYPES.values() else "float32"
    hf = orbax_to_hf(source.path, work / "hf", dtype=dtype, tokenizer_from=tokenizer_from, progress=False)
    back = hf_to_orbax(hf, work / "orbax_back", dtype=dtype, progress=False)
    checks = [compare_orbax(source.path, back, "Orbax -> HF -> Orbax", dtype),
              config_check(reader.config, LlamaConfig.from_folder(hf), "Orbax -> HF")]
    shutil.rmtree(back)
    return checks, source.path, hf, dtype


def _tokenizer_dir(source: Source, cfg) -> tuple[Path, Path | None]:
    """Where the tokenizer is: the model folder, else the config's model.tokenizer (also copied
    into the export)."""
    if any((source.path / f).is_file() for f in TOKENIZER_FILES) or not cfg.model.tokenizer:
        return source.path, None
    return Path(cfg.model.tokenizer), Path(cfg.model.tokenizer)


def run_parity(args) -> int:
    require_torch()
    source = resolve_model(Path(args.model))
    settings, cfg, notes = load_settings(source, args)
    tok_dir, tokenizer_from = _tokenizer_dir(source, cfg)
    tokenizer = load_tokenizer(tok_dir)
    items = build_items(tokenizer, settings, *load_rows(cfg, args, settings.items))
    out = Path(args.out) if args.out else (source.run / "parity" if source.run else Path("parity"))
    timings = Timings()
    with tempfile.TemporaryDirectory(prefix="npo_jax_parity_", dir=args.tmp_dir) as tmp:
        work = Path(tmp)
        with timings.part("round trip"):
            checks, jax_dir, hf_dir, dtype = round_trip(source, work, tokenizer_from)
        checks += compare_frameworks(jax_dir, hf_dir, tokenizer, items, settings, work, timings)
    report = {"model": str(args.model), "kind": source.kind, "stored_dtype": dtype,
              "jax_loads": "the converted Orbax checkpoint" if source.kind == "hf" else str(jax_dir),
              "transformers_loads": str(hf_dir) if source.kind == "hf" else "the exported HF folder",
              "settings": dataclasses.asdict(settings), "notes": notes,
              "checks": [c.as_json() for c in checks], "seconds": timings.seconds,
              "peak_rss_gib": timings.peak_rss_gib, "rss_gib": timings.rss_gib,
              "peak_rss_gib_total": round(peak_rss_gib(), 3),
              "passed": all(c.passed for c in checks)}
    table = format_table(checks, timings)
    with atomic_output_dir(out, overwrite=True) as tmp_out:
        (tmp_out / "parity.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp_out / "parity.txt").write_text(table + "\n")
    for note in notes:
        print(f"parity: {note}")
    print(table)
    print(f"wrote {out / 'parity.json'}")
    return 0 if report["passed"] else 1


def compare_frameworks(jax_dir: Path, hf_dir: Path, tokenizer, items, settings: Settings, work: Path,
                       timings: Timings) -> list[Check]:
    """JAX first (its outputs kept, its model freed), then transformers."""
    from npo_jax.parity.jax_side import run_jax
    from npo_jax.parity.torch_side import run_torch

    ours = run_jax(jax_dir, tokenizer, items, settings, work, timings)
    return run_torch(hf_dir, tokenizer, items, settings, ours, timings)
