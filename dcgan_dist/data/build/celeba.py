"""Where CelebA lives on disk and what its text lists say.

Finds the images in any of the layouts people actually have (the release folder, the bare
zip, torchvision's `ROOT/celeba/`, Kaggle's unzipped copy with .csv lists, or any folder of
images) and parses the official lists (partition, attributes, identities, landmarks, boxes)
with line-numbered errors, so a damaged download is named instead of silently mis-split.
"""
from __future__ import annotations

import gc
import io
import os
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from dcgan_dist.data.build import ShardError
from dcgan_dist.data.images import IMAGE_SUFFIXES, list_images

SPLITS = ("train", "valid", "test")  # the partition file's 0, 1, 2
IMAGES_NAME = "img_align_celeba"
PARTITION = "list_eval_partition"
ATTRIBUTES = "list_attr_celeba"
IDENTITIES = "identity_CelebA"
LANDMARKS = "list_landmarks_align_celeba"
BBOXES = "list_bbox_celeba"
LIST_SUFFIXES = (".txt", ".csv")  # as released; Kaggle's copy


@dataclass(frozen=True)
class ImageEntry:
    id: str  # the file name without extension, dots replaced: the sample key
    member: str  # path inside the images folder or zip, posix separators
    size: int  # bytes, for noticing a changed input on a rebuild


@dataclass(frozen=True)
class CelebaSource:
    path: Path  # what the user named
    layout: str  # celeba-release | torchvision | zip | image-folder
    images: Path  # the folder or .zip that holds the images
    lists_dir: Path  # where the text lists are looked for

    @property
    def is_zip(self) -> bool:
        return self.images.suffix.lower() == ".zip" and self.images.is_file()

    def display(self, member: str) -> str:
        """How a user finds `member`: relative to the source they named."""
        if self.is_zip:
            return f"{self.images.name}:{member}"
        full = self.images / member
        base = self.path if self.path.is_dir() else self.path.parent
        return full.relative_to(base).as_posix() if full.is_relative_to(base) else str(full)


@dataclass
class CelebaLists:
    """The text lists found beside the images; every map is keyed by image id."""

    files: dict[str, str] = field(default_factory=dict)  # list name -> file name used
    partition: dict[str, str] | None = None  # id -> split name; None: no partition file
    attribute_names: list[str] | None = None
    attributes: dict[str, list[int]] = field(default_factory=dict)  # values 0/1
    identities: dict[str, int] = field(default_factory=dict)
    landmarks: dict[str, list[int]] = field(default_factory=dict)
    bboxes: dict[str, list[int]] = field(default_factory=dict)

    @property
    def partition_file(self) -> str:
        return self.files.get(PARTITION, PARTITION + ".txt")


