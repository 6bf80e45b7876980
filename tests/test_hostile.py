"""Hostile inputs and faults, one test per class: concurrent runs, --overwrite that must not destroy,
outputs that are not what the manifest says, damaged resume chunks, operating-system errors, JSON of
the wrong shape, and values that pass argparse but used to fail later. Each ends in one line and exit
2 (or a correct result), never a traceback, and loses nothing."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import extract
import similarity
import train
from conftest import ROOT, TINY, draw_image, make_pairs
from conftest import run_script as run
from toolkit.hashing import file_sha256
from toolkit.cli import run_cli


def one_line_error(code, err, prog):
    lines = [l for l in err.splitlines() if l.startswith(f"{prog}: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def done(tmp_path, pairs_dir, capsys):
    """A finished adapt-pca 4 extraction of 5 pairs into tmp_path/o/tiny_rn."""
    argv = ["-d", pairs_dir, "-s", tmp_path / "o", "-p", "adapt-pca", "4", *TINY]
    assert run(extract, argv, capsys)[0] == 0
    return {"argv": argv, "dir": tmp_path / "o" / "tiny_rn"}


def hold_lock(folder: Path):
    """Another process holding the output folder's lock, as a concurrent run would."""
    code = ("import sys, time; sys.path.insert(0, sys.argv[2]); from toolkit.lock import folder_lock\n"
            "with folder_lock(sys.argv[1], '-s'):\n    print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder), str(ROOT)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


# --- two runs into the same folder ---------------------------------------------------------------

def test_second_extraction_into_a_locked_folder_stops_naming_the_holder(tmp_path, pairs_dir, capsys):
    holder = hold_lock(tmp_path / "o" / "tiny_rn")
    try:
        code, _, err = run(extract, ["-d", pairs_dir, "-s", tmp_path / "o", "-p", "adapt", *TINY], capsys)
        line = one_line_error(code, err, "extract.py")
        assert f"process {holder.pid}" in line
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "o" / "tiny_rn" / "manifest.json").exists()
    # once the holder is gone (even killed), the lock is free
    assert run(extract, ["-d", pairs_dir, "-s", tmp_path / "o", "-p", "adapt", *TINY], capsys)[0] == 0


def test_two_extractions_started_together_never_mix(tmp_path, pairs_dir):
    make_pairs(pairs_dir, 40, seed=3)  # 40 pairs (replacing the 5), so the runs overlap
    argv = [sys.executable, "extract.py", "-d", str(pairs_dir), "-s", str(tmp_path / "o"), "-p", "adapt", "-b", "4",
            *TINY]
    procs = [subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in results)
    # Either the second found the first finished (exit 0, "already done") or it was refused while it ran.
    assert codes in ([0, 0], [0, 2]), results
    for code, err in results:
        if code == 2:
            assert "is being written by process" in err and "Traceback" not in err
    rec = np.load(tmp_path / "o" / "tiny_rn" / "features.npy")
    manifest = json.loads((tmp_path / "o" / "tiny_rn" / "manifest.json").read_text())
    assert len(rec) == manifest["counts"]["items_kept"] == 40 and manifest["skipped"] == []


def test_second_training_into_a_locked_folder_stops(tmp_path, capsys):
    from synthetic.planted import planted_array

    np.save(tmp_path / "f.npy", planted_array(40, 8, seed=0))
    holder = hold_lock(tmp_path / "runs")
    try:
        code, _, err = run(train, ["-d", tmp_path / "f.npy", "-s", tmp_path / "runs", "-e", "1"], capsys)
        assert f"process {holder.pid}" in one_line_error(code, err, "train.py")
    finally:
        holder.kill()
        holder.wait()


# --- interrupted runs --------------------------------------------------------------------------------

