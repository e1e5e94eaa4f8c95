"""Checkpoint files: atomic writes that survive crashes and full disks, reads that run no code."""

from __future__ import annotations

import copy
import datetime
import errno
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, signal_when

import byol.core.checkpoint as ckpt
from byol.core.backbone import Encoder
from byol.core.checkpoint import (
    atomic_torch_save,
    atomic_write_bytes,
    load_encoder,
    remove_stale_temp_files,
    safe_load,
    save_encoder,
)
from byol.core.errors import CheckpointError
from byol.lightning.checkpoint_io import AtomicCheckpointIO


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(ckpt.TEMP_SUFFIX))


# --------------------------------------------------------------------------- atomic writes


def test_write_replaces_the_file_with_usual_permissions(tmp_path):
    path = tmp_path / "a.ckpt"
    atomic_torch_save({"w": torch.arange(3)}, path)
    atomic_torch_save({"w": torch.arange(5)}, path)
    assert torch.equal(safe_load(path)["w"], torch.arange(5))
    assert leftovers(tmp_path) == []
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600


def test_crash_midway_keeps_previous_file_and_no_temp(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": torch.tensor(1)}, path)
    before = path.read_bytes()

    def half_then_crash(f):
        f.write(b"x" * 1000)  # part of the new file is on disk...
        raise RuntimeError("process dies here")  # ...when the writer fails

    with pytest.raises(RuntimeError, match="process dies here"):
        ckpt.atomic_write(path, half_then_crash)
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_keyboard_interrupt_midway_keeps_previous_file(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_write_bytes(b"old", path)

    def interrupted(f):
        f.write(b"new, half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_write(path, interrupted)
    assert path.read_bytes() == b"old" and leftovers(tmp_path) == []


def test_failing_rename_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_write_bytes(b"old", path)

    def failing_replace(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(ckpt.os, "replace", failing_replace)
    with pytest.raises(CheckpointError, match="previous file, if any, is intact"):
        atomic_write_bytes(b"new", path)
    assert path.read_bytes() == b"old" and leftovers(tmp_path) == []


def test_disk_full_is_a_clear_error_and_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    atomic_torch_save({"w": torch.ones(4)}, path)
    before = path.read_bytes()

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt.os, "fsync", no_space)
    with pytest.raises(CheckpointError) as err:
        atomic_torch_save({"w": torch.zeros(1000)}, path)
    message = str(err.value)
    assert str(path) in message and "No space left on device" in message and "disk is full" in message
    assert "\n" not in message
    monkeypatch.undo()
    assert path.read_bytes() == before and torch.equal(safe_load(path)["w"], torch.ones(4))
    assert leftovers(path.parent) == []


def test_lightning_checkpoint_io_is_atomic(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 3}, path)

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt.os, "fsync", no_space)
    with pytest.raises(CheckpointError):
        io.save_checkpoint({"global_step": 4}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["global_step"] == 3 and leftovers(tmp_path) == []


WRITER = """
import sys, time
from pathlib import Path
from byol.core.checkpoint import atomic_write
path, ready = Path(sys.argv[1]), Path(sys.argv[2])
def slow(f):
    for i in range(10_000):
        f.write(b"n" * 100_000)
        f.flush()
        if i == 20:
            ready.touch()  # 2 MB of the new file written; the test kills us now
        time.sleep(0.01)
atomic_write(path, slow)
"""


def test_sigkill_during_a_write_keeps_previous_file(tmp_path):
    """A real process killed with SIGKILL mid-write: the old file is whole; the orphaned
    temporary file is what :func:`remove_stale_temp_files` (run at every start) deletes."""
    path, ready = tmp_path / "last.ckpt", tmp_path / "ready"
    atomic_write_bytes(b"old checkpoint", path)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(ready)], cwd=ROOT)

    def writing():
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "writer did not start"
            time.sleep(0.02)

    signal_when(proc, writing, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert path.read_bytes() == b"old checkpoint"
    stale = leftovers(tmp_path)
    assert len(stale) == 1 and os.path.getsize(tmp_path / stale[0]) >= 2_000_000
    assert [p.name for p in remove_stale_temp_files(tmp_path)] == stale
    assert leftovers(tmp_path) == [] and path.read_bytes() == b"old checkpoint"


# --------------------------------------------------------------------------- safe loading


class Payload:
    """Unpickling this creates ``target``: what a malicious checkpoint would do."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def malicious_checkpoint(path: Path, target: Path, **extra) -> Path:
    torch.save({"state_dict": {"w": torch.ones(2)}, "byol_config": Payload(target), **extra}, path)
    return path


def test_payload_really_runs_code_without_weights_only(tmp_path):
    """Control for the tests below: the crafted file does execute code under a plain load."""
    target = tmp_path / "pwned"
    path = malicious_checkpoint(tmp_path / "evil.ckpt", target)
    torch.load(path, weights_only=False)
    assert target.exists()


def test_safe_load_refuses_code_and_runs_nothing(tmp_path):
    target = tmp_path / "pwned"
    path = malicious_checkpoint(tmp_path / "evil.ckpt", target)
    with pytest.raises(CheckpointError) as err:
        safe_load(path)
    assert f"refusing to load '{path}'" in str(err.value) and "could run code" in str(err.value)
    assert not target.exists()
    with pytest.raises(CheckpointError, match="refusing to load"):
        AtomicCheckpointIO().load_checkpoint(path)  # what Lightning calls on resume
    assert not target.exists()


def test_load_encoder_refuses_code(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "encoder.pt"
    torch.save({"format": ckpt.ENCODER_FORMAT, "version": 1, "backbone": {"name": "resnet18"},
                "state_dict": {}, "meta": Payload(target)}, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_encoder(path)
    assert not target.exists()


def test_corrupt_and_missing_files_are_clear_errors(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:500])  # truncated, as by a copy cut short
    with pytest.raises(CheckpointError, match="corrupt, truncated or not a PyTorch file"):
        safe_load(path)
    # a file of another kind handed over by mistake (pretrained=RUN/config.yaml): said so, with what lies beside
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(CheckpointError) as error:
        safe_load(tmp_path / "config.yaml")
    assert str(error.value) == (f"'{tmp_path / 'config.yaml'}' is not a PyTorch file (a checkpoint or an encoder "
                                f"export); PyTorch files beside it: {path}")
    (tmp_path / "notes.txt").write_text("")  # empty
    with pytest.raises(CheckpointError, match="is not a PyTorch file"):
        safe_load(tmp_path / "notes.txt")
    (tmp_path / "damaged.ckpt").write_text("hello")  # a checkpoint by its name: damaged, not misnamed
    with pytest.raises(CheckpointError, match="corrupt, truncated or not a PyTorch file"):
        safe_load(tmp_path / "damaged.ckpt")
    with pytest.raises(CheckpointError, match="does not exist"):
        safe_load(tmp_path / "nope.ckpt")
    with pytest.raises(CheckpointError, match="is a folder"):
        safe_load(tmp_path)


class BlockedGlobal:
    """Unpickled, it would call os.getcwd (harmless): a global of a module torch blocks (posix)."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_a_refusal_names_what_was_blocked_and_never_quotes_torchs_advice(tmp_path):
    """torch 2.14's refusal begins with a banner that ends, 200 characters in, on the advice to re-run with
    weights_only=False: the error named neither the blocked global nor the risk. It now names the global torch
    gives (its 2.14 wording for a blocked module, and the other for a global not allowed) in its own words."""
    blocked = ((BlockedGlobal(), f"{os.getcwd.__module__}.getcwd"), (datetime.date(2020, 1, 1), "datetime.date"))
    for obj, name in blocked:
        path = tmp_path / "encoder.pt"
        torch.save({"meta": obj}, path)
        with pytest.raises(CheckpointError) as err:
            safe_load(path)
        assert str(err.value) == (
            f"refusing to load '{path}': it refers to {name} (a Python function or class), not only to tensors and "
            f"plain containers, so unpickling it could run code (or the file is damaged). Nothing was executed. "
            f"Only load checkpoints written by this project, or re-save the weights as a plain state_dict")
    # a protocol-0 pickle begins with the global's name, not a protocol byte: it read "neither a zip nor a pickle"
    marker = tmp_path / "pwned"
    plain = tmp_path / "p0.pt"
    plain.write_bytes(pickle.dumps(Payload(marker), protocol=0))
    with pytest.raises(CheckpointError, match=r"refusing to load '.*p0\.pt': it refers to \S+ \(a Python function"):
        safe_load(plain)
    assert not marker.exists()
    older = pickle.UnpicklingError("Weights only load failed. Re-running `torch.load` with `weights_only` set to "
                                   "`False` will likely succeed.\n WeightsUnpickler error: Unsupported global: GLOBAL "
                                   "builtins.exec was not an allowed global by default. Please use ...")
    assert ckpt.blocked(older) == \
        "it refers to builtins.exec (a Python function or class), not only to tensors and plain containers"
    unnamed = pickle.UnpicklingError("Weights only load failed. Re-running `torch.load` with `weights_only` set to "
                                     "`False` will likely succeed.\n\nUnsupported thing")
    assert ckpt.blocked(unnamed) == \
        "it holds more than tensors and plain containers (torch's refusal does not name what)"


@pytest.mark.parametrize("protocol", [4, 5])
def test_another_programs_pickle_is_refused_as_such_without_torchs_warning(tmp_path, recwarn, protocol):
    """A pickle of protocol 4 or 5 (pickle.dump's default; torch.save writes 2) holding plain values: torch's safe
    reader stops at its first FRAME instruction, after a raw warning asking to file an issue with torch, and the
    error said the file held 'more than tensors and plain containers'. Now: one error naming what it is."""
    path = tmp_path / "weights.pt"
    path.write_bytes(pickle.dumps({"conv1.weight": [[0.5]], "epoch": 3}, protocol=protocol))
    with pytest.raises(CheckpointError) as err:
        safe_load(path)
    assert str(err.value).startswith(f"refusing to load '{path}': it is another program's pickle: it uses an "
                                     f"instruction (opcode 149) that torch.save never writes and the safe reader "
                                     f"does not take, so unpickling it could run code")
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]


