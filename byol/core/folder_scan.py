"""The images of a folder: ``<class>/**`` (or a flat folder of images for pretraining), each found once.

The scan is careful because a folder can silently mislead: symlinks that reach the same images twice or
loop back to the dataset, hidden files (macOS '._*' resource forks, '.DS_Store') and archivers' folders
(``__MACOSX``) that are not images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from byol.core.errors import DataError

# Every name Pillow gives the formats read (``byol.core.image_folder.IMAGE_FORMATS``): '.jfif' (Windows' name for
# saved JPEGs), '.jpe', cameras' '.mpo', '.pbm'/'.pnm'/'.pfm' and '.apng' files were left out without a word
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".mpo", ".png", ".apng", ".bmp", ".ppm", ".pgm", ".pbm", ".pnm",
                    ".pfm", ".tif", ".tiff", ".webp", ".gif")
# Folders that archivers add beside the images (macOS zips: resource forks of every file): never a class
SKIPPED_FOLDERS = ("__MACOSX",)

# --------------------------------------------------------------------------- scanning


@dataclass
class FolderScan:
    """An image folder's files, each counted once, with their labels and real paths."""

    files: list[Path]
    labels: list[int]
    classes: tuple[str, ...]
    real: list[str]  # each file's resolved path (symlinks followed)


def _contains(outer: str, inner: str) -> bool:
    """Whether real path ``inner`` is ``outer`` or below it."""
    return os.path.commonpath([outer, inner]) == outer


class _Found(NamedTuple):
    """An image met on the walk: its class (None at the top of a flat folder), the path it was
    reached by, its real path, and whether that path is a file symlink."""

    cls: str | None
    path: Path
    real: str
    link: bool


