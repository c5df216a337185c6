"""Faults injected into real runs (docs/reliability.md): preemption signals, SIGKILL during
checkpoint saves and HF export, damaged files, restarts on other topologies, NaN/inf steps, a
full disk, and two real processes joined by jax.distributed.

Subprocesses run tests/fault_worker.py (the `npo-jax` CLI with test hooks) and share a persistent
compilation cache with this process, so each costs its imports, not a compile.
"""

import json
import logging
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.experimental.compilation_cache import compilation_cache
from tofu_fixture import make_mini_tofu, make_tiny_model_with_tokenizer

import npo_jax.train as train_module
import npo_jax.train_checkpoints as train_checkpoints
import npo_jax.train_step as train_step_module
from convert import hf_to_orbax, orbax_to_hf
from npo_jax.checkpoint import ORBAX_TMP, ParamsReader
from npo_jax.data.batches import StepPlan
from npo_jax.errors import NpoJaxError, Preempted
from npo_jax.fs import CHECKSUMS_NAME, recover_interrupted, verify_checksums
from npo_jax.model_io import load_model
from npo_jax.run_config import load_run_config
from npo_jax.train import Trainer

WORKER = Path(__file__).with_name("fault_worker.py")
STEPS = 48  # optim.epochs=24 over 16 forget examples, 8 per step: room for 10 kills of a few steps each


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    data = make_mini_tofu(root)
    model = make_tiny_model_with_tokenizer(root, data)
    (root / "run.yaml").write_text("seed: 0\n")
    return root, data, model


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """A persistent compilation cache for this module and its subprocesses (restored afterwards)."""
    cache = tmp_path_factory.mktemp("jax_cache")
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    old = {k: getattr(jax.config, k) for k in keys}
    jax.config.update(keys[0], str(cache))
    jax.config.update(keys[1], 0)
    compilation_cache.reset_cache()
    yield cache
    for k, v in old.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()


def _overrides(mini, out, *extra):
    root, data, model = mini
    return [f"model.path={model}", f"data.dir={data}", f"cache_dir={root}/cache", f"output_dir={out}",
            "data.max_length=128", "data.length_buckets=[96,128]", "optim.effective_batch=8",
            "optim.per_device_batch=1", f"optim.epochs={STEPS // 2}", "optim.lr=1e-3", "optim.warmup_epochs=0.5",
            "checkpoint.export_hf=false", *extra]


def _trainer(mini, out, *extra, resume=False, max_steps=None):
    return Trainer(load_run_config(None, _overrides(mini, out, *extra)), "unlearn", resume=resume, progress=False,
                   max_steps=max_steps)


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out):
    return [r["loss"] for r in _records(out)]


def _steps(ckpt):
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())


def _checkpoint_params(ckpt):
    return ParamsReader(ckpt).read_all()


def _assert_params_equal(a, b, atol=1e-6, rtol=0.0):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


@pytest.fixture(scope="module")
def straight(mini, tmp_path_factory):
    """The uninterrupted run (STEPS steps) every interrupted one must reproduce."""
    out = tmp_path_factory.mktemp("straight") / "run"
    trainer = _trainer(mini, out)
    trainer.train()
    assert trainer.total_steps == STEPS
    return {"params": trainer.params(), "losses": _losses(out)}


# -- subprocesses -----------------------------------------------------------------------------------


def _spawn(args, log: Path, compile_cache: Path, **env):
    full_env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(compile_cache),
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **{k: str(v) for k, v in env.items()}}
    return subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], env=full_env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)


def _cli(mini, out, *extra):
    return ["unlearn", mini[0] / "run.yaml", *_overrides(mini, out, *extra)]


