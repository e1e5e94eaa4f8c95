"""A cache folder that cannot take the decoded images: the in-memory path decodes anyway and says so,
the memory-mapped path (which cannot work without it) stops before decoding with a line naming
data.cache_dir; the project's own warnings print as one line during a job."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import class_folders

import byol.core.disk_images as disk_images
import byol.core.image_folder as image_folder
from byol.core.disk_images import size_text
from byol.core.errors import CheckpointError, DataError
from byol.core.image_folder import cache_folder_problem, load_image_folder
from byol.jobs.console import quiet_lightning


@pytest.fixture
def images(tmp_path):
    data = class_folders(tmp_path / "train", 3)
    return data, load_image_folder(data, 8, workers=1)


def test_a_cache_folder_under_a_file_gives_the_same_images_and_a_warning(tmp_path, images, capsys):
    data, plain = images
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    with pytest.warns(UserWarning, match=r"data.cache_dir '.*not_a_folder/cache' cannot be written"):
        loaded = load_image_folder(data, 8, cache_dir=blocker / "cache", workers=1)
    assert torch.equal(loaded.images, plain.images) and torch.equal(loaded.labels, plain.labels)
    assert "not cached" in capsys.readouterr().out
    assert blocker.read_text() == "x"


def test_the_memory_mapped_path_stops_before_decoding(tmp_path, images, capsys):
    data, _ = images
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    with pytest.raises(DataError, match=r"data.storage=mmap .* cannot be written.*set data.cache_dir"):
        load_image_folder(data, 8, cache_dir=blocker / "cache", workers=1, storage="mmap")
    assert "decoding" not in capsys.readouterr().out


def test_too_little_free_space_is_found_before_the_decode(tmp_path, images, monkeypatch):
    data, plain = images
    need = 6 * 3 * 8 * 8  # six decoded 8x8 images
    usage = type("Usage", (), {"free": need - 1})
    monkeypatch.setattr(disk_images.shutil, "disk_usage", lambda _: usage)
    assert cache_folder_problem(tmp_path / "c", need) == "has 1151 bytes free, the decoded images need 1152 bytes"
    with pytest.raises(DataError, match="1151 bytes free"):
        load_image_folder(data, 8, cache_dir=tmp_path / "mm", workers=1, storage="mmap")
    assert not list((tmp_path / "mm").iterdir())  # nothing half-written
    with pytest.warns(UserWarning, match="1151 bytes free"):
        loaded = load_image_folder(data, 8, cache_dir=tmp_path / "c", workers=1)
    assert torch.equal(loaded.images, plain.images)
    assert not list((tmp_path / "c").iterdir())
    usage.free = need
    assert cache_folder_problem(tmp_path / "c", need) is None


def test_a_cache_write_that_fails_midway_keeps_the_decoded_images(tmp_path, images, monkeypatch):
    data, plain = images

    def full_disk(obj, path):
        raise CheckpointError(f"could not write '{path}' (No space left on device)")

    monkeypatch.setattr(image_folder, "atomic_torch_save", full_disk)  # the name image_folder calls
    with pytest.warns(UserWarning, match="not cached: could not write"):
        loaded = load_image_folder(data, 8, cache_dir=tmp_path / "cache", workers=1)
    assert torch.equal(loaded.images, plain.images)


def test_the_projects_warnings_are_one_line_during_a_job():
    before = warnings.formatwarning
    with quiet_lightning():
        ours = warnings.formatwarning("data.cache_dir 'x' cannot be written", UserWarning, image_folder.__file__, 1)
        theirs = warnings.formatwarning("some library says", UserWarning, "/elsewhere/lib.py", 7)
    assert ours == "warning: data.cache_dir 'x' cannot be written\n"
    assert theirs.startswith("/elsewhere/lib.py:7: UserWarning: some library says")
    assert warnings.formatwarning is before  # restored


def test_a_killed_decodes_unfinished_cache_file_is_removed_and_a_live_ones_kept(tmp_path, capsys):
    import os
    import socket
    import subprocess
    import sys

    data, cache = class_folders(tmp_path / "train", 3), tmp_path / "cache"
    load_image_folder(data, 8, cache_dir=cache, workers=1, storage="mmap")
    npy = next(cache.glob("*.u8.npy"))
    npy.unlink()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    left = cache / f".{npy.name}.{host}-{int(dead.stdout)}.abc123.tmp"  # SIGKILL'd while decoding
    live = cache / f".{npy.name}.{host}-{os.getpid()}.def456.tmp"  # another job decoding right now
    elsewhere = cache / f".{npy.name}.other-node-{int(dead.stdout)}.ghi789.tmp"  # a process of another machine
    for f in (left, live, elsewhere):
        f.write_bytes(b"\0" * 64)
    again = load_image_folder(data, 8, cache_dir=cache, workers=1, storage="mmap")
    assert len(again.images) == 6
    assert not left.exists() and live.exists() and elsewhere.exists()
    assert "removed 1 unfinished cache file(s)" in capsys.readouterr().out
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp") and p not in (live, elsewhere)]


@pytest.mark.parametrize("storage", ["memory", "mmap"])
def test_a_decode_names_the_folders_other_caches_that_it_does_not_use(tmp_path, capsys, storage):
    """Every change to a folder (or another image size) leaves a cache as large as its decoded images, kept for
    good: a decode now names the folder's other cache files and their size, and never its own or another
    folder's."""
    data, cache = class_folders(tmp_path / "train", 3), tmp_path / "cache"
    other = class_folders(tmp_path / "elsewhere" / "trainset", 1)
    load_image_folder(other, 8, cache_dir=cache, workers=1, storage=storage)
    load_image_folder(data, 8, cache_dir=cache, workers=1, storage=storage)
    assert "other cache file(s)" not in capsys.readouterr().out  # the first decode of each folder: none
    prefix = image_folder._cache_prefix(data)
    first = sorted(p.name for p in cache.glob(f"{prefix}-*") if p.name.endswith((".pt", ".npy")))
    load_image_folder(data, 16, cache_dir=cache, workers=1, storage=storage)  # another size: another cache
    named = [line for line in capsys.readouterr().out.splitlines() if "other cache file(s)" in line]
    assert len(named) == 1 and f"{len(first)} other cache file(s) of {data} in {cache}" in named[0]
    assert named[0].split("changed: ")[1].split("; delete")[0].split(", ") == first  # the size-8 cache, only it
    load_image_folder(data, 16, cache_dir=cache, workers=1, storage=storage)  # read from its cache: no decode
    assert "other cache file(s)" not in capsys.readouterr().out


