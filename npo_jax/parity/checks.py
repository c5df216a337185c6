"""The parity checks' tolerances, results, comparisons and report (numpy only: neither jax nor torch).

The tolerances are the ones the parity tests hold the code to (docs: DESIGN.md "Parity tests and
tolerances"): float32 logits within 1e-4 of the logits' scale (tests/test_model_parity.py),
bfloat16 compute against the float32 reference with 99% argmax agreement and a mean KL of at
most 1e-3 (same file), losses and gradients to a relative 1e-4 (tests/test_losses.py), per-item
probabilities and truth ratios to a relative 1e-4 (tests/test_eval_parity.py), greedy generations
token for token (tests/test_generate.py, test_eval_parity.py) and so ROUGE exactly, and the
conversion round trip bit for bit (tests/test_convert.py). The gradient norm, which no test
compares as such, has a tolerance of its own (GRAD_NORM_RTOL, below).
"""

from __future__ import annotations

import dataclasses
import resource
import sys
import time
from contextlib import contextmanager

import numpy as np

LOGITS_REL = 1e-4  # max |ours - ref| / max |ref|, float32
BF16_MIN_ARGMAX = 0.99  # argmax agreement of bfloat16 compute with the float32 reference
BF16_MAX_KL = 1e-3  # mean KL(reference || bfloat16 compute) per position, nats
LOSS_RTOL = 1e-4  # loss and its parts
# The gradient norm: the tests compare gradients element-wise (rtol 1e-4 plus 1e-6 of each
# tensor's largest entry), which one norm cannot mirror. Near an optimum the gradient is a small
# difference of float32 terms and the float32 reference itself is off: on the demo's fine-tuned
# model (retain loss 0.0036) transformers' float32 norm was 2.0e-4 from its float64 value, ours
# 2e-7. So 1e-3 relative.
GRAD_NORM_RTOL = 1e-3
EVAL_RTOL = 1e-4  # per-item probability and truth ratio


@dataclasses.dataclass
class Check:
    name: str
    part: str  # round trip | logits | generation | objective | evaluation
    ours: object
    reference: object
    difference: float
    tolerance: float  # passes when difference <= tolerance
    tolerance_text: str
    detail: str = ""  # what failed first (a tensor, an item)

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.difference)) and self.difference <= self.tolerance

    def as_json(self) -> dict:
        return {**dataclasses.asdict(self), "ours": _plain(self.ours), "reference": _plain(self.reference),
                "difference": float(self.difference), "passed": self.passed}


def _plain(value):
    return float(value) if isinstance(value, np.floating | float) else value


def relative_difference(ours: float, ref: float) -> float:
    return abs(ours - ref) / max(abs(ref), 1e-30)


def max_relative(ours, ref) -> tuple[float, int]:
    """The largest |ours - ref| / |ref| over items, and the item it is at."""
    ours, ref = np.atleast_1d(np.asarray(ours, np.float64)), np.atleast_1d(np.asarray(ref, np.float64))
    rel = np.abs(ours - ref) / np.maximum(np.abs(ref), 1e-30)
    i = int(np.argmax(rel)) if rel.size else 0
    return (float(rel[i]) if rel.size else 0.0), i


class LogitsAgreement:
    """Running max |ours - ref| and max |ref| (float32 check), chunk by chunk."""

    def __init__(self):
        self.err, self.scale, self.ours_scale = 0.0, 0.0, 0.0

    def add(self, ours: np.ndarray, ref: np.ndarray) -> None:
        self.err = max(self.err, float(np.abs(ours - ref).max()))
        self.scale = max(self.scale, float(np.abs(ref).max()))
        self.ours_scale = max(self.ours_scale, float(np.abs(ours).max()))

    def check(self, name: str) -> Check:
        rel = self.err / max(self.scale, 1e-30)
        return Check(name, "logits", f"max|logit| {self.ours_scale:.4g}", f"max|logit| {self.scale:.4g}", rel,
                     LOGITS_REL, f"max|diff| <= {LOGITS_REL:g} x scale")


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


