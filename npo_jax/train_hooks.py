"""What the training loop does with each step's record, as small hooks (as Levanter's trainer does).

After every step the loop calls each hook with the step's record ({"step", "epoch", "loss", ...,
"tokens_per_s"}); a hook writes it somewhere or acts on it, and `close()` runs when the loop
ends, however it ends. The metrics file, TensorBoard and the progress bar run on the primary
host only; the periodic save and the stop-on-signal check run on every host (both are
collective). `StopSignals` turns SIGTERM/SIGINT into a flag the stop hook reads between steps.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from npo_jax import distributed
from npo_jax.fs import atomic_write_text


class Hook:
    """Called with each step's record; closed when the loop ends."""

    def __call__(self, record: dict) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _drop_metrics_after(path: Path, step: int) -> None:
    """On resume, forget the records of steps after the restored checkpoint: they are run again.

    A last line without its newline is a record torn by a kill; it goes too.
    """
    if not path.is_file():
        return
    text = path.read_text()
    lines = [line for line in text.splitlines(keepends=True) if line.strip()]
    kept = [line for line in lines if line.endswith("\n") and json.loads(line)["step"] <= step]
    if len(kept) < len(lines):
        atomic_write_text(path, "".join(kept))


class MetricsFile(Hook):
    """`metrics.jsonl`: one JSON line per step, flushed; records past `start_step` are dropped first."""

    def __init__(self, path: Path, start_step: int):
        _drop_metrics_after(path, start_step)
        self.file = open(path, "a")

    def __call__(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoard(Hook):
    """Every value of the record but the step, as the scalar `train/KEY`."""

    def __init__(self, folder: Path):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(folder))

    def __call__(self, record: dict) -> None:
        for k, v in record.items():
            if k != "step":
                self.writer.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        self.writer.close()


class ProgressBar(Hook):
    """A tqdm bar of the steps, showing the latest loss terms, learning rate and speed."""

    POSTFIX = ("loss", "forget_loss", "retain_loss", "lr", "tokens_per_s")

    def __init__(self, total: int, initial: int, desc: str):
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step")

    def __call__(self, record: dict) -> None:
        self.bar.set_postfix({k: f"{record[k]:.4g}" for k in self.POSTFIX if k in record})
        self.bar.update()

    def close(self) -> None:
        self.bar.close()


class PeriodicSave(Hook):
    """`save(step)` every `every` steps (0: never) before the last; the loop saves the last itself."""

    def __init__(self, every: int, total_steps: int, save: Callable[[int], None]):
        self.every, self.total_steps, self.save = every, total_steps, save

    def __call__(self, record: dict) -> None:
        step = record["step"]
        if self.every and step % self.every == 0 and step < self.total_steps:
            self.save(step)


class StopSignals:
    """While active, SIGTERM and SIGINT only set a flag that the loop reads between steps.

    The first signal puts the previous handlers back, so a second one acts as before (terminate,
    KeyboardInterrupt) if the user does not want to wait for the checkpoint.
    """

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame):
        self.received = signum
        self._restore()

    def _restore(self):
        for s, handler in self._previous.items():  # None: a handler set outside Python, not restorable
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def __exit__(self, *exc):
        self._restore()

    def requested(self) -> bool:
        """Whether any host got a signal (a collective on several hosts: all stop at the same step)."""
        return distributed.any_process(self.received is not None)


class StopOnSignal(Hook):
    """After each step but the last, `stop(step, signum)` if any host got a stop signal (signum
    None: another host got it); `stop` saves the step and raises `Preempted`."""

    def __init__(self, signals: StopSignals, total_steps: int, stop: Callable[[int, int | None], None]):
        self.signals, self.total_steps, self.stop = signals, total_steps, stop

    def __call__(self, record: dict) -> None:
        if self.signals.requested() and record["step"] < self.total_steps:
            self.stop(record["step"], self.signals.received)