def test_a_killed_decode_of_another_cache_of_the_folder_leaves_no_temporary_file(tmp_path, capsys):
    """A decode killed at another image size (another cache key) left a dataset-sized temporary file that no
    later decode removed: only this key's were. Now every dead writer's file of the folder's caches goes;
    another folder's, and a live writer's, stay."""
    import os
    import socket
    import subprocess
    import sys

    data, cache = class_folders(tmp_path / "train", 3), tmp_path / "cache"
    load_image_folder(data, 8, cache_dir=cache, workers=1)
    prefix = image_folder._cache_prefix(data)
    own = next(cache.glob(f"{prefix}-*.pt")).name
    other_key = own.replace(own[len(prefix) + 1:len(prefix) + 21], "0123456789abcdef0123")
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    host = socket.gethostname()
    stale = [cache / f".{other_key}.{host}-{dead}.abc123.tmp",  # killed decoding at size 16
             cache / f".{other_key.replace('.pt', '.u8.npy')}.{host}-{dead}.x_y9.tmp",  # and with storage=mmap
             cache / f".{other_key.replace('.pt', '.labels.pt')}.{host}-{dead}.lab3l.tmp"]  # its labels
    kept = [cache / f".{other_key}.{host}-{os.getpid()}.def456.tmp",  # decoding right now
            cache / f".{prefix}set-0123456789abcdef0123.pt.{host}-{dead}.ghi789.tmp",  # another folder's
            cache / f".{other_key}.other-node-{dead}.jkl012.tmp",  # another machine's (a shared disk)
            cache / f".{other_key.replace('.pt', '.log')}.{host}-{dead}.mn0p.tmp"]  # not a cache file's
    for f in stale + kept:
        f.write_bytes(b"\0" * 64)
    load_image_folder(data, 12, cache_dir=cache, workers=1)  # a decode of this folder (a new size)
    out = capsys.readouterr().out
    assert not any(f.exists() for f in stale) and all(f.exists() for f in kept)
    assert f"removed 3 unfinished cache file(s) that a stopped process left in {cache} (" in out
    named = out.split(f"left in {cache} (")[1].split(")\n")[0].split(", ")
    assert sorted(named) == sorted(f.name for f in stale)  # each named


def test_a_decode_leaves_the_temporary_files_of_a_folder_whose_name_only_matches_as_a_pattern(tmp_path):
    """The folder's name is matched as written: a decode of 'tr.in' (a '.' in the name) leaves a dead writer's
    file of the folder 'trXin' beside it alone, as it does any other folder's."""
    import socket
    import subprocess
    import sys

    data, cache = class_folders(tmp_path / "tr.in", 3), tmp_path / "cache"
    cache.mkdir()
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    prefix = image_folder._cache_prefix(data)
    assert prefix.endswith("-tr.in")
    other = cache / f".{prefix[:-2]}Xin-0123456789abcdef0123.pt.{socket.gethostname()}-{dead}.abc123.tmp"
    other.write_bytes(b"\0" * 64)
    load_image_folder(data, 8, cache_dir=cache, workers=1)
    assert other.exists()