def test_sigterm_unwinds_main_like_ctrl_c():
    # In a child: on the old code SIGTERM's default action ends the process without any clean-up.
    code = """if True:
        import os, signal, sys, time
        sys.path.insert(0, sys.argv[1])
        from toolkit.cli import run_cli
        before = signal.getsignal(signal.SIGTERM)
        def main(argv):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30)  # the handler raises in this frame, long before the sleep ends
                return 0
            finally:
                print("cleaned up", flush=True)
        status = run_cli(main, [], prog="x.py")
        print("handler restored" if signal.getsignal(signal.SIGTERM) is before else "handler left", flush=True)
        sys.exit(status)
    """
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 143, (proc.returncode, proc.stderr)
    assert proc.stdout.split() == ["cleaned", "up", "handler", "restored"]
    assert proc.stderr.strip() == "x.py: interrupted (SIGTERM)"


@pytest.mark.parametrize("sig,status,last", [("SIGTERM", 143, "x.py: interrupted (SIGTERM)"),
                                              ("SIGINT", 130, "x.py: interrupted")])
def test_a_signal_during_a_long_c_call_is_said_at_once_and_taken_after_the_batch(sig, status, last):
    # pbkdf2_hmac is one C call, like a forward pass: Python's handlers wait until it returns, so
    # before StopAfterBatch nothing was said until the batch ended. The line must come during batch 1,
    # and batch 2 must not start.
    code = f"""if True:
        import hashlib, os, signal, sys, threading
        sys.path.insert(0, sys.argv[1])
        from toolkit.cli import run_cli
        from toolkit.utils import StopAfterBatch
        def main(argv):
            with StopAfterBatch("stopping after the current batch") as stop:
                for i in range(3):
                    if i == 1:
                        threading.Timer(0.05, os.kill, (os.getpid(), signal.{sig})).start()
                        # one C call of a second or more (0.5 s at the least on a fast core), which lets
                        # other threads run as torch's kernels do; the signal comes 0.05 s into it
                        hashlib.pbkdf2_hmac("sha256", b"x", b"salt", 2_000_000)
                    print(f"batch {{i}} done", file=sys.stderr, flush=True)
                    stop.check()
            return 0
        sys.exit(run_cli(main, [], prog="x.py"))
    """
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == status, (proc.returncode, proc.stderr)
    assert proc.stderr.splitlines() == ["batch 0 done", "stopping after the current batch", "batch 1 done", last]


def test_training_killed_with_sigterm_during_overwrite_keeps_the_earlier_runs(tmp_path, capsys):
    # Before: SIGTERM ended the process on the spot: the earlier runs stayed in RUNS/.replaced and a
    # half-written run1 (config.json, events, no checkpoint) took their place; every later run was refused.
    import signal

    from synthetic.planted import planted_array

    np.save(tmp_path / "f.npy", planted_array(600, 64, seed=0))
    runs = tmp_path / "runs"
    assert run(train, ["-d", tmp_path / "f.npy", "-s", runs, "-e", "1", "--no-images"], capsys)[0] == 0
    before = snapshot(runs)
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "-d", str(tmp_path / "f.npy"), "-s", str(runs),
                             "-e", "100000", "--no-images", "--overwrite", "--cpu"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((runs / ".replaced" / "run1").is_dir() and (runs / "run1" / "config.json").is_file()):
            assert time.monotonic() < deadline and proc.poll() is None, "the new run never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 143 and "train.py: interrupted (SIGTERM)" in err and "Traceback" not in err, err
    assert snapshot(runs) == before and not (runs / ".replaced").exists()
    assert run(train, ["-d", tmp_path / "f.npy", "-s", runs, "-e", "1", "--no-images", "--overwrite"], capsys)[0] == 0


# --- --overwrite never deletes outside, never loses the earlier results ----------------------------

