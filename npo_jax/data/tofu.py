"""TOFU through tensorflow-datasets: one builder config per TOFU file, read as array_record.

By default the files are downloaded from the Hugging Face dataset `locuslab/TOFU`
(`NAME.json`, JSON lines); given a local folder (TFDS `manual_dir`) they are read from there as
`NAME.json` or `NAME.jsonl`. Prepared splits are array_record files read through a random-access
data source, so no TensorFlow is needed. Row order is the file's order (`index` field), as
open-unlearning's per-item logs (`value_by_index`) assume.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from npo_jax.errors import NpoJaxError
from npo_jax.fs import atomic_write, cache_dir

HUB_URL = "https://huggingface.co/datasets/locuslab/TOFU/resolve/main"
HUB_TIMEOUT_S = 20  # per connect or read: a dead network fails within it

QA = ("question", "answer")
PERTURBED = (*QA, "paraphrased_answer", "perturbed_answer", "paraphrased_question")
OPTIONS = (*QA, "perturbed_answer")
SPLIT_FIELDS = {
    "full": QA,
    **{f"forget{n}": QA for n in ("01", "05", "10")},
    **{f"retain{n}": QA for n in ("90", "95", "99")},
    **{f"holdout{n}": QA for n in ("01", "05", "10")},
    **{f"forget{n}_perturbed": PERTURBED for n in ("01", "05", "10")},
    "retain_perturbed": PERTURBED,
    "real_authors_perturbed": OPTIONS,
    "world_facts_perturbed": OPTIONS,
}


def _feature(name: str):
    if name == "perturbed_answer":
        return tfds.features.Sequence(tfds.features.Text())
    return tfds.features.Text()


class Tofu(tfds.core.GeneratorBasedBuilder):
    """TOFU question-answer files (Maini et al., 2024), one config per file, a single `train` split."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name) for name in SPLIT_FIELDS]
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Optional: a folder with TOFU's NAME.json or NAME.jsonl files."
    hub_url = HUB_URL

    def _info(self) -> tfds.core.DatasetInfo:
        fields = SPLIT_FIELDS[self.builder_config.name]
        features = {name: _feature(name) for name in fields}
        features["index"] = tfds.features.Scalar(dtype=np.int64)
        # disable_shuffling keeps the file order: per-item eval logs are indexed by it
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features),
                                     homepage="https://huggingface.co/datasets/locuslab/TOFU",
                                     disable_shuffling=True)

    def _split_generators(self, dl_manager):
        name = self.builder_config.name
        path = None
        try:
            manual = Path(dl_manager.manual_dir)
        except AssertionError:  # no manual_dir configured
            manual = None
        if manual is not None:
            for suffix in (".json", ".jsonl"):
                if (manual / f"{name}{suffix}").is_file():
                    path = manual / f"{name}{suffix}"
            if path is None:
                raise NpoJaxError(f"{manual}: no {name}.json or {name}.jsonl (TOFU split '{name}')")
        else:
            path = fetch(f"{self.hub_url}/{name}.json", Path(dl_manager.download_dir))
        return {"train": self._generate_examples(path)}

    def _generate_examples(self, path: Path):
        for index, record in enumerate(read_records(path, SPLIT_FIELDS[self.builder_config.name])):
            yield index, {**record, "index": index}


def fetch(url: str, folder: Path) -> Path:
    """`url` saved in `folder` (kept: a second call reads nothing). One request with a short
    timeout, no retries: offline, an error naming the URL within seconds, not minutes of retries."""
    dest = folder / url.rsplit("/", 1)[-1]
    if dest.is_file():
        return dest
    try:
        with urllib.request.urlopen(url, timeout=HUB_TIMEOUT_S) as response:
            data = response.read()
    except (OSError, ValueError) as e:  # URLError, HTTPError, a timeout; ValueError: a malformed URL
        reason = getattr(e, "reason", None) or e
        raise NpoJaxError(f"{url}: download failed ({reason}); without network access, put the TOFU files "
                          "(NAME.json or NAME.jsonl) in a folder and set data.dir (eval, audit: --data-dir)") from None
    folder.mkdir(parents=True, exist_ok=True)
    return atomic_write(dest, lambda p: p.write_bytes(data))


def read_records(path: Path, fields) -> list[dict]:
    """JSON-lines (or a JSON list) of TOFU records, checked for the split's fields and types."""
    text = Path(path).read_text()
    try:
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise NpoJaxError(f"{path}: not JSON lines ({e})") from None
    if not rows:
        raise NpoJaxError(f"{path}: empty split")
    out = []
    for line, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise NpoJaxError(f"{path}: record {line} is not a JSON object")
        record = {}
        for name in fields:
            if name not in row:
                raise NpoJaxError(f"{path}: record {line} has no field '{name}'")
            value = row[name]
            ok = (isinstance(value, list) and value and all(isinstance(v, str) for v in value)
                  if name == "perturbed_answer" else isinstance(value, str))
            if not ok:
                raise NpoJaxError(f"{path}: record {line} field '{name}' has the wrong type ({type(value).__name__})")
            record[name] = value
        out.append(record)
    return out


def _prepared_dir(base: Path, local: Path | None) -> Path:
    """Prepared data is kept per source: the hub, or a local folder's path and file stamps."""
    if local is None:
        return base / "hub"
    stamp = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in local.iterdir() if p.is_file())
    key = hashlib.sha1(json.dumps([str(local.resolve()), stamp]).encode()).hexdigest()[:12]
    return base / f"local-{key}"


@contextlib.contextmanager
def _quiet_tfds():
    """Preparing a local folder takes a moment: no download banner or progress bars for it."""
    tfds.display_progress_bar(False)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        tfds.display_progress_bar(True)


def load_split(name: str, data_dir: str | Path | None = None, tfds_dir: str | Path | None = None):
    """A TOFU split as a random-access sequence of dicts (str fields, `index` int).

    `data_dir`: local folder with the TOFU files (None: download from the hub).
    `tfds_dir`: where TFDS keeps prepared array_record files.
    """
    if name not in SPLIT_FIELDS:
        raise NpoJaxError(f"unknown TOFU split '{name}' (known: {', '.join(SPLIT_FIELDS)})")
    local = Path(data_dir) if data_dir is not None else None
    if local is not None and not local.is_dir():
        raise NpoJaxError(f"{local}: TOFU data folder not found")
    base = Path(tfds_dir) if tfds_dir else cache_dir(None) / "tfds"
    builder = Tofu(config=name, data_dir=str(_prepared_dir(base, local)), file_format="array_record")
    download_config = tfds.download.DownloadConfig(manual_dir=str(local) if local else None)
    with _quiet_tfds() if local is not None else contextlib.nullcontext():
        builder.download_and_prepare(download_config=download_config)
    return DecodedSplit(builder.as_data_source(split="train"))


class DecodedSplit:
    """Random access to a prepared split with text fields decoded to str."""

    def __init__(self, source):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> dict:
        return _decode(self._source[i])

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


def _decode(value):
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_decode(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return [_decode(v) for v in value.tolist()]
    return value
