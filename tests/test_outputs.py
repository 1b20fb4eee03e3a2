"""Outputs (``megaemb/outputs.py``): one job per output at a time (a lock a dead job cannot
leave stuck), ``export --overwrite`` never deletes files megaemb did not write, and a full disk
ends in one line with no temporary file left."""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from test_inputs import DATA, ROOT, SFT, megaemb, one_error

from megaemb import outputs, preflight

HOLD = """import sys, time
from megaemb import outputs, preflight
with outputs.owned(sys.argv[1], sys.argv[2] == "inside", "x", "megaemb sft"):
    print("held", flush=True)
    time.sleep(120)
"""


def _holder(path, inside=False):
    """A process holding ``path``'s lock (as a running job does), started once it holds it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), "inside" if inside else "beside"],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline() == "held\n"
    return proc


def _stop(proc):
    proc.kill()
    proc.wait(10)


@pytest.mark.timeout(300)
def test_second_sft_on_one_save_stops_naming_the_first(tiny_models, tmp_path):
    """Two ``sft`` runs started at once on one ``--save`` (a resubmitted Slurm job): the first
    runs to the end, the second stops with one line naming the first's host, pid and start."""
    save = tmp_path / "run"
    args = ["sft", "--model", tiny_models["dense"], "--dataset", f"{DATA}#64", *SFT, "--save", str(save)]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    for k in ("NPROC_PER_NODE", "LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT", "NNODES"):
        env.pop(k, None)
    first = subprocess.Popen([sys.executable, "-m", "megaemb.cli", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        lock = save / outputs.LOCK_NAME
        deadline = time.time() + 120
        while first.poll() is None and not lock.exists() and time.time() < deadline:
            time.sleep(0.05)
        assert lock.exists(), "the first run holds no lock on its --save"
        line = one_error(megaemb(*args), "sft", f"--save {save}: in use by megaemb sft (host "
                         f"{socket.gethostname()}, pid {first.pid}, started ")
        assert "delete" not in line  # a live holder on this host: nothing to break
        out, err = first.communicate(timeout=240)
        assert first.returncode == 0, err[-3000:]
        assert "done" in out and not lock.exists()  # released at the end
    finally:
        first.kill()


@pytest.mark.timeout(300)
def test_export_embed_eval_mine_refuse_an_output_in_use(tiny_models, tmp_path):
    dense = tiny_models["dense"]
    texts = tmp_path / "t.txt"
    texts.write_text("hello\n")
    cases = {
        "export": ("--output_dir", tmp_path / "mcore", ["--model", dense, "--to_mcore", "true"]),
        "embed": ("--output", tmp_path / "e.npy", ["--model", dense, "--input", str(texts)]),
        "eval": ("--output", tmp_path / "m.json", ["--model", dense, "--dataset", DATA]),
        "mine": ("--output", tmp_path / "n.jsonl", ["--model", dense, "--dataset", DATA]),
    }
    for command, (flag, path, rest) in cases.items():
        holder = _holder(path)
        try:
            one_error(megaemb(command, *rest, flag, str(path)), command,
                      f"{flag} {path}: in use by megaemb sft (host {socket.gethostname()}, pid {holder.pid}")
            assert not os.path.exists(path)
        finally:
            _stop(holder)


@pytest.mark.timeout(300)
def test_lock_of_a_killed_job_is_taken_over_with_a_note(tiny_models, tmp_path):
    out = tmp_path / "e.npy"
    holder = _holder(out)
    holder.send_signal(signal.SIGKILL)  # no clean-up: the lock stays
    holder.wait(10)
    assert (tmp_path / "e.npy.lock").exists()
    texts = tmp_path / "t.txt"
    texts.write_text("hello\n")
    r = megaemb("embed", "--model", tiny_models["dense"], "--input", str(texts), "--output", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (f"megaemb embed: note: --output {out}: taking over the lock of megaemb sft (host "
            f"{socket.gethostname()}, pid {holder.pid}") in r.stderr, r.stderr[-3000:]
    assert out.exists() and not (tmp_path / "e.npy.lock").exists()


def _record(**changes):
    return {**outputs.this_process("megaemb sft"), **changes}


def test_lock_liveness(tmp_path):
    """Refused: a live holder here, a holder on another host (never broken: its liveness is
    unknown here), an unreadable lock. Taken over: a dead pid, or a reused one (start time)."""
    lock = str(tmp_path / "out.lock")
    notes = []

    def attempt(holder):
        with open(lock, "w") as f:
            f.write(holder if isinstance(holder, str) else json.dumps(holder))
        notes.clear()
        outputs.acquire(lock, _record(command="megaemb embed"), "--output out", notes.append)
        with open(lock) as f:
            assert json.load(f)["command"] == "megaemb embed"
        assert len(notes) == 1 and "taking over the lock" in notes[0]

    for holder, message in [(_record(), f"in use by megaemb sft \\(host {socket.gethostname()}"),
                            (_record(host="node-7", pid=1), "host node-7, pid 1.*if that job is dead, delete"),
                            ("", "unknown job .*delete")]:
        with pytest.raises(FileExistsError, match=message):
            attempt(holder)
        assert not notes
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    attempt(_record(pid=dead.pid))
    attempt(_record(created=_record()["created"] - 3600))  # our pid, another process's start
    outputs.release(lock, _record(pid=1))  # not the holder: nothing released
    assert os.path.exists(lock)


@pytest.mark.timeout(300)
def test_export_overwrite_keeps_files_megaemb_did_not_write(tiny_models, tmp_path):
    dense, out = tiny_models["dense"], tmp_path / "mcore"
    export = ("export", "--model", dense, "--to_mcore", "true", "--output_dir", str(out), "--overwrite", "true")
    r = megaemb(*export)
    assert r.returncode == 0, r.stderr[-3000:]
    (out / "notes.txt").write_text("mine")
    one_error(megaemb(*export), "export", f"--output_dir {out}: holds notes.txt, not written by megaemb export")
    assert (out / "notes.txt").read_text() == "mine" and (out / "megaemb.json").exists()
    (out / "notes.txt").unlink()
    r = megaemb(*export)  # its own export: replaced
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((out / outputs.MANIFEST).read_text())
    assert manifest["files"] == sorted(
        os.path.relpath(os.path.join(root, n), out) for root, _, names in os.walk(out) for n in names
        if n != outputs.MANIFEST)
    plain = tmp_path / "mine"  # a user's folder: never megaemb's to replace
    plain.mkdir()
    (plain / "data.csv").write_text("1")
    with pytest.raises(FileExistsError, match="holds data.csv, not written by megaemb export"):
        preflight.check_export_dirs(dense, str(plain), "--model", overwrite=True)


@pytest.mark.timeout(30)
def test_overwrite_refuses_a_user_file_inside_an_exports_subfolder(tmp_path):
    """The manifest lists every file, nested ones too: a user's file put into a subfolder the
    export wrote (``1_Pooling/mine.txt``) is refused by name, not deleted with the folder."""
    out = tmp_path / "hf1"
    (out / "1_Pooling").mkdir(parents=True)
    (out / "1_Pooling" / "config.json").write_text("{}")
    (out / "model.safetensors").write_text("w")
    outputs.write_manifest(str(out))
    outputs.check_replaceable(str(out), "--output_dir")  # all its own: replaceable
    (out / "1_Pooling" / "mine.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="holds 1_Pooling/mine.txt, not written by megaemb export"):
        outputs.check_replaceable(str(out), "--output_dir")
    for i in range(6):
        (out / "1_Pooling" / f"more{i}.txt").write_text("x")
    with pytest.raises(FileExistsError, match=r"holds 1_Pooling/mine.txt, 1_Pooling/more0.txt, .* and 2 more, not"):
        outputs.check_replaceable(str(out), "--output_dir")
    assert (out / "1_Pooling" / "mine.txt").read_text() == "precious"


def test_export_staging_folder_of_a_user_is_not_deleted(tmp_path):
    """``export`` builds in ``<output_dir>.tmp``: it removes one that an export left (killed),
    never a user's folder of that name."""
    from megaemb import export

    out, staging = tmp_path / "hf", tmp_path / "hf.tmp"
    staging.mkdir()
    (staging / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=f"{staging}: exists and is not an unfinished megaemb export"):
        export._prepare(str(out), overwrite=False)
    assert (staging / "notes.txt").read_text() == "mine"
    (staging / "notes.txt").unlink()
    assert export._prepare(str(out), overwrite=False) == str(staging)  # empty: its own leftover
    (staging / "shard.part").write_text("killed here")
    export._prepare(str(out), overwrite=False)  # marked as megaemb's: replaced
    assert os.listdir(staging) == [outputs.MANIFEST]


FULL_DISK = """import errno, sys, numpy
def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")
numpy.save = full
from megaemb.cli import main
sys.exit(main())
"""


@pytest.mark.timeout(300)
def test_embed_on_a_full_disk_is_one_line_and_leaves_no_temp_file(tiny_models, tmp_path):
    texts, out = tmp_path / "t.txt", tmp_path / "out" / "e.npy"
    texts.write_text("hello\n")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    for k in ("NPROC_PER_NODE", "LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT", "NNODES"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-c", FULL_DISK, "embed", "--model", tiny_models["dense"],
                        "--input", str(texts), "--output", str(out)], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=280)
    one_error(r, "embed", f"writing {out}: No space left on device")
    assert os.listdir(out.parent) == []  # no e.npy, no e.npy.tmp*, no lock


FULL_SAFETENSORS = """import safetensors.torch
def full(tensors, path, metadata=None):  # as safetensors' Rust writer reports ENOSPC
    raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")
safetensors.torch.save_file = full
"""


@pytest.mark.timeout(300)
def test_sft_whose_hf_export_hits_a_full_disk_is_one_line(tiny_models, tmp_path):
    """The end-of-run export (a child ``megaemb export``) fails in safetensors' writer: one
    line for the job, no half-written export, the checkpoint kept."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(FULL_SAFETENSORS)
    save = tmp_path / "run"
    r = megaemb("sft", "--model", tiny_models["dense"], "--dataset", f"{DATA}#64", *SFT, "--save", str(save),
                env={"PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), ROOT])}, timeout=280)
    one_error(r, "sft", f"HF export to {save}/hf_model: No space left on device (free space, or write elsewhere)")
    assert sorted(os.listdir(save)) == ["curves.png", "hf", "iter_0000001", "latest_checkpointed_iteration.txt",
                                        "megaemb-run.txt", "megaemb.json", "tensorboard"]


def test_full_disk_anywhere_in_a_chain_is_one_line(tmp_path, monkeypatch, capsys):
    """A quota hit inside a library (wrapped in another error) still ends in one line; an
    atomic write that fails keeps the old file and leaves no temporary one."""
    import argparse

    from megaemb import cli

    def save():
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded", "/ckpt/iter_0000002.tmp/0.distcp")
        except OSError as e:
            raise RuntimeError("checkpoint writer failed") from e

    monkeypatch.setitem(cli.COMMANDS, "sft", lambda args: save())
    assert cli.run_command(argparse.Namespace(command="sft")) == 2
    assert capsys.readouterr().err == ("megaemb sft: error: writing /ckpt/iter_0000002.tmp/0.distcp: "
                                       "Disk quota exceeded (free space, or write elsewhere)\n")
    monkeypatch.setitem(cli.COMMANDS, "sft", lambda args: 1 / 0)  # not a user error: raised
    with pytest.raises(ZeroDivisionError):
        cli.run_command(argparse.Namespace(command="sft"))
    path = tmp_path / "metrics.json"
    path.write_text("old")
    with pytest.raises(OSError) as e, outputs.atomic_file(str(path)) as f:
        f.write("new")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert e.value.filename == str(path) and path.read_text() == "old"
    assert os.listdir(tmp_path) == ["metrics.json"]
    rust = Exception("Error while serializing: I/O error: Disk quota exceeded (os error 122)")
    assert outputs.disk_full(rust).errno == errno.EDQUOT
    assert outputs.disk_full(Exception("I/O error: File too large (os error 27)")) is None


@pytest.mark.timeout(120)
def test_a_failed_sft_leaves_no_empty_save_it_created(tiny_models, tmp_path):
    """An sft that stops before writing anything (a bad data file) removes the --save it
    created; a --save that existed stays, and so does the user's file in it."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q"}\n')
    new, existing = tmp_path / "new" / "run", tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    for save in (new, existing):
        one_error(megaemb("sft", "--model", tiny_models["dense"], "--dataset", str(bad), *SFT,
                          "--save", str(save)), "sft", f"{bad}:1: field 'response'")
    assert not (tmp_path / "new").exists()  # with the parent it made
    assert sorted(os.listdir(existing)) == ["notes.txt"]
    with outputs.owned(str(existing / "empty"), True, "--save x", "megaemb sft"):
        (existing / "empty" / "ckpt").write_text("saved")
    assert (existing / "empty" / "ckpt").read_text() == "saved"  # a job that wrote: kept