def test_overwrite_never_deletes_outside_the_output_folder(done, tmp_path, capsys):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    manifest = json.loads((done["dir"] / "manifest.json").read_text())
    manifest["outputs"]["../../victim"] = {"kind": "features"}
    (done["dir"] / "manifest.json").write_text(json.dumps(manifest))
    argv = [a if a != "4" else "3" for a in done["argv"]] + ["--overwrite"]
    code, _, err = run(extract, argv, capsys)
    assert "../../victim" in one_line_error(code, err, "extract.py")
    assert (victim / "precious.txt").read_text() == "keep me"
    # a symlink listed as an output, pointing outside, is refused the same way
    del manifest["outputs"]["../../victim"]
    (done["dir"] / "link").symlink_to(victim)
    manifest["outputs"]["link"] = {"kind": "features"}
    (done["dir"] / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run(extract, argv, capsys)
    assert "'link'" in one_line_error(code, err, "extract.py")
    assert (victim / "precious.txt").read_text() == "keep me"
    # and an absolute path
    del manifest["outputs"]["link"]
    manifest["outputs"][str(victim)] = {"kind": "features"}
    (done["dir"] / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run(extract, argv, capsys)
    one_line_error(code, err, "extract.py")
    assert (victim / "precious.txt").read_text() == "keep me"


def test_failed_overwrite_on_a_full_disk_keeps_the_earlier_results(done, monkeypatch, capsys):
    before = snapshot(done["dir"])
    real = os.pwrite

    def full(fd, data, offset):
        real(fd, data[:1], offset)  # some bytes went out, then the disk filled (pwrite names no file)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)  # the merge writes the features files with pwrite
    argv = [a if a != "4" else "3" for a in done["argv"]] + ["--overwrite"]
    code, _, err = run(extract, argv, capsys)
    line = one_line_error(code, err, "extract.py")
    assert "No space left on device" in line and "features.npy" in line
    assert {k: v for k, v in snapshot(done["dir"]).items() if not k.startswith(".partial")} == before


def test_a_late_check_failing_under_overwrite_keeps_the_earlier_results(tmp_path, capsys):
    data = tmp_path / "d"
    make_pairs(data, 5)
    argv = ["-d", data, "-s", tmp_path / "o", *TINY]
    assert run(extract, argv + ["-p", "adapt-pca", "4"], capsys)[0] == 0
    before = snapshot(tmp_path / "o" / "tiny_rn")
    for i in range(3):  # three pairs become unreadable: 2 pairs x 2 sides = 4 rows < 8 components
        (data / "left" / f"pair{i:03d}.png").write_bytes(b"not an image")
    code, _, err = run(extract, argv + ["-p", "adapt-pca", "8", "--overwrite"], capsys)
    assert code == 2 and "Traceback" not in err
    assert {k: v for k, v in snapshot(tmp_path / "o" / "tiny_rn").items() if not k.startswith(".partial")} == before


# --- "already done" only when the outputs are what the manifest says -------------------------------

@pytest.mark.parametrize("damage", ["truncate", "delete", "flip a byte"])
def test_damaged_output_is_rebuilt_not_reported_done(done, capsys, damage):
    target = done["dir"] / "features_pca4.npy"
    good = target.read_bytes()
    manifest = json.loads((done["dir"] / "manifest.json").read_text())
    assert manifest["outputs"]["features_pca4.npy"]["sha256"] == hashlib.sha256(good).hexdigest()
    if damage == "truncate":
        target.write_bytes(good[:100])
    elif damage == "delete":
        target.unlink()
    else:
        target.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    code, out, err = run(extract, done["argv"], capsys)
    assert code == 0 and "already done" not in out and "not intact" in err
    assert target.read_bytes() == good


# --- a damaged chunk in .partial ------------------------------------------------------------------

@pytest.mark.parametrize("damage", [b"", b"PK\x03\x04garbage", None])
def test_damaged_partial_chunk_is_detected_and_reextracted(tmp_path, pairs_dir, tiny_backbone, monkeypatch, capsys,
                                                           damage):
    from featuresExtractor.extractor import Forwarder
    from featuresExtractor.pipeline import ExtractConfig, extract as run_extract

    cfg = dict(dataset=str(pairs_dir), processor=("adapt",), progress=False, batch_size=2, workers=0)
    run_extract(ExtractConfig(save_to=str(tmp_path / "ref"), **cfg), tiny_backbone)
    calls = {"n": 0}
    real = Forwarder.__call__

    def flaky(self, images):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, images)

    monkeypatch.setattr(Forwarder, "__call__", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_extract(ExtractConfig(save_to=str(tmp_path / "o"), **cfg), tiny_backbone)
    monkeypatch.setattr(Forwarder, "__call__", real)
    chunks = sorted((tmp_path / "o" / "tiny_rn" / ".partial").glob("chunk_*.npz"))
    assert len(chunks) == 2
    if damage is None:  # a whole archive with the wrong contents: a part of the wrong length
        with np.load(chunks[0]) as z:
            arrays = dict(z)
        arrays["part_0"] = arrays["part_0"][:0]
        with open(chunks[0], "wb") as fh:
            np.savez(fh, **arrays)
    else:
        chunks[0].write_bytes(damage)
    report = run_extract(ExtractConfig(save_to=str(tmp_path / "o"), **cfg), tiny_backbone)
    assert "was damaged" in capsys.readouterr().err
    assert report.resumed_items == 1 and report.n_kept == 5  # one item per chunk: the damaged one is redone
    a, b = (np.load(tmp_path / x / "tiny_rn" / "features.npy") for x in ("ref", "o"))
    np.testing.assert_allclose(a["left"], b["left"], rtol=1e-5, atol=1e-6)


# --- operating-system errors ----------------------------------------------------------------------

def _no_model(monkeypatch):
    import featuresExtractor.backbones as models

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the output location was checked")

    monkeypatch.setattr(models, "load_backbone", boom)


def _read_only(monkeypatch):
    import tempfile

    def refuse(*a, **k):  # the tests run as root, for whom chmod does not block writes
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), k.get("dir"))

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)