def test_only_torchs_pickle_protocol_warning_is_silenced_while_loading(tmp_path, monkeypatch, recwarn):
    """The filter that hides torch's 'Detected pickle protocol' note must not hide what else torch.load says
    (a deprecation, a note about the file): those still reach the user."""
    import warnings

    path = tmp_path / "encoder.pt"
    torch.save({"w": torch.zeros(1)}, path)

    def load(*args, **kwargs):
        warnings.warn("Detected pickle protocol 4 in the checkpoint, not the default", UserWarning, stacklevel=2)
        warnings.warn("torch.load: something else about this file", UserWarning, stacklevel=2)
        return {"w": torch.zeros(1)}

    monkeypatch.setattr(torch, "load", load)
    assert set(safe_load(path)) == {"w"}
    assert [str(w.message) for w in recwarn] == ["torch.load: something else about this file"]


def test_an_empty_checkpoint_is_said_to_be_empty(tmp_path):
    """A zero-byte file read `is corrupt, truncated or not a PyTorch file (EOFError: ).`"""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    atomic_torch_save({"w": torch.ones(1)}, folder / "epoch0001.ckpt")
    (folder / "last.ckpt").write_bytes(b"")
    for mmap in (False, True):
        with pytest.raises(CheckpointError) as err:
            safe_load(folder / "last.ckpt", mmap=mmap, job="evaluate")
        assert str(err.value) == (f"checkpoint '{folder / 'last.ckpt'}' is empty (0 bytes), e.g. a copy or download "
                                  f"that never finished. Other checkpoints beside it, latest first: "
                                  f"{folder / 'epoch0001.ckpt'}; evaluate one instead: "
                                  f"pretrained={folder / 'epoch0001.ckpt'}")