class _Scanner:
    """One walk of an image folder, and what it has seen so far.

    The walk reads each real folder once (``scanned``), records the images it meets
    (``found``) and defers the symlinked folders met below the top (``nested``) until the
    plain folders are read, so that a link to a folder of the dataset is the one skipped.
    """

    def __init__(self, folder: Path, skip_unreadable: bool = False):
        self.folder, self.skip_unreadable = folder, skip_unreadable
        self.root = os.path.realpath(folder)
        self.scanned = {self.root}  # real paths of the folders walked
        self.found: list[_Found] = []
        self.nested: list[tuple[Path, str | None]] = []  # symlinked folders met on the way, followed last
        self.skipped: list[str] = []  # symlinked folders not followed, for the "no images" message
        self.broken: list[Path] = []  # symlinks whose target does not exist or cannot be reached
        self.others: list[Path] = []  # files that are not of an image type read here: left out, said in a note

    def entries(self, path: Path, top: bool) -> list[os.DirEntry]:
        """The entries of ``path`` by name. Unreadable is an error at the top; below, too (its images would be
        left out without a word: a class with none, scored on its test images all the same), unless
        ``skip_unreadable`` (``data.skip_bad_files``), which skips it with a line."""
        try:
            with os.scandir(path) as it:
                return sorted(it, key=lambda e: e.name)
        except OSError as e:
            if top:
                raise DataError(f"cannot read image folder '{path}' ({e.strerror}); check its permissions "
                                f"or point data.root elsewhere") from None
            if not self.skip_unreadable:
                raise DataError(f"cannot read folder '{path}' ({e.strerror}) in image folder '{self.folder}': its "
                                f"images would be left out; check its permissions, or set "
                                f"data.skip_bad_files=true to skip it with a warning") from None
            print(f"[data] warning: skipping unreadable folder '{path}' ({e.strerror})", flush=True)
            return []

    def walk(self, path: Path, real: str, cls: str | None, top: bool = False) -> list[tuple[Path, str]]:
        """Record the images below ``path`` (whose real path is ``real``) as class ``cls``.

        At the top, subfolders are classes and are returned rather than walked, as
        ``(path, real path)``, with "" as the real path of a symlinked one. Below, depth first in name
        order, with a stack of the folders being read rather than recursion: a tree a thousand folders
        deep ended in Python's RecursionError.
        """
        subfolders: list[tuple[Path, str]] = []
        reading = [self._read(path, real, cls, top, subfolders)]
        while reading:
            sub = next(reading[-1], None)
            if sub is None:
                reading.pop()
            else:
                reading.append(self._read(*sub, cls, False, subfolders))
        return subfolders

    def _read(self, path: Path, real: str, cls: str | None, top: bool, subfolders: list):
        """Record the images of the folder ``path``; yield each plain subfolder to walk, as ``(path, real
        path)``, where it is met (at the top, add it to ``subfolders`` instead)."""
        for e in self.entries(path, top):
            if e.name.startswith(".") or e.name in SKIPPED_FOLDERS:
                continue
            p = Path(e.path)
            try:
                link, is_dir = e.is_symlink(), e.is_dir()
            except OSError:  # a link to itself (ELOOP), or into a folder that cannot be read
                link, is_dir = True, False
            if link and not is_dir and self._broken(p):
                continue
            if is_dir and link:
                if not top:
                    self.nested.append((p, cls))
                else:
                    subfolders.append((p, ""))
            elif is_dir:
                sub = os.path.join(real, e.name)
                if top:
                    subfolders.append((p, sub))
                elif sub not in self.scanned:
                    self.scanned.add(sub)
                    yield p, sub
            elif p.suffix.lower() in IMAGE_EXTENSIONS and e.is_file():
                self.found.append(_Found(cls, p, os.path.realpath(p) if link else os.path.join(real, e.name), link))
            elif not is_dir:
                self.others.append(p)

    def _broken(self, link: Path) -> bool:
        """Whether ``link`` leads nowhere (its target missing: storage not mounted, a moved folder): recorded
        when it could be an image or a class folder (an image's suffix, or none), whose images would vanish."""
        if os.path.exists(link):
            return False
        if not link.suffix or link.suffix.lower() in IMAGE_EXTENSIONS:
            self.broken.append(link)
        return True

    def check_broken(self) -> None:
        """Links that lead nowhere are an error naming them, as an unreadable folder is, or with
        ``skip_unreadable`` (``data.skip_bad_files``) a warning line."""
        if not self.broken:
            return
        n, shown = len(self.broken), self.broken[:3]
        names = ", ".join(f"'{p}' -> '{os.readlink(p) if p.is_symlink() else '?'}'" for p in shown)
        names += f" and {n - len(shown)} more" if n > len(shown) else ""
        what = f"{n} symbolic link(s) in image folder '{self.folder}'"
        if not self.skip_unreadable:
            raise DataError(f"{what} lead to nothing that exists (storage not mounted? a moved folder?): {names}; "
                            f"the images there would be left out; mount or fix the targets, remove the links, or "
                            f"set data.skip_bad_files=true to skip them with a warning")
        print(f"[data] warning: skipping {what} that lead to nothing that exists: {names}", flush=True)

    def note_others(self) -> None:
        """One note for the files left out as not of an image type read here, by type: a class's '.heic' photos
        (or '.avif', '.jxl', camera raw files) vanished from it without a word."""
        if not self.others:
            return
        kinds: dict[str, int] = {}
        for p in self.others:
            kinds[p.suffix.lower() or "no extension"] = kinds.get(p.suffix.lower() or "no extension", 0) + 1
        counts = ", ".join(f"{k}: {n}" for k, n in sorted(kinds.items(), key=lambda kn: -kn[1])[:6])
        print(f"[data] note: {len(self.others)} file(s) in image folder '{self.folder}' are left out, not of an "
              f"image type read here ({counts}{', ...' if len(kinds) > 6 else ''}; e.g. "
              f"'{self.others[0].relative_to(self.folder)}'); images are read from {' '.join(IMAGE_EXTENSIONS)} "
              f"files: convert others to JPEG or PNG to use them", flush=True)

    def follow(self, link: Path) -> str | None:
        """The real path of a symlinked folder to walk, or None (skipped, with a line)."""
        target = os.path.realpath(link)
        if _contains(target, self.root):
            why = ("it is the dataset folder or a folder above it (a link cycle); its images would be "
                   "counted twice")
        elif target in self.scanned:
            why = "that folder is already part of the dataset; its images are counted once"
        else:
            self.scanned.add(target)
            return target
        print(f"[data] skipping symlinked folder '{link}' -> '{target}': {why}", flush=True)
        self.skipped.append(str(link.relative_to(self.folder)))
        return None

    def walk_all(self) -> list[str]:
        """Walk the whole folder and return its class names, in the order met."""
        top = self.walk(self.folder, self.root, None, top=True)
        classes = []
        for path, real in top:  # plain class folders first: a link to one of them is the duplicate
            if real:
                self.scanned.add(real)
                classes.append(path.name)
                self.walk(path, real, path.name)
        for path, real in top:
            if not real and (target := self.follow(path)) is not None:
                classes.append(path.name)
                self.walk(path, target, path.name)
        i = 0
        while i < len(self.nested):  # walking a linked folder may meet further links
            path, cls = self.nested[i]
            if (target := self.follow(path)) is not None:
                self.walk(path, target, cls)
            i += 1
        return classes

    def collect(self, classes: list[str]) -> FolderScan:
        """The images found, each real file once, labelled by the sorted ``classes``.

        Images in class folders win over loose ones at the top; a file reached through several
        paths is kept at its own place when it has one in the dataset, else at its first path.
        """
        classes = sorted(classes)
        label = {c: k for k, c in enumerate(classes)}
        in_classes = [f for f in self.found if f.cls is not None]
        loose = [f for f in self.found if f.cls is None]
        chosen = in_classes or loose
        if in_classes and loose:  # they would have been used without the class folders: say that they are not
            first = min(f.path for f in loose).name
            print(f"[data] note: {len(loose)} image(s) directly in '{self.folder}' (e.g. '{first}') are not used: "
                  f"beside class folders an image belongs in one; move them into theirs", flush=True)
        chosen.sort(key=lambda f: (label.get(f.cls, -1), f.path))
        own = {f.real for f in chosen if not f.link}
        files, labels, reals, seen = [], [], [], set()
        for f in chosen:
            if f.real in seen or (f.link and f.real in own):
                continue
            seen.add(f.real)
            files.append(f.path)
            labels.append(label[f.cls] if f.cls is not None else -1)
            reals.append(f.real)
        if len(chosen) > len(files):
            n = len(chosen) - len(files)
            print(f"[data] {n} {'file' if n == 1 else 'files'} reached through more than one path (symlinks) "
                  f"{'is' if n == 1 else 'are'} counted once", flush=True)
        if not files:
            note = f"; symlinked folders skipped: {', '.join(self.skipped)}" if self.skipped else ""
            raise DataError(f"no images found in '{self.folder}' (looked for {', '.join(IMAGE_EXTENSIONS)} "
                            f"files in class subfolders or directly inside it{note})")
        return FolderScan(files, labels, tuple(classes) if in_classes else (), reals)