def test_extract_checks_the_output_location_before_the_model_loads(tmp_path, pairs_dir, monkeypatch, capsys):
    _no_model(monkeypatch)
    (tmp_path / "file").write_text("x")
    code, _, err = run(extract, ["-d", pairs_dir, "-s", tmp_path / "file" / "sub", "-p", "adapt", *TINY], capsys)
    assert "is a file, not a folder" in one_line_error(code, err, "extract.py")
    _read_only(monkeypatch)
    code, _, err = run(extract, ["-d", pairs_dir, "-s", tmp_path / "ro", "-p", "adapt", *TINY], capsys)
    assert "Read-only file system" in one_line_error(code, err, "extract.py")
    assert not (tmp_path / "ro").exists()


def test_train_read_only_or_file_in_the_way_is_one_line(tmp_path, monkeypatch, capsys):
    # (a full disk while saving: test_train_checkpoint_write_failing_in_the_kernel_is_one_line)
    from synthetic.planted import planted_array

    np.save(tmp_path / "f.npy", planted_array(40, 8, seed=0))
    _read_only(monkeypatch)
    code, _, err = run(train, ["-d", tmp_path / "f.npy", "-s", tmp_path / "runs", "-e", "2"], capsys)
    assert "Read-only file system" in one_line_error(code, err, "train.py")
    (tmp_path / "file").write_text("x")
    monkeypatch.undo()
    code, _, err = run(train, ["-d", tmp_path / "f.npy", "-s", tmp_path / "file" / "runs", "-e", "2"], capsys)
    assert "is a file, not a folder" in one_line_error(code, err, "train.py")


def _file_size_limit(limit: int):
    """A child process whose writes past `limit` bytes fail in the kernel (EFBIG), as a full disk's do (ENOSPC),
    without root or a mount; Python ignores SIGXFSZ, so the write returns the error instead of killing it."""
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_train_checkpoint_write_failing_in_the_kernel_is_one_line(tmp_path):
    # A real failed write, not a faked torch.save: torch.save into an open file reported it as
    # "RuntimeError: [enforce fail at inline_container.cc] unexpected pos" with a traceback, exit 1.
    from synthetic.planted import planted_array

    np.save(tmp_path / "f.npy", planted_array(40, 64, seed=0))  # a checkpoint of about 50 kB, over the limit
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "-d", str(tmp_path / "f.npy"), "-s",
                           str(tmp_path / "runs"), "-e", "2", "--no-images", "--cpu"], capture_output=True, text=True,
                          preexec_fn=_file_size_limit(20_000), timeout=300)
    line = one_line_error(proc.returncode, proc.stderr, "train.py")
    assert "model_and_optimizer.pt: File too large" in line
    assert not (tmp_path / "runs").exists()