class Bf16Agreement:
    """Argmax agreement and mean KL(reference || ours) over positions, chunk by chunk."""

    def __init__(self):
        self.agree, self.kl, self.n = 0, 0.0, 0

    def add(self, ours: np.ndarray, ref: np.ndarray) -> None:
        self.agree += int((ours.argmax(-1) == ref.argmax(-1)).sum())
        lp_ref, lp = _log_softmax(ref), _log_softmax(ours)
        self.kl += float((np.exp(lp_ref) * (lp_ref - lp)).sum())
        self.n += ref.shape[0]

    def checks(self) -> list[Check]:
        agree = self.agree / max(self.n, 1)
        kl = self.kl / max(self.n, 1)
        return [Check("logits bf16: argmax agreement", "logits", f"{agree:.4f}", "1 (float32)", 1 - agree,
                      1 - BF16_MIN_ARGMAX, f"agreement >= {BF16_MIN_ARGMAX:g}",
                      f"{self.agree} of {self.n} answer positions agree (near-tied predictions flip under bf16 "
                      f"rounding: an unlearned model's forget answers, random weights)"),
                Check("logits bf16: mean KL", "logits", f"{kl:.3g}", "0 (float32)", kl, BF16_MAX_KL,
                      f"KL <= {BF16_MAX_KL:g} nats")]


def exact_sequences(name: str, part: str, ours: list, ref: list, what: str = "sequences") -> Check:
    """Token (or text) sequences identical one for one; the difference is how many differ."""
    differ = [i for i, (a, b) in enumerate(zip(ours, ref, strict=True)) if not np.array_equal(a, b)]
    detail = ""
    if differ:
        i = differ[0]
        a, b = np.asarray(ours[i]).tolist(), np.asarray(ref[i]).tolist()
        detail = f"item {i}: ours {a[:12]}..., reference {b[:12]}..."
    same = len(ours) - len(differ)
    return Check(name, part, f"{same}/{len(ours)} identical", f"{len(ref)} {what}", len(differ), 0,
                 "identical", detail)


def close_values(name: str, part: str, ours, ref, rtol: float, item_name: str = "item") -> Check:
    """Per-item values equal to a relative `rtol`; shows the means, the worst item in `detail`."""
    rel, i = max_relative(ours, ref)
    ours_a, ref_a = np.atleast_1d(np.asarray(ours, np.float64)), np.atleast_1d(np.asarray(ref, np.float64))
    detail = f"worst {item_name} {i}: {ours_a[i]:.8g} vs {ref_a[i]:.8g}" if ours_a.size > 1 else ""
    return Check(name, part, float(ours_a.mean()), float(ref_a.mean()), rel, rtol, f"relative <= {rtol:g}", detail)


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (GiB)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / (1024 ** 3 if sys.platform == "darwin" else 1024 ** 2)


def rss_gib() -> float:
    """This process's resident memory now (GiB; Linux, else the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 1024 ** 3
    except OSError:
        return peak_rss_gib()


class Timings:
    """Wall time, peak RSS (so far) and RSS at the end of each named part, printed as they finish."""

    def __init__(self, quiet: bool = False):
        self.seconds: dict[str, float] = {}
        self.peak_rss_gib: dict[str, float] = {}
        self.rss_gib: dict[str, float] = {}
        self.quiet = quiet

    @contextmanager
    def part(self, name: str):
        t0 = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t0, 2)
        self.peak_rss_gib[name] = round(peak_rss_gib(), 3)
        self.rss_gib[name] = round(rss_gib(), 3)
        if not self.quiet:
            print(f"parity: {name}: {self.seconds[name]:.1f} s (peak RSS {self.peak_rss_gib[name]:.2f} GiB, "
                  f"now {self.rss_gib[name]:.2f})", file=sys.stderr, flush=True)


def _cell(value) -> str:
    if isinstance(value, float | np.floating):
        return f"{value:.6g}"
    return str(value)


def format_table(checks: list[Check], timings: Timings | None = None) -> str:
    rows = [("check", "ours", "reference", "difference", "tolerance", "result")]
    rows += [(c.name, _cell(c.ours), _cell(c.reference), f"{c.difference:.3g}", c.tolerance_text,
              "PASS" if c.passed else "FAIL") for c in checks]
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for c in checks:
        if not c.passed and c.detail:
            lines.append(f"  {c.name}: {c.detail}")
    if timings is not None:
        lines.append("")
        lines.append("part                        seconds  peak RSS so far (GiB)  RSS after (GiB)")
        for name, s in timings.seconds.items():
            lines.append(f"{name:<26} {s:9.1f}  {timings.peak_rss_gib[name]:21.2f}  {timings.rss_gib[name]:15.2f}")
    failed = [c.name for c in checks if not c.passed]
    lines.append("")
    lines.append(f"parity: {'FAIL: ' + ', '.join(failed) if failed else 'all ' + str(len(checks)) + ' checks pass'}")
    return "\n".join(lines)