def _wait_for(condition, proc, log: Path, timeout=120):
    end = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"worker exited with {proc.returncode} too early:\n{log.read_text()[-3000:]}")
        if time.monotonic() > end:
            raise AssertionError(f"timed out:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _finish(proc, log: Path, timeout=180) -> tuple[int, str]:
    proc.wait(timeout=timeout)
    return proc.returncode, log.read_text()


# -- 1. preemption ------------------------------------------------------------------------------------


def test_sigterm_saves_exits_75_and_resume_is_exact(mini, straight, tmp_path, compile_cache):
    """SIGTERM to a real training process mid-run; `--resume` in a new one ends where the
    uninterrupted run does (every_steps=0: the only checkpoint is the one the signal wrote)."""
    out = tmp_path / "run"
    metrics = out / "metrics.jsonl"
    log = tmp_path / "sigterm.log"
    proc = _spawn(_cli(mini, out), log, compile_cache, FAULT_STEP_SLEEP=0.3)
    _wait_for(lambda: _lines(metrics) >= 2, proc, log)
    proc.send_signal(signal.SIGTERM)
    code, text = _finish(proc, log)
    assert code == Preempted.exit_code, text
    step = _lines(metrics)
    assert f"preempted: SIGTERM: stopped after step {step} of {STEPS}" in text, text
    assert step < STEPS and _steps(out / "checkpoints") == [step] and verify_checksums(out / "checkpoints" / str(step))
    log = tmp_path / "resume.log"
    code, text = _finish(_spawn([*_cli(mini, out), "--resume"], log, compile_cache), log)
    assert code == 0, text
    _assert_params_equal(_checkpoint_params(out / "checkpoints"), straight["params"])
    np.testing.assert_allclose(_losses(out), straight["losses"], rtol=1e-6)
    print(f"SIGTERM after step {step}; resumed to {STEPS}: params equal the uninterrupted run")


def test_sigint_finishes_the_step_and_saves(mini, straight, tmp_path, monkeypatch):
    """Ctrl-C (a real SIGINT to this process) while step 3 runs (the trainer is preparing step 4's
    batch meanwhile): step 3 completes, is saved, Preempted is raised, the usual handlers are
    back, and the resumed run is exact."""
    original = train_module.step_batch

    def step_batch(plan, step, *args, **kwargs):
        if step == 3:  # 0-based: the 4th step's batch, built while the 3rd step runs
            os.kill(os.getpid(), signal.SIGINT)
        return original(plan, step, *args, **kwargs)

    monkeypatch.setattr(train_module, "step_batch", step_batch)
    out = tmp_path / "run"
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(Preempted, match=f"SIGINT: stopped after step 3 of {STEPS}"):
        _trainer(mini, out).train()
    assert {s: signal.getsignal(s) for s in before} == before
    assert _steps(out / "checkpoints") == [3] and len(_records(out)) == 3
    monkeypatch.undo()
    resumed = _trainer(mini, out, resume=True)
    resumed.train()
    _assert_params_equal(resumed.params(), straight["params"])
    np.testing.assert_allclose(_losses(out), straight["losses"], rtol=1e-6)


# -- 2. SIGKILL while saving --------------------------------------------------------------------------


def test_sigkill_during_checkpoint_saves(mini, straight, tmp_path, compile_cache):
    """Kill a run that saves every step at random moments, resume it each time, then finish it.

    Every other kill comes as soon as a save is in flight (its temporary folder exists): how much
    of a run is spent saving depends on the host (with training's glibc setting, random kills hit
    a save 4-5 times in 10 here, 7 times without)."""
    out, rng, kills = tmp_path / "run", random.Random(0), 10
    ckpt = out / "checkpoints"
    extra = ("checkpoint.every_steps=1", "checkpoint.keep=2")
    mid_save = unchecked = 0
    left, no_manifest = [], None
    for i in range(kills):
        log, fed = tmp_path / f"kill{i}.log", tmp_path / f"fed{i}.jsonl"
        proc = _spawn([*_cli(mini, out, *extra), *(["--resume"] if i else [])], log, compile_cache,
                      FAULT_FED_LOG=fed)
        _wait_for(lambda f=fed: _lines(f) >= 2, proc, log)  # the first step of this process is done
        if i % 2:
            time.sleep(rng.uniform(0.0, 0.6))
        else:
            _wait_for(lambda: any(ORBAX_TMP in p.name for p in ckpt.iterdir()), proc, log)
        proc.kill()
        code, text = _finish(proc, log)
        assert code == -signal.SIGKILL, text
        assert "npo-jax: error" not in text
        for p in left:  # what the previous kill left half-written was removed, with a warning
            assert f"{p}: removing an unfinished checkpoint save" in text
        if no_manifest:  # the previous kill left its newest step without a manifest: resumed from it, unchecked
            assert f"{no_manifest}: no checksum manifest" in text, text
        left = [p for p in ckpt.iterdir() if ORBAX_TMP in p.name] if ckpt.exists() else []
        mid_save += bool(left)
        steps = _steps(ckpt) if ckpt.exists() else []
        # the newest step may lack its manifest (killed between Orbax's rename and our write); the
        # next process resumes from it with a warning, asserted above
        no_manifest = ckpt / str(steps[-1]) if steps and not verify_checksums(ckpt / str(steps[-1])) else None
        unchecked += no_manifest is not None  # verify_checksums raised if the step was damaged
    log = tmp_path / "final.log"
    code, text = _finish(_spawn([*_cli(mini, out, *extra), "--resume"], log, compile_cache), log)
    assert code == 0, text
    assert not no_manifest or f"{no_manifest}: no checksum manifest" in text, text
    assert not [p for p in ckpt.iterdir() if ORBAX_TMP in p.name]
    _assert_params_equal(_checkpoint_params(ckpt), straight["params"])
    np.testing.assert_allclose(_losses(out), straight["losses"], rtol=1e-6)
    assert mid_save >= kills // 2, f"only {mid_save} of {kills} kills hit a save in flight"
    print(f"{kills} kills, {mid_save} with a save in flight, {unchecked} newest steps without a manifest; "
          f"final params equal the uninterrupted run")


def test_sigkill_during_hf_export(mini, tmp_path, compile_cache):
    """Kill a loop of exports (A, B, A, ... over the same folder) at random moments: the folder is
    always one complete, checksummed export, once the next writer has cleaned up."""
    _, _, model = mini
    sources = [hf_to_orbax(model, tmp_path / "a", progress=False),
               hf_to_orbax(model, tmp_path / "b", dtype="bfloat16", progress=False)]
    complete = set()
    for i, src in enumerate(sources):
        orbax_to_hf(src, tmp_path / f"ref{i}", progress=False)
        complete.add(_shard_sha(tmp_path / f"ref{i}"))
    assert len(complete) == 2
    dst = tmp_path / "hf"
    orbax_to_hf(sources[0], dst, progress=False)
    rng, kills, mid_write = random.Random(1), 10, 0
    for i in range(kills):
        log = tmp_path / f"export{i}.log"
        proc = _spawn(["--export-loop", *sources, dst], log, compile_cache)
        _wait_for(lambda lg=log: "exported 0" in lg.read_text(), proc, log)
        time.sleep(rng.uniform(0.0, 0.5))
        proc.kill()
        proc.wait()
        partial = [p for p in tmp_path.iterdir() if p.name.startswith(".hf.")]
        mid_write += bool(partial)
        recover_interrupted(dst)  # what the next writer does first
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf.")]
        assert verify_checksums(dst) and _shard_sha(dst) in complete
    load_model(dst)
    assert mid_write >= 1, f"none of {kills} kills hit an export in flight"  # typically 5-9 of 10
    print(f"{kills} kills, {mid_write} during a write; the folder was a complete export each time")


def _shard_sha(folder):
    return json.loads((folder / CHECKSUMS_NAME).read_text())["files"]["model-00001-of-00001.safetensors"]["sha256"]


def test_killed_between_the_renames_of_a_replace(tmp_path, capfd):
    """The one instant the random kills above are unlikely to hit: old moved aside, new not yet in place."""
    dst = tmp_path / "hf"
    (tmp_path / ".hf.old-1234abcd").mkdir()
    (tmp_path / ".hf.old-1234abcd" / "model.safetensors").write_text("previous")
    (tmp_path / ".hf.tmp-5678ef01").mkdir()
    recover_interrupted(dst)
    assert (dst / "model.safetensors").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    err = capfd.readouterr().err
    assert "restored the previous version" in err and "removing a half-written folder" in err


# -- 3. corruption --------------------------------------------------------------------------------------


def _flip_byte(path: Path, offset: int | None = None):
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _largest_file(folder: Path) -> Path:
    files = [p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS_NAME]
    return max(files, key=lambda p: p.stat().st_size)


@pytest.fixture(scope="module")
def short_run(mini, tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4, and its HF export."""
    out = tmp_path_factory.mktemp("short") / "run"
    _trainer(mini, out, "checkpoint.every_steps=2", "checkpoint.export_hf=true", max_steps=4).train()
    assert _steps(out / "checkpoints") == [2, 4]
    return out


@pytest.mark.parametrize("damage", [_flip_byte, _truncate], ids=["altered", "truncated"])
def test_damaged_training_checkpoint_is_named(mini, short_run, tmp_path, damage):
    out = tmp_path / "run"
    shutil.copytree(short_run, out)
    victim = _largest_file(out / "checkpoints" / "4")
    damage(victim)
    what = "contents do not match" if damage is _flip_byte else "bytes, expected"
    for load in (lambda: _trainer(mini, out, "checkpoint.every_steps=2", resume=True, max_steps=4),
                 lambda: ParamsReader(out / "checkpoints"),  # export, eval, model.path
                 lambda: orbax_to_hf(out / "checkpoints", tmp_path / "hf", progress=False)):
        with pytest.raises(NpoJaxError) as err:
            load()
        msg = str(err.value)
        assert str(victim) in msg and what in msg and "delete" in msg and "resume from step 2" in msg, msg
    assert not (tmp_path / "hf").exists()
    shutil.rmtree(out / "checkpoints" / "4")  # what the message says to do
    assert _trainer(mini, out, "checkpoint.every_steps=2", resume=True, max_steps=4).start_step == 2


@pytest.mark.parametrize("damage", [_flip_byte, _truncate], ids=["altered", "truncated"])
def test_damaged_exports_and_params_checkpoints_are_named(mini, short_run, tmp_path, damage):
    _, _, model = mini
    hf = tmp_path / "hf"
    shutil.copytree(short_run / "hf", hf)
    params = hf_to_orbax(model, tmp_path / "params", progress=False)
    victims = [hf / "model-00001-of-00001.safetensors", _largest_file(params / "params")]
    for folder, victim in zip((hf, params), victims, strict=True):
        assert load_model(folder).params
        damage(victim)
        with pytest.raises(NpoJaxError) as err:
            load_model(folder)
        assert str(victim) in str(err.value), str(err.value)
    with pytest.raises(NpoJaxError) as err:  # the HF converter checks too
        hf_to_orbax(hf, tmp_path / "again", progress=False)
    assert str(victims[0]) in str(err.value)
    (hf / CHECKSUMS_NAME).write_text("{not json")
    with pytest.raises(NpoJaxError) as err:
        load_model(hf)
    assert str(hf / CHECKSUMS_NAME) in str(err.value)
    assert not (model / CHECKSUMS_NAME).exists() and load_model(model).params  # HF releases have none: unchecked


# -- 4. other topologies --------------------------------------------------------------------------------

FSDP8 = ("parallel.data=1", "parallel.fsdp=8")


@pytest.fixture(scope="module")
def fsdp8_run(mini, tmp_path_factory):
    """fsdp=8 in one process for 6 steps, checkpoints at 2, 4, 6: the reference for restarts on other
    topologies and for the two-process run."""
    out = tmp_path_factory.mktemp("fsdp8") / "run"
    _trainer(mini, out, *FSDP8, "checkpoint.every_steps=2", "checkpoint.keep=3", max_steps=6).train()
    return out


def _state_params(ckpt, step):
    return ocp.StandardCheckpointer().restore(ckpt / str(step) / "state")["params"]


@pytest.mark.parametrize("devices,extra", [(4, ["parallel.fsdp=4"]), (8, ["parallel.data=1"]),
                                           (8, ["parallel.strategy=pmap"])],
                         ids=["fsdp4-process-with-4-devices", "1-device", "pmap-8-devices"])
def test_restore_on_another_topology(mini, fsdp8_run, tmp_path, compile_cache, devices, extra):
    """Step 2 of the fsdp=8 run restored elsewhere: steps 3 and 4 as in the uninterrupted run."""
    out = tmp_path / "run"
    shutil.copytree(fsdp8_run, out, ignore=shutil.ignore_patterns("4", "6"))
    _keep_records(out, 2)
    argv = [*_cli(mini, out, *extra), "--resume", "--max-steps", "4"]
    if devices == 8:  # this process (8 simulated devices); "1-device" is a mesh of one of them
        from npo_jax.cli import main

        assert main(list(map(str, argv))) == 0
    else:  # a process that has only `devices` devices, as on a smaller slice
        log = tmp_path / "worker.log"
        xla = f"--xla_force_host_platform_device_count={devices}"
        code, text = _finish(_spawn(argv, log, compile_cache, XLA_FLAGS=xla), log)
        assert code == 0, text
    assert _steps(out / "checkpoints") == [2, 4]
    np.testing.assert_allclose(_losses(out), _losses(fsdp8_run)[:4], rtol=1e-5)
    _assert_params_equal(_checkpoint_params(out / "checkpoints"), _state_params(fsdp8_run / "checkpoints", 4),
                         atol=1e-6, rtol=1e-4)


def _keep_records(out, n):
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(lines[:n]))


# -- 6. numerical faults --------------------------------------------------------------------------------


@pytest.fixture
def poison(monkeypatch):
    """Make the gradients of chosen steps +inf (the loss stays finite), through a batch field."""
    steps = set()
    original_batch, original_grads = train_module.step_batch, train_step_module.accumulated_grads

    def step_batch(plan, step, *args, **kwargs):
        batch = original_batch(plan, step, *args, **kwargs)
        batch["poison"] = np.full(len(batch["forget_index"]), float(step + 1 in steps), np.float32)
        return batch

    def accumulated_grads(graphdef, obj, params, ref_params, batch, *grouping):
        batch = dict(batch)
        bad = jnp.where(batch.pop("poison").max() > 0, jnp.inf, 0.0)
        loss, aux, grads = original_grads(graphdef, obj, params, ref_params, batch, *grouping)
        return loss, aux, jax.tree.map(lambda g: g + bad, grads)

    monkeypatch.setattr(train_module, "step_batch", step_batch)
    monkeypatch.setattr(train_step_module, "accumulated_grads", accumulated_grads)
    return steps


def test_inf_gradient_stops_and_keeps_last_good_checkpoint(mini, tmp_path, poison):
    poison.add(3)
    out = tmp_path / "run"
    with pytest.raises(NpoJaxError) as err:
        _trainer(mini, out, "checkpoint.every_steps=1").train()
    msg = str(err.value)
    assert msg.startswith("step 3: non-finite grad_norm=inf") and "loss" not in msg.split(";")[0], msg
    assert "the last good checkpoint (step 2) is kept" in msg
    assert _steps(out / "checkpoints") == [1, 2] and verify_checksums(out / "checkpoints" / "2")
    assert [r["step"] for r in _records(out)] == [1, 2]
    poison.clear()
    assert _trainer(mini, out, "checkpoint.every_steps=1", resume=True).start_step == 2


def test_skip_nonfinite_skips_and_counts(mini, tmp_path, poison, capfd):
    poison.update({3, 5})
    out = tmp_path / "run"
    _trainer(mini, out, "optim.skip_nonfinite=1", "checkpoint.every_steps=1", "checkpoint.keep=10",
             max_steps=6).train()
    records = _records(out)
    assert [r["skipped_nonfinite"] for r in records] == [0, 0, 1, 1, 2, 2]
    assert np.isinf(records[2]["grad_norm"]) and np.isfinite(records[2]["loss"])
    assert "step 3: non-finite grad_norm=inf; update skipped (1 in a row, 1 in all)" in capfd.readouterr().err
    state = {s: ocp.StandardCheckpointer().restore(out / "checkpoints" / str(s) / "state") for s in (2, 3, 4)}
    _assert_params_equal(state[3]["params"], state[2]["params"], atol=0)  # the update of step 3 was skipped
    embedding = {s: state[s]["params"]["embed_tokens"]["embedding"] for s in (3, 4)}
    assert not np.allclose(embedding[4], embedding[3])  # step 4 was applied
    poison.clear()
    poison.update({3, 4})  # two in a row with skip_nonfinite=1: the second is not skipped, the run stops
    with pytest.raises(NpoJaxError) as err:
        _trainer(mini, tmp_path / "run2", "optim.skip_nonfinite=1", "checkpoint.every_steps=1").train()
    assert "step 4: non-finite" in str(err.value) and "2 in a row, more than optim.skip_nonfinite=1" in str(err.value)
    assert "last good checkpoint (step 3) is kept" in str(err.value)


# -- 7. disk full -----------------------------------------------------------------------------------------


@pytest.fixture
def file_size_limit():
    """set(n): writes past n bytes in any file fail with EFBIG (RLIMIT_FSIZE, SIGXFSZ ignored)."""
    old_limit, old_handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def set_limit(n):
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, old_limit[1]))

    yield set_limit
    resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
    signal.signal(signal.SIGXFSZ, old_handler)


def test_save_error_keeps_the_os_reason_of_a_tensorstore_error():
    """Tensorstore ends its errors with the OS reason, then the array's whole spec: the message keeps
    the reason. (A fresh-clone CI run lost it: the middle elision kept only the spec's end.)"""
    path = "/tmp/pytest-of-root/pytest-0/test_disk_full_during_save_rep0/run/checkpoints/3.orbax-checkpoint-tmp"
    spec = '{\\"context\\":{\\"cache_pool\\":{}},' + ",".join(f'\\"k{i}\\":{i}' for i in range(150)) + "}"
    error = ValueError(f'OUT_OF_RANGE: Error opening "zarr" driver: Error writing "params.layers.scale/.zarray" in '
                       f'OCDBT database at local file "{path}/ocdbt.process_0/": Failed writing: "{path}/d/de92": '
                       f"Failed to write 77545 bytes to file 23: File too large [os_error_code='27'] "
                       f"[tensorstore_spec='{spec}']")
    assert len(str(error)) > 1500
    line = train_checkpoints._first_line(error)
    assert line.startswith("OUT_OF_RANGE: Error opening") and "tensorstore_spec" not in line, line
    assert line.endswith("File too large [os_error_code='27']") and len(line) <= 505, line
    assert train_checkpoints._out_of_space(error)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's event loop, after the failure
def test_disk_full_during_save_reports_and_keeps_previous(mini, tmp_path, file_size_limit, capfd):
    out = tmp_path / "run"
    _trainer(mini, out, "checkpoint.every_steps=1", "checkpoint.export_hf=true", max_steps=2).train()
    hf_before = _shard_sha(out / "hf")
    trainer = _trainer(mini, out, "checkpoint.every_steps=1", resume=True, max_steps=4)
    real_save = trainer.save

    def save(step):
        if step == 3:
            # the limit is the whole process's: pytest's capture file of stderr must stay under it too
            capfd.readouterr()
            file_size_limit(64 << 10)  # the step's data files are ~100-400 KB
        real_save(step)

    trainer.save = save
    asyncio_log = logging.getLogger("asyncio")
    level = asyncio_log.level
    asyncio_log.setLevel(logging.CRITICAL)  # orbax's failed writes each log a long error in the background
    try:
        with pytest.raises(NpoJaxError) as err:
            trainer.train()
    finally:
        asyncio_log.setLevel(level)
    msg = str(err.value)
    assert f"{out / 'checkpoints'}: saving the checkpoint of step 3 failed (out of disk space?)" in msg, msg
    assert "File too large" in msg and "the last complete checkpoint, step 2, is intact" in msg
    with pytest.raises(NpoJaxError) as err:  # the export under the same limit: the old one stays
        orbax_to_hf(out / "checkpoints", out / "hf", overwrite=True, progress=False)
    assert f"{out / 'hf'}: writing failed" in str(err.value) and "previous hf is unchanged" in str(err.value)
    file_size_limit(resource.RLIM_INFINITY)
    assert _shard_sha(out / "hf") == hf_before and verify_checksums(out / "hf")
    assert verify_checksums(out / "checkpoints" / "2")
    capfd.readouterr()
    resumed = _trainer(mini, out, "checkpoint.every_steps=1", resume=True, max_steps=4)
    assert resumed.start_step == 2 and "removing an unfinished checkpoint save" in capfd.readouterr().err
    resumed.train()
    assert _steps(out / "checkpoints") == [3, 4]


# -- 5. two real processes ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(mini, out, tmp_path, compile_cache, *flags, tag, sleep=0.0):
    """Processes 0 and 1, 4 CPU devices each, joined through a coordinator on 127.0.0.1, training
    with fsdp over all 8 devices. Host 1 has its own, empty cache folder (per-host disks): both must
    still compute the reference log-probs together."""
    root = mini[0]
    port, procs = _free_port(), []
    for i in range(2):
        cache = root / "cache" if i == 0 else tmp_path / "host1_cache"
        argv = [*_cli(mini, out, *FSDP8, "checkpoint.every_steps=2", "checkpoint.export_hf=true",
                      f"cache_dir={cache}", f"data.tfds_dir={root}/cache/tfds"), "--max-steps", "6", *flags]
        log = tmp_path / f"{tag}_host{i}.log"
        env = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": 2, "JAX_PROCESS_ID": i,
               "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "FAULT_FED_LOG": tmp_path / f"fed{i}.jsonl",
               "FAULT_STEP_SLEEP": sleep}
        procs.append((_spawn(argv, log, compile_cache, **env), log))
    return procs


def test_two_processes_train_like_one(mini, fsdp8_run, tmp_path, compile_cache):
    """Two processes x 4 devices = one process x 8: SIGTERM to host 1 stops both at the same step;
    resumed, they finish with the losses and params of the single process; each host fed only its
    half of every batch; host 0 alone wrote the records, the checksums and the export."""
    out = tmp_path / "run"
    procs = _two_processes(mini, out, tmp_path, compile_cache, tag="first", sleep=0.3)
    _wait_for(lambda: _lines(out / "metrics.jsonl") >= 2, procs[1][0], procs[1][1])
    procs[1][0].send_signal(signal.SIGTERM)
    texts = []
    for proc, log in procs:
        code, text = _finish(proc, log)
        assert code == Preempted.exit_code, text
        texts.append(text)
    step = _lines(out / "metrics.jsonl")
    assert f"preempted: a stop signal on another host: stopped after step {step} of 6" in texts[0]
    assert f"preempted: SIGTERM: stopped after step {step} of 6" in texts[1]
    ckpt = out / "checkpoints"
    assert _steps(ckpt)[-1] == step and verify_checksums(ckpt / str(step))
    shards = {p.name for p in (ckpt / str(step) / "state").glob("ocdbt.process_*")}
    assert shards == {"ocdbt.process_0", "ocdbt.process_1"}  # one checkpoint, half of the params from each host

    procs = _two_processes(mini, out, tmp_path, compile_cache, "--resume", tag="resumed")
    for proc, log in procs:
        code, text = _finish(proc, log)
        assert code == 0, text
    np.testing.assert_allclose(_losses(out), _losses(fsdp8_run), rtol=1e-5)  # one record per step
    _assert_params_equal(_checkpoint_params(ckpt), _state_params(fsdp8_run / "checkpoints", 6), atol=1e-6,
                         rtol=1e-5)
    assert not [p for p in ckpt.iterdir() if ORBAX_TMP in p.name] and verify_checksums(ckpt / "6")
    assert verify_checksums(out / "hf") and load_model(out / "hf").params
    assert list((tmp_path / "host1_cache" / "reference_logprobs").glob("*.npy"))
    fed = [[json.loads(line) for line in (tmp_path / f"fed{i}.jsonl").read_text().splitlines()] for i in range(2)]
    assert all(r["process"] == i for i in range(2) for r in fed[i])
    plan = StepPlan(16, 8, STEPS // 2, 0)  # 16 forget examples, 8 per step, seed 0
    for s in range(6):
        halves = [set(next(r["forget_index"] for r in fed[i] if r["step"] == s)) for i in range(2)]
        assert len(halves[0]) == len(halves[1]) == 4 and not halves[0] & halves[1], halves
        assert halves[0] | halves[1] == set(plan.indices(s).tolist())