def test_train_full_disk_under_tensorboard_is_one_line_naming_the_run_folder(tmp_path, monkeypatch, capsys):
    # TensorBoard writes its events from a thread of its own: the error must still be one line, with no
    # thread traceback, and leave no run behind.
    from tensorboard.summary.writer import record_writer

    from synthetic.planted import planted_array

    np.save(tmp_path / "f.npy", planted_array(40, 8, seed=0))
    real, calls = record_writer.RecordWriter.write, []

    def fills_up(self, data):
        calls.append(len(data))
        if len(calls) > 20:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(record_writer.RecordWriter, "write", fills_up)
    code, _, err = run(train, ["-d", tmp_path / "f.npy", "-s", tmp_path / "runs", "-e", "40", "--no-images"], capsys)
    line = one_line_error(code, err, "train.py")
    assert len(calls) > 20 and "No space left on device" in line and "run1" in line
    assert "Exception in thread" not in err
    assert not (tmp_path / "runs").exists()


def test_os_errors_raised_late_are_one_line_naming_the_path(capsys):
    def fails():
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/some/out/file.npy")

    code = run_cli(lambda argv: fails(), [], prog="x.py")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "/some/out/file.npy: Permission denied" in err


# --- JSON with the right syntax and the wrong shape -------------------------------------------------

@pytest.mark.parametrize("content", ["[]", '"text"', '{"config": [], "outputs": {}}', '{"outputs": {}}',
                                     '{"config": {}, "outputs": {"features.npy": 3}, "processor": {}}'])
def test_manifest_of_the_wrong_shape_is_one_line(done, capsys, content):
    (done["dir"] / "manifest.json").write_text(content)
    code, _, err = run(extract, done["argv"], capsys)
    assert "manifest.json" in one_line_error(code, err, "extract.py")


def test_partial_config_of_the_wrong_shape_is_one_line(tmp_path, pairs_dir, capsys):
    partial = tmp_path / "o" / "tiny_rn" / ".partial"
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("[1, 2]")
    code, _, err = run(extract, ["-d", pairs_dir, "-s", tmp_path / "o", "-p", "adapt", *TINY], capsys)
    assert "config.json" in one_line_error(code, err, "extract.py")


# --- values that pass argparse and failed later -------------------------------------------------------

@pytest.mark.parametrize("device", ["gpu", "cuda:99", "cuda", "meta", "cpu:x"])
def test_unknown_device_is_refused_before_the_model_loads(tmp_path, pairs_dir, monkeypatch, capsys, device):
    _no_model(monkeypatch)
    code, _, err = run(extract, ["-d", pairs_dir, "-s", tmp_path / "o", "--device", device, *TINY], capsys)
    assert "--device" in one_line_error(code, err, "extract.py")
    code, _, err = run(similarity, ["--device", device, "--run", tmp_path, "pair", "a", "b"], capsys)
    assert "--device" in one_line_error(code, err, "similarity.py")


