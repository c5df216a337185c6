"""A real `npo-jax` process for tests/test_faults.py to signal, kill or run several of.

    python tests/fault_worker.py ARGS...                  npo_jax.cli.main(ARGS); its exit code
    python tests/fault_worker.py --export-loop A B DST    export checkpoint A, B, A, ... into DST
                                                           (overwriting) until killed

torch is hidden from it: npo-jax does not use it (only the tests' parity checks do), and
transformers would import it for the tokenizer, seconds per process that the kill loops pay.

Test hooks, read from the environment (the trainer itself is unchanged):
    FAULT_STEP_SLEEP  seconds to wait before each training step, so that a signal lands mid-run
    FAULT_FED_LOG     file to append {"process", "step", "forget_index"} to for every step batch
                      this process builds (which examples this host fed)
"""

import json
import os
import sys
import time


def _hook_step_batches() -> None:
    from npo_jax import train

    sleep = float(os.environ.get("FAULT_STEP_SLEEP", "0"))
    log = os.environ.get("FAULT_FED_LOG")
    original = train.step_batch

    def step_batch(plan, step, *args, **kwargs):
        batch = original(plan, step, *args, **kwargs)
        if log:
            import jax

            with open(log, "a") as f:
                f.write(json.dumps({"process": jax.process_index(), "step": step,
                                    "forget_index": batch["forget_index"].tolist()}) + "\n")
        time.sleep(sleep)
        return batch

    train.step_batch = step_batch


def _export_loop(a: str, b: str, dst: str) -> None:
    from convert.orbax_to_hf import orbax_to_hf

    for i in range(10**9):
        orbax_to_hf(a if i % 2 == 0 else b, dst, overwrite=True, progress=False)
        print(f"exported {i}", flush=True)


if __name__ == "__main__":
    sys.modules["torch"] = None  # importlib.util.find_spec("torch") is None: transformers goes without it
    if sys.argv[1] == "--export-loop":
        _export_loop(*sys.argv[2:5])
    else:
        from npo_jax.cli import main

        _hook_step_batches()
        sys.exit(main(sys.argv[1:]))