def test_a_failed_labels_write_leaves_no_mapped_cache_and_a_stray_one_does_not_block(tmp_path, images, monkeypatch,
                                                                                       capsys):
    """A disk that filled up while the .labels.pt was written left the complete .u8.npy behind, which no run
    reads and whose room every later run lacked ("choose another output folder"). The pair is written whole
    or not at all, the line names data.cache_dir, and a .u8.npy left without its labels (by an earlier version)
    is removed before the free space is counted."""
    data, plain = images
    cache = tmp_path / "cache"

    def full_disk(obj, path):
        raise CheckpointError(f"could not write '{path}' (No space left on device); the previous file, if any, is "
                              f"intact. The disk is full: free space or choose another output folder")

    with monkeypatch.context() as patched:
        patched.setattr(image_folder, "atomic_torch_save", full_disk)
        with pytest.raises(DataError) as refused:
            load_image_folder(data, 8, cache_dir=cache, workers=1, storage="mmap")
    assert str(refused.value).startswith("the memory-mapped cache was not written: could not write '")
    assert str(refused.value).endswith(f".labels.pt' (No space left on device); free space in data.cache_dir "
                                       f"'{cache}', or set data.cache_dir to a folder with room")
    assert not list(cache.iterdir())  # nothing left: neither the images nor a temporary file
    mapped = load_image_folder(data, 8, cache_dir=cache, workers=1, storage="mmap")
    (npy,) = cache.glob("*.u8.npy")
    npy.with_name(npy.name.replace(".u8.npy", ".labels.pt")).unlink()  # what the earlier version left
    del mapped
    capsys.readouterr()
    counted = []
    real_usage = disk_images.shutil.disk_usage
    monkeypatch.setattr(disk_images.shutil, "disk_usage", lambda p: counted.append(npy.exists()) or real_usage(p))
    again = load_image_folder(data, 8, cache_dir=cache, workers=1, storage="mmap")
    assert counted == [False]  # removed before the free space was counted
    assert f"[data] removed the unusable cache file(s) {npy.name} from {cache}: made again" in capsys.readouterr().out
    assert torch.equal(again.images, plain.images) and torch.equal(again.labels, plain.labels)


def test_sizes_under_a_hundredth_of_a_gigabyte_are_in_megabytes():
    assert [size_text(n) for n in (2.5e9, 1e7, 9_999_999, 5e6, 10_000, 9_999, 0)] == [
        "2.50 GB", "0.01 GB", "10.00 MB", "5.00 MB", "0.01 MB", "9999 bytes", "0 bytes"]


def test_a_cache_dir_that_is_a_file_is_said_to_be_one(tmp_path, images):
    """data.cache_dir naming a plain file said "cannot be written (File exists)"."""
    data, _ = images
    afile = tmp_path / "cachefile"
    afile.write_text("x")
    assert cache_folder_problem(afile, 10) == "is a file, not a folder"
    with pytest.raises(DataError, match=rf"^data.storage=mmap .* but '{afile}' is a file, not a folder: set "
                                        r"data.cache_dir to a folder"):
        load_image_folder(data, 8, cache_dir=afile, workers=1, storage="mmap")
    with pytest.warns(UserWarning, match=rf"data.cache_dir '{afile}' is a file, not a folder: decoding without"):
        load_image_folder(data, 8, cache_dir=afile, workers=1)
    assert afile.read_text() == "x"


def test_the_note_names_only_the_caches_of_the_same_folder(tmp_path, capsys):
    """Cache files were named '<split folder>-<key>': every dataset's 'train-...', and a decode named (and advised
    deleting) other datasets' caches. The name holds the parent folder's too, and the note lists only the caches
    that record the same folder: not another dataset's 'train', nor one whose names are alike."""
    cache = tmp_path / "cache"
    mine = class_folders(tmp_path / "a" / "cifar" / "train", 3)
    others = [class_folders(tmp_path / "svhn" / "train", 2),  # another dataset's training split
              class_folders(tmp_path / "b" / "cifar" / "train", 2)]  # another copy: the same cache file prefix
    for folder in [*others, mine]:
        load_image_folder(folder, 8, cache_dir=cache, workers=1)
    names = sorted(p.name.rsplit("-", 1)[0] for p in cache.iterdir())
    assert names == ["cifar-train", "cifar-train", "svhn-train"]
    (own,) = [p.name for p in cache.iterdir() if image_folder.recorded_folder(p) == str(mine.resolve())]
    capsys.readouterr()
    load_image_folder(mine, 12, cache_dir=cache, workers=1)
    notes = [line for line in capsys.readouterr().out.splitlines() if "other cache file(s)" in line]
    assert len(notes) == 1 and notes[0].endswith(f"changed: {own}; delete those no longer needed")
    assert f"1 other cache file(s) of {mine} in {cache} (" in notes[0]
    assert image_folder._cache_prefix(tmp_path / "odd name!" / ("x" * 60)) == "odd_name_-" + "x" * 40