@pytest.mark.parametrize("content", [b"", b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json", b"\xff" * 64])
def test_damaged_safetensors_is_one_line(tmp_path, pairs_dir, capsys, content):
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(content)
    code, _, err = run(extract, ["-d", pairs_dir, "-s", tmp_path / "o", "--weights", bad, *TINY], capsys)
    assert "w.safetensors" in one_line_error(code, err, "extract.py")


def test_non_utf8_file_name_is_one_line(tmp_path, capsys):
    folder = tmp_path / "flat"
    draw_image(folder / "ok.png", 0)
    draw_image(Path(os.fsdecode(bytes(folder) + b"/caf\xe9.png")), 1)
    code, _, err = run(extract, ["-d", folder, "-s", tmp_path / "o", "-p", "adapt", *TINY], capsys)
    assert "not valid UTF-8" in one_line_error(code, err, "extract.py")


def test_fifo_as_features_file_does_not_hang(tmp_path):
    fifo = tmp_path / "features.npy"
    os.mkfifo(fifo)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "train.py", "-d", str(fifo), "-s", str(tmp_path / "runs")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not a regular file" in proc.stderr and "Traceback" not in proc.stderr
    assert time.monotonic() - start < 120


def test_checkpoint_whose_config_is_not_a_dict_is_one_line(tmp_path, capsys):
    import torch

    from synthetic.planted import planted_array

    np.save(tmp_path / "f.npy", planted_array(40, 8, seed=0))
    assert run(train, ["-d", tmp_path / "f.npy", "-s", tmp_path / "runs", "-e", "1", "--no-images"], capsys)[0] == 0
    path = tmp_path / "runs" / "run1" / "model_and_optimizer.pt"
    good = path.read_bytes()
    for key, value in [("config", ["not", "a", "dict"]), ("in_dim", "8"), ("test_names", [1, 2])]:
        path.write_bytes(good)
        ckpt = torch.load(path, weights_only=True)
        ckpt[key] = value
        torch.save(ckpt, path)
        code, _, err = run(similarity, ["--run", tmp_path / "runs" / "run1", "pair", "a.png", "b.png"], capsys)
        assert key in one_line_error(code, err, "similarity.py")


def test_gallery_vectors_of_the_wrong_dimension(tmp_path, capsys):
    data = tmp_path / "tll"
    make_pairs(data, 8)
    assert run(extract, ["-d", data, "-s", tmp_path / "feats", "-p", "adapt", *TINY], capsys)[0] == 0
    feats = tmp_path / "feats" / "tiny_rn" / "features.npy"
    assert run(train, ["-d", feats, "-s", tmp_path / "runs", "-e", "1", "-k", "1", "--no-images"], capsys)[0] == 0
    gallery = tmp_path / "gallery"
    for i in range(3):
        draw_image(gallery / f"g{i}.png", 50 + i)
    assert run(extract, ["-d", gallery, "-s", tmp_path / "gfeats", "-p", "adapt", *TINY], capsys)[0] == 0
    gfile = tmp_path / "gfeats" / "tiny_rn" / "features.npy"
    rec = np.load(gfile)
    narrow = np.zeros(len(rec), dtype=[("name", rec.dtype["name"]), ("augmented", "?"), ("feature", "<f4", (7,))])
    narrow["name"], narrow["augmented"] = rec["name"], rec["augmented"]
    np.save(gfile, narrow)
    # The manifest made to agree with the file (an edited file it does not describe is refused earlier, by its
    # sha256: tests/test_provenance.py), so that what is left to refuse is the vectors' width
    manifest = gfile.parent / "manifest.json"
    record = json.loads(manifest.read_text())
    record["outputs"]["features.npy"].update(sha256=file_sha256(gfile), size=gfile.stat().st_size)
    manifest.write_text(json.dumps(record))
    code, _, err = run(similarity, ["--run", tmp_path / "runs" / "run1", "search", draw_image(tmp_path / "q.png", 9),
                                    "--gallery", gfile, "-k", "2"], capsys)
    assert "7-d vectors" in one_line_error(code, err, "similarity.py")


def test_swap_never_removes_a_replaced_path_outside_the_folder(tmp_path):
    from featuresExtractor.manifest import MANIFEST, swap_in

    out, staged = tmp_path / "out", tmp_path / "out" / ".partial" / "staged"
    staged.mkdir(parents=True)
    (staged / "features.npy").write_bytes(b"new")
    (staged / MANIFEST).write_text("{}")
    (tmp_path / "victim").write_text("keep me")
    swap_in(out, staged, out / ".partial" / "raw", {"features.npy": {}}, ["../victim", str(tmp_path / "victim"), ""])
    assert (tmp_path / "victim").read_text() == "keep me" and (out / "features.npy").read_bytes() == b"new"


def test_similarity_checks_the_html_location_before_the_model_loads(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    draw_image(tmp_path / "q.png", 1)
    argv = ["--run", tmp_path / "no-run", "search", tmp_path / "q.png", "--gallery", tmp_path, "--html"]
    code, _, err = run(similarity, argv + [tmp_path / "file" / "page.html"], capsys)
    assert "is a file, not a folder" in one_line_error(code, err, "similarity.py")
    code, _, err = run(similarity, argv + [tmp_path], capsys)
    assert "is a folder" in one_line_error(code, err, "similarity.py")


@pytest.mark.parametrize("damage", [
    lambda m: m["outputs"]["features.npy"].pop("dim"),
    lambda m: m["model"]["taps"][0].pop("pooled_dim"),
    lambda m: m["processor"].pop("n_components"),
    lambda m: m.update(precision=7),
    lambda m: m["model"].update(weights={"source": "file"}),
    lambda m: m.update(dataset=[]),
    lambda m: m["processor"].update(name="weird"),  # was a ValueError traceback, exit 1
    lambda m: m["processor"].update(name="adapt-pca"),  # adapt-pca without n_components
])
def test_similarity_reads_a_manifest_of_the_wrong_shape_as_one_line(tmp_path, capsys, damage):
    data = tmp_path / "tll"
    make_pairs(data, 8)
    assert run(extract, ["-d", data, "-s", tmp_path / "feats", "-p", "adapt", *TINY], capsys)[0] == 0
    feats = tmp_path / "feats" / "tiny_rn" / "features.npy"
    assert run(train, ["-d", feats, "-s", tmp_path / "runs", "-e", "1", "-k", "1", "--no-images"], capsys)[0] == 0
    path = tmp_path / "feats" / "tiny_rn" / "manifest.json"
    manifest = json.loads(path.read_text())
    damage(manifest)
    path.write_text(json.dumps(manifest))
    code, _, err = run(similarity, ["--run", tmp_path / "runs" / "run1", "pair", draw_image(tmp_path / "a.png", 1),
                                    draw_image(tmp_path / "b.png", 2)], capsys)
    assert "manifest.json" in one_line_error(code, err, "similarity.py")


def test_non_utf8_path_arguments_are_one_line_before_anything_runs(tmp_path, pairs_dir, monkeypatch, capsys):
    _no_model(monkeypatch)
    odd = os.fsdecode(bytes(tmp_path) + b"/out\xe9")
    code, _, err = run(extract, ["-d", pairs_dir, "-s", odd, *TINY], capsys)
    assert "not valid UTF-8" in one_line_error(code, err, "extract.py")
    code, _, err = run(train, ["-d", odd, "-s", tmp_path / "runs"], capsys)
    assert "not valid UTF-8" in one_line_error(code, err, "train.py")
    code, _, err = run(similarity, ["--run", tmp_path, "search", odd, "--gallery", tmp_path], capsys)
    assert "not valid UTF-8" in one_line_error(code, err, "similarity.py")
    assert not os.path.exists(odd) and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("stop_at", ["moving the earlier runs aside", "after writing a run of the same name"])
def test_replacing_interrupted_at_any_point_puts_every_earlier_run_back(tmp_path, monkeypatch, stop_at):
    from adaptation.runs import ASIDE, replacing

    save_to = tmp_path / "runs"
    for name in ("run1", "run2", "run3"):
        (save_to / name).mkdir(parents=True)
        (save_to / name / "metrics.json").write_text(f"earlier {name}")
    (save_to / "summary.json").write_text("earlier summary")
    before = snapshot(save_to)
    old = sorted(p for p in save_to.iterdir())
    real_rename, moves = Path.rename, []

    def rename(self, target):
        moves.append(self.name)
        if stop_at.startswith("moving") and len(moves) == 2:
            raise KeyboardInterrupt  # Ctrl-C (or SIGTERM as Terminated) between two moves
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        with replacing(save_to, old):
            (save_to / "run1").mkdir()
            (save_to / "run1" / "metrics.json").write_text("half-written new run1")
            raise KeyboardInterrupt
    monkeypatch.undo()
    assert snapshot(save_to) == before and not (save_to / ASIDE).exists()