def test_old_pickle_format_loads_with_mmap_requested(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.arange(4)}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(safe_load(path, mmap=True)["w"], torch.arange(4))


def test_encoder_of_another_architecture_is_refused(tmp_path):
    """An export whose weights do not match its declared backbone (e.g. hand-edited, or a
    ResNet-50 state_dict under a ResNet-18 header) names what differs instead of a 60-line dump."""
    path = tmp_path / "encoder.pt"
    save_encoder(Encoder("resnet18", "cifar"), path)
    blob = torch.load(path, weights_only=True)
    blob["backbone"]["stem"] = "imagenet"  # ImageNet stem: conv1 is 7x7, the weights 3x3
    torch.save(blob, path)
    with pytest.raises(CheckpointError) as err:
        load_encoder(path)
    message = str(err.value)
    assert "another architecture" in message and "conv1.weight" in message
    assert "(64, 3, 3, 3) in the checkpoint" in message and "(64, 3, 7, 7) expected" in message
    blob["backbone"] = {"name": "resnet50", "stem": "cifar", "taps": [], "grids": {}}
    torch.save(blob, path)
    with pytest.raises(CheckpointError, match="another architecture"):
        load_encoder(path)


def small_export(path: Path) -> dict:
    """A ResNet-18 export of width 0.125 (conv1: 8 x 3 x 3 x 3), as read back from its file."""
    save_encoder(Encoder("resnet18", "cifar", width=0.125), path)
    return torch.load(path, weights_only=True)


def with_weights(blob: dict, change) -> dict:
    return dict(blob, state_dict={k: change(k, v) for k, v in blob["state_dict"].items()})


def one_nan(key, value, name="body.conv1.weight"):
    if key == name:
        value = value.clone()
        value.view(-1)[5] = float("nan")
    return value


def as_kind(dtype):
    return lambda key, value: value.to(dtype) if value.is_floating_point() else value


