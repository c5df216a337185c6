"""Bad run, sweep and demo configs, flags and environment: one `npo-jax: error:` line naming the
field and what it may be, exit code 2, before anything is loaded, written or deleted."""

import dataclasses
import socket
import time
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest

from npo_jax.cli import build_parser, main
from npo_jax.data.tofu import Tofu
from npo_jax.data.tokenize import ChatFormat
from npo_jax.errors import NpoJaxError
from npo_jax.run_config import COMPUTE_DTYPES, RANGES, RunConfig, load_run_config, to_yaml

ROOT = Path(__file__).resolve().parents[1]


def tree(root: Path) -> dict:
    """Every path under `root` with its size and modification time (a folder's changes when an
    entry is added or removed, even if removed again)."""
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in [root, *root.rglob("*")]}


def cli_fails(capsys, argv, *fragments, watch: Path) -> str:
    """`npo-jax ARGV` exits 2 with one error line holding every fragment; nothing under `watch` changed."""
    before = tree(watch)
    capsys.readouterr()  # what came before (a fixture's progress bars)
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("npo-jax: error: "), err
    for fragment in fragments:
        assert str(fragment) in err, (fragment, err)
    assert tree(watch) == before, "files were written or deleted"
    return err


@pytest.fixture
def run_yaml(tmp_path):
    """A run config whose model does not exist: whatever fails must fail before it is loaded."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {{path: {tmp_path / 'no_model'}}}\noutput_dir: {tmp_path / 'run'}\n")
    return cfg


@pytest.mark.parametrize("override,fragment", [
    ("method.beta=0", "method.beta=0.0 is out of range: it must be > 0"),
    ("method.alpha=-1", "method.alpha=-1.0 is out of range: it must be >= 0"),
    ("optim.lr=-1", "optim.lr=-1.0 is out of range: it must be > 0"),
    ("optim.max_grad_norm=-1", "optim.max_grad_norm=-1.0 is out of range: it must be > 0"),
    ("optim.epochs=0", "optim.epochs=0 is out of range: it must be >= 1"),
    ("optim.per_device_batch=0", "optim.per_device_batch=0 is out of range: it must be >= 1"),
    ("parallel.fsdp=0", "parallel.fsdp=0 is out of range: it must be >= 1"),
    ("parallel.data=0", "parallel.data=0 is out of range: it must be -1"),
    ("optim.b2=1", "optim.b2=1.0 is out of range: it must be >= 0 and < 1"),
    ("method.gamma=nan", "method.gamma=nan is out of range"),
    ("model.compute_dtype=fp16", "model.compute_dtype: Invalid value 'fp16', expected one of ['float32', 'bfloat16'"),
    ("method.name=KTO", "method.name: Invalid value 'KTO'"),
    ("data.forget_split=forget11", "data.forget_split: Invalid value 'forget11'"),
    ("checkpoint.export_dtype=int8", "checkpoint.export_dtype: Invalid value 'int8'"),
    ("optim.lr=fast", "optim.lr: Value 'fast'"),
])
def test_bad_run_config_values(capsys, tmp_path, run_yaml, override, fragment):
    cli_fails(capsys, ["unlearn", run_yaml, override], f"config {run_yaml}: ", fragment, watch=tmp_path)


def _field_types(cls, prefix=""):
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            yield from _field_types(hint, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", hint


def test_every_run_config_field_is_checked():
    """Numbers have a range, strings a Literal's choices, except the free text and paths."""
    free_text = {"output_dir", "cache_dir", "model.path", "model.tokenizer", "data.dir", "data.tfds_dir",
                 "data.system_prompt", "data.date_string", "data.idk_path", "lora.init_from",
                 "method.module_regex", "method.trainable_params_regex", "method.control_vec_path"}  # regexes: compiled
    lists = {"data.length_buckets", "lora.targets", "method.loss_names"}  # checked as a whole by their checks
    for key, hint in _field_types(RunConfig):
        if hint in (int, float):
            assert key in RANGES or key == "parallel.data", key
        elif key not in free_text and hint not in (bool, bool | None) and key not in lists:
            literal = [a for a in (hint, *typing.get_args(hint)) if typing.get_origin(a) is typing.Literal]
            assert literal, f"{key}: {hint} has no choices"