@contextmanager
def gc_paused() -> Iterator[None]:
    """Hold the cyclic GC while building millions of small acyclic objects (the lists): it would rescan them 5x over."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def image_id(name: str) -> str:
    """The sample key of an image file: its name without extension, with no dots (WebDataset splits keys there)."""
    base = name[name.rfind("/") + 1:]  # PurePosixPath(name).stem, without its cost on 200,000-line lists
    dot = base.rfind(".")
    return (base[:dot] if dot > 0 else base).replace(".", "_")


def _is_junk(member: str) -> bool:
    """macOS archive litter (`__MACOSX/`, `._name`), which shadows real images with the same ids."""
    return member.startswith("__MACOSX/") or "/__MACOSX/" in member or member[member.rfind("/") + 1:].startswith("._")


def find_source(path: Path) -> CelebaSource:
    """Recognise the layout of `path`, or raise ShardError listing everything that was looked for."""
    path = Path(path)
    if not path.exists():
        raise ShardError(f"{path}: does not exist, expected a CelebA folder, a .zip or a folder of images")
    if path.is_file() and path.suffix.lower() == ".zip":
        return CelebaSource(path, "zip", path, path.parent)
    if path.is_dir():
        for layout, base in (("celeba-release", path), ("torchvision", path / "celeba")):
            for images in (base / IMAGES_NAME, base / f"{IMAGES_NAME}.zip"):
                if images.exists():
                    return CelebaSource(path, layout, images, base)
        if any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*")):
            return CelebaSource(path, "image-folder", path, path)
    suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
    raise ShardError(
        f"{path}: no images found; looked for {IMAGES_NAME}/ or {IMAGES_NAME}.zip in it (the CelebA release), "
        f"celeba/{IMAGES_NAME}/ or celeba/{IMAGES_NAME}.zip (torchvision's layout), a .zip file, "
        f"or image files ({suffixes}) anywhere below it"
    )


def list_entries(source: CelebaSource) -> list[ImageEntry]:
    """Every image of the source in sorted member order; two files with one id is an error."""
    if source.is_zip:
        try:
            with zipfile.ZipFile(source.images) as zf:
                infos = [(i.filename, i.file_size) for i in zf.infolist() if not i.is_dir()]
        except (zipfile.BadZipFile, OSError) as e:
            raise ShardError(f"{source.images}: not a readable zip ({e}); a truncated download?") from None
        members = [(m, s) for m, s in infos if os.path.splitext(m)[1].lower() in IMAGE_SUFFIXES]
    else:
        members = [(p.relative_to(source.images).as_posix(), p.stat().st_size) for p in list_images(source.images)]
    entries, seen = [], {}
    for member, size in sorted(members):
        if _is_junk(member):
            continue
        key = image_id(member)
        if key in seen:
            raise ShardError(f"duplicate image id '{key}': {source.display(seen[key])} and {source.display(member)}")
        seen[key] = member
        entries.append(ImageEntry(key, member, size))
    return entries


def open_reader(images: Path) -> Callable[[str], bytes]:
    """A function member -> raw bytes, for a folder or a zip (opened once per process)."""
    if images.suffix.lower() == ".zip" and images.is_file():
        return zipfile.ZipFile(images).read
    return lambda member: (images / member).read_bytes()


def _find_list(directory: Path, name: str) -> Path | None:
    for suffix in LIST_SUFFIXES:
        if (directory / (name + suffix)).is_file():
            return directory / (name + suffix)
    return None


def read_table(path: Path, *, counted: bool) -> tuple[list[str] | None, list[tuple[int, str, list[str]]]]:
    """(column names, rows of (line number, image file, values)) of a CelebA list.

    As released (.txt, fields separated by runs of spaces), `counted` lists open with a line
    holding the row count and one of column names; a .csv (Kaggle's copy) opens with a header.
    """
    csv = path.suffix.lower() == ".csv"
    data = path.read_bytes()
    try:
        text = io.StringIO(data.decode("utf-8-sig"), newline=None)  # universal newlines, as open() reads text
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ShardError(f"{path} line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}), "
                         "expected a CelebA list in plain text") from None
    if csv:
        lines = [(n, [v.strip() for v in line.split(",")]) for n, line in enumerate(text, 1) if line.strip()]
    else:
        lines = [(n, fields) for n, line in enumerate(text, 1) if (fields := line.split())]
    names, count = None, None
    if csv or counted:
        if counted and not csv:
            if not lines or len(lines[0][1]) != 1 or not lines[0][1][0].isdigit():
                raise ShardError(f"{path} line 1: expected the number of rows, got {' '.join(lines[0][1]) if lines else 'nothing'!r}")
            count = int(lines.pop(0)[1][0])
        if not lines:
            raise ShardError(f"{path}: expected a line of column names, found none")
        names = lines.pop(0)[1]
        names = names[1:] if names and names[0] == "image_id" else names
    rows = [(n, fields[0], fields[1:]) for n, fields in lines]
    if not rows:
        raise ShardError(f"{path}: no rows, expected a line per image (an empty or placeholder file?)")
    if count is not None and count != len(rows):
        raise ShardError(f"{path} line 1: says {count} rows, found {len(rows)} (a truncated or edited file?)")
    return names, rows


def _by_id(path: Path, rows: list[tuple[int, str, list[str]]], width: int, convert: Callable[[str], object],
           expected: str) -> dict[str, object]:
    """Map image id -> converted values (a single value when width is 1), rejecting malformed and repeated rows."""
    out = {}
    for n, name, values in rows:
        try:
            if len(values) != width:
                raise ValueError
            converted = convert(values[0]) if width == 1 else [convert(v) for v in values]
        except (ValueError, KeyError):
            raise ShardError(f"{path} line {n}: expected {expected}, got {' '.join([name, *values])!r}") from None
        key = image_id(name)
        if key in out:
            first = next(m for m, other, _ in rows if image_id(other) == key)
            raise ShardError(f"{path} line {n}: duplicate image id '{key}' (first on line {first})")
        out[key] = converted
    return out


_SPLIT_CODES = {str(i): name for i, name in enumerate(SPLITS)}
_ATTRIBUTE_VALUES = {"1": 1, "-1": 0}


def read_lists(directory: Path) -> CelebaLists:
    """Parse whichever CelebA lists are in `directory` (.txt as released, else .csv)."""
    with gc_paused():
        return _read_lists(directory)


def _read_lists(directory: Path) -> CelebaLists:
    lists = CelebaLists()
    found = {name: _find_list(directory, name) for name in (PARTITION, ATTRIBUTES, IDENTITIES, LANDMARKS, BBOXES)}
    lists.files = {name: p.name for name, p in found.items() if p is not None}
    if p := found[PARTITION]:
        lists.partition = _by_id(p, read_table(p, counted=False)[1], 1, _SPLIT_CODES.__getitem__,
                                 "'<image> <split: 0, 1 or 2>'")
    if p := found[IDENTITIES]:
        lists.identities = _by_id(p, read_table(p, counted=False)[1], 1, int, "'<image> <identity number>'")
    if p := found[ATTRIBUTES]:
        names, rows = read_table(p, counted=True)
        lists.attribute_names = names
        lists.attributes = _by_id(p, rows, len(names), _ATTRIBUTE_VALUES.__getitem__,
                                  f"'<image>' and {len(names)} values of 1 or -1")
    if p := found[LANDMARKS]:
        lists.landmarks = _by_id(p, read_table(p, counted=True)[1], 10, int, "'<image>' and 10 integers")
    if p := found[BBOXES]:
        lists.bboxes = _by_id(p, read_table(p, counted=True)[1], 4, int, "'<image> x_1 y_1 width height'")
    return lists