REFUSED_WEIGHTS = {  # what is changed in an export, what the error says about it
    "one NaN": (one_nan, "its state_dict['body.conv1.weight'] holds NaN or infinite values (1 of 216)"),
    "inf buffer": (lambda k, v: torch.full_like(v, float("inf")) if k == "body.bn1.running_var" else v,
                   "its state_dict['body.bn1.running_var'] holds NaN or infinite values (8 of 8)"),
    "integers": (as_kind(torch.int64), "its state_dict holds 100 tensors of another kind of number (e.g. "
                                       "body.conv1.weight: integer (torch.int64) in the file, floating-point "
                                       "(torch.float32) expected)"),
    "complex": (as_kind(torch.complex64), "its state_dict holds 100 tensors of another kind of number (e.g. "
                                          "body.conv1.weight: complex (torch.complex64) in the file, floating-point "
                                          "(torch.float32) expected)"),
    "bools": (as_kind(torch.bool), "its state_dict holds 100 tensors of another kind of number (e.g. "
                                   "body.conv1.weight: bool (torch.bool) in the file, floating-point (torch.float32) "
                                   "expected)"),
    # crafted: a weight of the right shape with one number behind it (stride 0), or none at all (meta)
    "stride 0": (lambda k, v: torch.zeros(1).expand_as(v) if k == "body.conv1.weight" else v,
                 "its state_dict['body.conv1.weight'] has 216 elements over 4 bytes of storage (a stride-0 or "
                 "overlapping view); it is not a saved state"),
    "meta": (lambda k, v: torch.empty_like(v, device="meta") if k == "body.conv1.weight" else v,
             "its state_dict['body.conv1.weight'] is a tensor without numbers (on the meta device)"),
    "float counter": (lambda k, v: v.float() if k.endswith("num_batches_tracked") else v,
                      "its state_dict holds 20 tensors of another kind of number (e.g. body.bn1.num_batches_tracked: "
                      "floating-point (torch.float32) in the file, integer (torch.int64) expected)"),
}


@pytest.mark.parametrize("case", REFUSED_WEIGHTS)
def test_weights_of_nan_or_of_another_kind_of_number_are_refused_naming_the_tensor(tmp_path, case):
    """Exports with NaN weights, or integer / complex / bool ones (cast without a word by load_state_dict) were
    evaluated at chance accuracy with status ok. Loading one is now refused in one line: the file, the first
    tensor at fault, what is wrong and what to do, both by load_encoder and by the evaluation's reader."""
    from byol.jobs.pretrained import read_pretrained

    change, expected = REFUSED_WEIGHTS[case]
    path = tmp_path / "encoder.pt"
    torch.save(with_weights(small_export(tmp_path / "good.pt"), change), path)
    for load in (load_encoder, lambda p: read_pretrained(p).build(["avgpool"])):
        with pytest.raises(CheckpointError) as err:
            load(path)
        assert str(err.value) == (f"refusing '{path}': {expected}; the file is damaged or was not written by this "
                                  f"project. For a run's encoder.pt: {ckpt.REWRITE_EXPORT}")


def test_weights_of_another_precision_load_cast_to_the_modules(tmp_path):
    """float64, float16 and bfloat16 weights are another precision, not damage: they load, cast to float32, and
    BatchNorm's integer counters load as they are."""
    blob = small_export(tmp_path / "good.pt")
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        path = tmp_path / f"{dtype}.pt"
        torch.save(with_weights(blob, as_kind(dtype)), path)
        encoder, _ = load_encoder(path)
        for key, value in encoder.state_dict().items():
            saved = blob["state_dict"][key]
            assert value.dtype == saved.dtype, key
            assert torch.equal(value, saved.to(dtype).to(saved.dtype) if saved.is_floating_point() else saved), key


def test_weights_of_a_checkpoint_that_do_not_load_name_the_checkpoints_to_take_instead(tmp_path):
    """Weights from a .ckpt: the fix is another checkpoint of the run, named; nothing is loaded."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    atomic_torch_save({"w": torch.ones(1)}, folder / "epoch0002.ckpt")
    encoder = Encoder("resnet18", "cifar", width=0.125)
    before = copy.deepcopy(encoder.state_dict())
    state = {k: v.to(torch.complex64) if v.is_floating_point() else v for k, v in before.items()}
    with pytest.raises(CheckpointError) as err:
        ckpt.load_weights(encoder, state, folder / "last.ckpt")
    assert str(err.value).startswith(f"refusing '{folder / 'last.ckpt'}': its state_dict holds 100 tensors of "
                                     f"another kind of number (e.g. body.conv1.weight: complex (torch.complex64)")
    assert str(err.value).endswith(f"Use another checkpoint of the run. Other checkpoints beside it, latest first: "
                                   f"{folder / 'epoch0002.ckpt'}; evaluate one instead: "
                                   f"pretrained={folder / 'epoch0002.ckpt'}")
    assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items())


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_module_errors_are_not_swallowed(tmp_path):
    """weights_only's refusal arrives as an UnpicklingError; the error names the file."""
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump(Payload(tmp_path / "x"), f)
    with pytest.raises(CheckpointError, match=str(path)):
        safe_load(path)
    assert not (tmp_path / "x").exists()