def scan_images(folder: Path, skip_unreadable: bool = False) -> FolderScan:
    """Walk ``folder/<class>/**`` (or a flat folder of images) once, following symlinks safely.

    Hidden files and folders (names starting with '.', such as macOS '._*' resource forks and
    '.DS_Store') are skipped everywhere. A symlinked folder is followed unless it resolves to
    the dataset folder or a folder above it (a link cycle: every image again) or to a folder
    already scanned (images counted twice); those are skipped with one printed line each. A
    file reached through several paths (file symlinks) is counted once, at its own place when
    it has one in the dataset, else at its first path in sorted order. A folder below that cannot be read,
    or a symlink that leads nowhere, is an error, or skipped with a line when ``skip_unreadable``.
    """
    if not folder.is_dir():
        state = "is a file, not a folder" if folder.exists() else "does not exist"
        raise DataError(f"image folder '{folder}' {state}; set data.root to a folder laid out as "
                        f"DIR/train/<class>/*.jpg (or a flat folder of images for pretraining)")
    scanner = _Scanner(folder, skip_unreadable)
    classes = scanner.walk_all()
    scanner.check_broken()
    scanner.note_others()
    return scanner.collect(classes)


def scan_folder(folder: Path) -> tuple[list[Path], list[int], tuple[str, ...]]:
    """Files and labels of ``folder/<class>/*``; a flat folder of images gives label -1.

    Each image is counted once however many symlinks lead to it; hidden files and folders are
    skipped (see :func:`scan_images`).
    """
    scan = scan_images(folder)
    return scan.files, scan.labels, scan.classes