def test_malformed_yaml(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: [1e-5\n")
    cli_fails(capsys, ["unlearn", bad], f"config {bad}: not valid YAML", watch=tmp_path)


def test_overrides_anywhere_on_the_line(capsys, tmp_path, run_yaml):
    """`unlearn CFG --resume optim.lr=...`: the override after a flag is read (and here checked)."""
    cli_fails(capsys, ["unlearn", run_yaml, "--resume", "optim.lr=-1", "--max-steps", "3", "method.beta=0.5"],
              "optim.lr=-1.0 is out of range", watch=tmp_path)
    cli_fails(capsys, ["finetune", "--overwrite", run_yaml, "optim.epochs=0"], "optim.epochs=0", watch=tmp_path)


def test_output_dir_under_a_file(capsys, tmp_path, run_yaml):
    (tmp_path / "notes.txt").write_text("mine")
    cli_fails(capsys, ["unlearn", run_yaml, f"output_dir={tmp_path / 'notes.txt' / 'run'}"],
              f"cannot create this output folder: {tmp_path / 'notes.txt'} is a file", watch=tmp_path)
    cli_fails(capsys, ["unlearn", run_yaml, f"output_dir={tmp_path / 'notes.txt'}"],
              "notes.txt: is a file, not an output folder", watch=tmp_path)


# -- multi-host environment ------------------------------------------------------------------------


@pytest.mark.parametrize("env,fragment", [
    ({"JAX_NUM_PROCESSES": "2"}, "JAX_PROCESS_ID is not set"),
    ({"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES is 'two', not a whole number"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "JAX_PROCESS_ID=2: must be 0 to 1"),
])
def test_incomplete_multi_host_environment(capsys, tmp_path, run_yaml, monkeypatch, env, fragment):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    err = cli_fails(capsys, ["unlearn", run_yaml], fragment, watch=tmp_path)
    assert "JAX_PROCESS_ID (its own number)" in err or "must be 0 to" in err


# -- the TOFU download -------------------------------------------------------------------------------


def test_hub_download_without_network_fails_fast(tmp_path, monkeypatch):
    """data.dir: null with no network: one error naming the URL and what to do, in seconds."""
    from npo_jax.data.tofu import load_split

    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(Tofu, "hub_url", f"http://127.0.0.1:{port}/TOFU")
    t0 = time.perf_counter()
    with pytest.raises(NpoJaxError) as e:
        load_split("forget10", None, tmp_path / "tfds")
    assert time.perf_counter() - t0 < 30
    msg = str(e.value)
    assert msg.startswith(f"http://127.0.0.1:{port}/TOFU/forget10.json: download failed (")
    assert "refused" in msg and "put the TOFU files" in msg and "set data.dir" in msg


# -- sweep, demo, eval --run ---------------------------------------------------------------------------


def _sweep_yaml(tmp_path, run_yaml, **eval_fields):
    extra = "".join(f", {k}: {v}" for k, v in eval_fields.items())
    path = tmp_path / "sweep.yaml"
    path.write_text(f"run_config: {run_yaml}\noutput_dir: {tmp_path / 'sweep'}\ngrid: {{optim.lr: [1e-5]}}\n"
                    f"eval: {{retain_logs: {tmp_path / 'retain.json'}{extra}}}\n")
    return path


def test_sweep_eval_dtype_checked_when_the_config_loads(capsys, tmp_path, run_yaml):
    from npo_jax.sweep import load_sweep_config

    cli_fails(capsys, ["sweep", _sweep_yaml(tmp_path, run_yaml, compute_dtype="float64")],
              "eval.compute_dtype: Invalid value 'float64', expected one of ['float32', 'bfloat16', 'float16']",
              watch=tmp_path)
    cli_fails(capsys, ["sweep", _sweep_yaml(tmp_path, run_yaml), "eval.max_new_tokens=0"],
              "eval.max_new_tokens=0 is out of range", watch=tmp_path)
    assert load_sweep_config(_sweep_yaml(tmp_path, run_yaml, compute_dtype="float16")).eval.compute_dtype == "float16"


def test_one_set_of_dtype_names():
    def choices(command):
        return next(a.choices for a in build_parser().commands[command]._actions if a.dest == "compute_dtype")

    assert tuple(choices("eval")) == tuple(choices("audit")) == COMPUTE_DTYPES


def test_demo_config_missing_or_bad(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository: the default config is still found
    cli_fails(capsys, ["demo", tmp_path / "out", "--config", tmp_path / "missing.yaml"],
              f"{tmp_path / 'missing.yaml'}: demo config not found", watch=tmp_path)
    cli_fails(capsys, ["demo", tmp_path / "out", "unlearn.lr=-1"], "optim.lr=-1.0 is out of range", watch=tmp_path)
    cli_fails(capsys, ["demo", tmp_path / "out", "data.n_authors=3"], "data.n_authors=3 is out of range",
              watch=tmp_path)


def test_demo_default_config_found_from_anywhere(tmp_path, monkeypatch):
    from npo_jax.demo import DEFAULT_CONFIG, DemoConfig, load_demo_config

    monkeypatch.chdir(tmp_path)
    assert DEFAULT_CONFIG == ROOT / "configs" / "demo.yaml" and DEFAULT_CONFIG.is_file()
    assert load_demo_config(None, ["alpha=3.0"]) == load_demo_config(DEFAULT_CONFIG, ["alpha=3.0"])
    assert load_demo_config(DEFAULT_CONFIG) == DemoConfig()  # without the file (a wheel) the same values


def _run_folder(tmp_path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_run_config(None, ["model.path=m", f"output_dir={run}", "data.system_prompt=Answer briefly.",
                                 "data.date_string=1 Jan 2020", "data.forget_split=forget05",
                                 "data.eot_mask_quirk=true"])
    (run / "config.yaml").write_text(to_yaml(cfg))
    return run


def test_eval_run_applies_the_runs_data_settings(tmp_path):
    from npo_jax.eval.cli import apply_run_folder

    run = _run_folder(tmp_path)
    args = SimpleNamespace(run=str(run), model=None, data_dir=None, tfds_dir=None, forget_split=None,
                           eot_mask_quirk=None, out=None)
    apply_run_folder(args)
    assert args.fmt == ChatFormat("Answer briefly.", "1 Jan 2020")
    assert (args.forget_split, args.eot_mask_quirk, args.out) == ("forget05", True, str(run / "eval"))
    # a run whose checkpoints record their mask: the record decides (eot_mask_quirk left unset here)
    from npo_jax.mask_convention import write_record

    (run / "checkpoints").mkdir()
    write_record(run / "checkpoints", True)
    args = SimpleNamespace(run=str(run), model=None, data_dir=None, tfds_dir=None, forget_split=None,
                           eot_mask_quirk=None, out=None)
    apply_run_folder(args)
    assert args.eot_mask_quirk is None


def test_sweep_evaluates_with_the_runs_chat_format(tmp_path, monkeypatch):
    """The sweep's evaluation loads its scorer with the run's system prompt and date string."""
    import npo_jax.eval.cli
    import npo_jax.train
    from npo_jax.sweep import SweepConfig, _train_and_evaluate

    class NoTraining:
        def __init__(self, *args, **kwargs):
            pass

        def train(self):
            return {"steps": 0}

    seen = {}

    def load_scorer(*args, **kwargs):
        seen.update(kwargs)
        raise NpoJaxError("stop here")

    monkeypatch.setattr(npo_jax.train, "Trainer", NoTraining)
    monkeypatch.setattr(npo_jax.eval.cli, "load_scorer", load_scorer)
    cfg = load_run_config(_run_folder(tmp_path) / "config.yaml")
    with pytest.raises(NpoJaxError, match="stop here"):
        _train_and_evaluate(cfg, SweepConfig(), "p", {}, {}, progress=False)
    assert seen["fmt"] == ChatFormat("Answer briefly.", "1 Jan 2020") and seen["eot_mask_quirk"] is True