def test_optimizer_and_schedule_states_are_checked_against_what_is_built_and_a_trial_changes_nothing():
    """The checks a resumed state passes before Lightning loads it (byol.core.state_check): a state of the
    optimizer it is compared with passes, and trying it leaves that optimizer as it was; a group without one of
    its options (LARS reads each at its step), a state of a parameter no group holds, or a scheduler key that
    would replace one of its methods is named."""
    from byol.core.optim import LARS, param_groups, warmup_cosine
    from byol.core.state_check import optimizer_problem, scheduler_problem

    def built():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        optimizer = LARS(param_groups([net], 1e-4), lr=0.1)
        return net, optimizer, warmup_cosine(optimizer, 10, 2)

    net, optimizer, schedule = built()
    net(torch.randn(8, 3)).square().sum().backward()
    optimizer.step()
    schedule.step()
    saved, saved_schedule = optimizer.state_dict(), schedule.state_dict()
    _, fresh, fresh_schedule = built()
    assert optimizer_problem(saved, fresh, "o") is None
    assert scheduler_problem(saved_schedule, fresh_schedule, "s") is None
    assert not fresh.state and fresh.param_groups[0]["lr"] == fresh_schedule.get_last_lr()[0]  # untouched
    no_eta = copy.deepcopy(saved)
    del no_eta["param_groups"][0]["eta"]
    assert optimizer_problem(no_eta, fresh, "o") == "o.param_groups[0] lacks 'eta'"
    stray = copy.deepcopy(saved)
    stray["state"][99] = stray["state"].pop(0)
    assert optimizer_problem(stray, fresh, "o") == "o.state holds parameter 99, which no parameter group holds"
    assert scheduler_problem({**saved_schedule, "step": 1}, fresh_schedule, "s") == \
        "s holds 'step', which would replace the scheduler's own attribute"
    assert scheduler_problem({**saved_schedule, "_last_lr": [0.1]}, fresh_schedule, "s") == \
        "s._last_lr is [0.1], not a list of 2"


def test_a_compressed_archive_is_refused_before_torch_inflates_it(tmp_path, monkeypatch):
    """torch.save stores its zip entries as they are; torch.load inflates compressed ones in memory, so a
    file of a few MB could ask for many GB (a 12.5 MB encoder.pt with 2 GB of zeros peaked at 5 GB). Such a
    file is refused from its central directory alone, torch.load never called; a real checkpoint loads."""
    import zipfile

    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(64, 64)}, plain)
    assert torch.equal(ckpt.safe_load(plain)["w"], torch.zeros(64, 64))
    packed = tmp_path / "packed.pt"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as dst:
        for entry in src.infolist():
            dst.writestr(entry.filename, src.read(entry))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load reached"))
    with pytest.raises(CheckpointError, match=r"refusing to load '.*packed\.pt': it holds \d+ compressed entr"):
        ckpt.safe_load(packed)
    # stored entries that declare more than the file holds (a forged directory) are refused the same way
    real_infolist = zipfile.ZipFile.infolist

    def forged(self):
        entries = real_infolist(self)
        entries[0].file_size = 10**12
        return entries

    monkeypatch.setattr(zipfile.ZipFile, "infolist", forged)
    with pytest.raises(CheckpointError, match=r"its entries declare [\d,]+ bytes, more than the file's"):
        ckpt.safe_load(plain)


def test_a_legacy_tar_file_is_refused_without_torchs_advice_to_load_it_unsafely(tmp_path):
    """torch's error for a file it takes for its legacy tar format (4 KB of zeros, any tar file) advises
    loading with weights_only=False, which would run what the file holds: never passed on."""
    zeros = tmp_path / "z.pt"
    zeros.write_bytes(bytes(4096))
    with pytest.raises(CheckpointError) as refused:
        ckpt.safe_load(zeros)
    assert "weights_only" not in str(refused.value) and "arbitrary code" not in str(refused.value)
    assert "legacy tar format" in str(refused.value) and str(zeros) in str(refused.value)
