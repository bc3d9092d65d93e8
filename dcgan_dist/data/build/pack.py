"""`dcgan-shards build`: CelebA (or any folder of images) to preprocessed WebDataset tar shards.

Preprocessing (the lab's Resize + CenterCrop, `images.lab_resize`) happens once, here, so training
only decodes 64x64 samples. Builds are parallel, deterministic (byte-identical tars for the same input and
options) and resumable: each new shard is written under a temporary name in a staging folder and
renamed when complete, a journal records finished shards so an interrupted build picks up where it
stopped, and only a complete build replaces the previous one: its manifest and the shards it names
stay untouched until then, when the staged shards move into place and manifest.json is written last,
so it never describes tars that are not there. The manifest records each member's crc32, which the
loader checks before decoding.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import functional

import dcgan_dist
from dcgan_dist.data.build import ShardError
from dcgan_dist.data.build.celeba import (SPLITS, CelebaLists, CelebaSource, find_source, gc_paused, list_entries,
                                          open_reader, read_lists)
from dcgan_dist.data.build.synth import SYNTH_JSON
from dcgan_dist.data.build.workers import default_workers, ordered_map, process_pool
from dcgan_dist.data.images import lab_resize
from dcgan_dist.data.manifest import JOURNAL_NAME, MANIFEST_NAME, load_manifest, write_manifest
from dcgan_dist.fileio import atomic_write, fsync_dir, sha256_of

STAGING_NAME = ".dcgan-shards-staging"  # new shards of a build in progress, until the build completes
SHARD_NAME = re.compile(r"celeba64-(train|valid|test)-\d{6}\.tar")
TOOL = f"dcgan_dist {dcgan_dist.__version__}"
FORMATS = {"png": "png", "jpg": "jpg", "raw": "npy", "npy": "npy"}  # CLI name -> member extension
FACE_CROP_FRACTION = 108 / 178  # CelebA's 178-wide aligned faces -> the classic centred 108x108 face crop
PNG_OPTIONS = {"compress_level": 1, "compress_type": 3}  # zlib level 1, Z_RLE: faster and smaller than the default
JPG_OPTIONS = {"quality": 95, "subsampling": 0}
CHUNK = 64  # images per worker task: small enough to balance, large enough to amortise the hand-off
MAX_KEY_BYTES = 95  # ustar member names hold 100 bytes, extension included
SHARD_FIELDS = ("name", "samples", "bytes", "sha256", "crc32", "inputs", "plan")


class Sample(NamedTuple):
    """One input image and what the lists say about it; `repr` of it feeds the rebuild check."""

    key: str
    member: str
    size: int
    split: str
    attributes: list[int] | None
    identity: int | None
    landmarks: list[int] | None
    bbox: list[int] | None


def shard_name(split: str, index: int) -> str:
    return f"celeba64-{split}-{index:06d}.tar"


# ---------------------------------------------------------------------------------------- planning

def _plan_samples(source: CelebaSource, lists: CelebaLists, *, valid_fraction: float, seed: int,
                  allow_missing: bool) -> tuple[dict[str, list[Sample]], list[dict], dict]:
    """Samples per split (sorted by key), inputs skipped before decoding, and the missing-files record."""
    entries = list_entries(source)
    if not entries:
        raise ShardError(f"{source.images}: no image files in it")
    for e in entries:
        if len(e.id.encode()) > MAX_KEY_BYTES:
            raise ShardError(f"{source.display(e.member)}: image id longer than {MAX_KEY_BYTES} bytes, "
                             "expected a shorter file name (tar member names are limited)")
    skipped, missing = [], {"count": 0, "first": []}
    if lists.partition is not None:
        present = {e.id for e in entries}
        absent = sorted(k for k in lists.partition if k not in present)
        missing = {"count": len(absent), "first": absent[:10]}
        if absent and not allow_missing:
            raise ShardError(
                f"{len(absent):,} of {len(lists.partition):,} images listed in {lists.partition_file} are missing "
                f"from {source.images} (first: {', '.join(absent[:5])}); a partial download? "
                f"--allow-missing builds from the {len(lists.partition) - len(absent):,} that are present")
        split_of = {}
        for e in entries:
            if e.id in lists.partition:
                split_of[e.id] = lists.partition[e.id]
            else:
                skipped.append({"file": source.display(e.member), "reason": f"not listed in {lists.partition_file}"})
    else:
        n_valid = round(len(entries) * valid_fraction)
        valid = set(np.random.default_rng(seed).permutation(len(entries))[:n_valid].tolist())
        split_of = {e.id: "valid" if i in valid else "train" for i, e in enumerate(entries)}
    names = lists.attribute_names
    by_split = {split: [] for split in SPLITS}
    for e in sorted(entries, key=lambda e: e.id):
        if e.id in split_of:
            by_split[split_of[e.id]].append(Sample(
                e.id, e.member, e.size, split_of[e.id], lists.attributes.get(e.id) if names else None,
                lists.identities.get(e.id), lists.landmarks.get(e.id), lists.bboxes.get(e.id)))
    return by_split, skipped, missing


def _plan_hash(settings: dict, samples: list[Sample]) -> str:
    """What a shard was built from: the settings and its inputs (names, sizes, labels)."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    h.update("\n".join(map(repr, samples)).encode())
    return h.hexdigest()


def _previous_shards(out: Path) -> dict[str, list[dict]]:
    """Finished shards of earlier builds into `out` (the manifest's, then the journal's), by name, with their skips."""
    found: dict[str, list[dict]] = {}
    try:
        manifest = load_manifest(out)
        for split in manifest["splits"].values():
            for entry in split["shards"]:
                found.setdefault(entry["name"], []).append({**entry, "skipped": manifest.get("skipped", [])})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # no usable manifest: nothing to reuse from it
    try:
        for line in (out / JOURNAL_NAME).read_text().splitlines():
            entry = json.loads(line)
            found.setdefault(entry["name"], []).append(entry)
    except (OSError, ValueError, KeyError, TypeError):
        pass  # a torn last line only costs rebuilding that shard
    return found


# ------------------------------------------------------------------------------------------ workers

_worker: dict = {}


def _init_worker(images: Path, size: int, ext: str, crop: bool, fast_decode: bool,
                 attribute_names: list[str] | None) -> None:
    _worker.update(read=open_reader(images), size=size, ext=ext, crop=crop, fast_decode=fast_decode,
                   attribute_names=attribute_names)


def _tar_member(name: str, data: bytes) -> bytes:
    """One ustar member with fixed metadata (mtime 0, root, 0644), so equal content gives equal bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape") + data + bytes(-len(data) % tarfile.BLOCKSIZE)


def _decode(data: bytes) -> Image.Image | str:
    """The RGB image, or why it cannot be used."""
    if not data:
        return "empty file (0 bytes)"
    try:
        with Image.open(io.BytesIO(data)) as im:
            if _worker["fast_decode"]:
                side = -(-_worker["size"] // (FACE_CROP_FRACTION if _worker["crop"] else 1))
                im.draft("RGB", (int(side), int(side)))  # JPEG only: DCT-scaled decode, at least `side` pixels
            return im.convert("RGB")
    except UnidentifiedImageError:
        return "not an image (no decoder recognises it)"
    except Exception as e:  # decoders raise many types for damaged files; each such file is skipped and reported
        kind = "truncated image" if "truncated" in str(e) else "corrupt image"
        return f"{kind} ({type(e).__name__}: {e})"


def _encode_sample(sample: Sample) -> tuple[bytes, dict[str, int]] | str:
    """The sample's tar members (json + image) and each member's crc32 by extension, or why it was skipped."""
    w = _worker
    try:
        data = w["read"](sample.member)
    except Exception as e:  # a vanished file, a permission problem, a damaged zip entry
        return f"unreadable ({type(e).__name__}: {e})"
    image = _decode(data)
    if isinstance(image, str):
        return image
    if w["crop"]:
        side = round(FACE_CROP_FRACTION * min(image.size))
        image = functional.center_crop(image, [side, side])
    image = lab_resize(image, w["size"])
    buf = io.BytesIO()
    if w["ext"] == "npy":
        np.save(buf, np.ascontiguousarray(np.asarray(image, dtype=np.uint8)), allow_pickle=False)
    elif w["ext"] == "png":
        image.save(buf, "PNG", **PNG_OPTIONS)
    else:
        image.save(buf, "JPEG", **JPG_OPTIONS)
    names = w["attribute_names"]
    label = {"id": sample.key, "split": sample.split,
             "attributes": dict(zip(names, sample.attributes)) if names and sample.attributes else None,
             "identity": sample.identity, "landmarks": sample.landmarks, "bbox": sample.bbox}
    members = {"json": json.dumps(label, separators=(",", ":")).encode(), w["ext"]: buf.getvalue()}
    return (b"".join(_tar_member(f"{sample.key}.{ext}", members[ext]) for ext in sorted(members)),
            {ext: zlib.crc32(data) for ext, data in members.items()})


def _encode_chunk(task: tuple[str, int, list[Sample]]) -> tuple[str, int, list[tuple[bytes, dict[str, int]] | str]]:
    split, position, samples = task
    return split, position, [_encode_sample(s) for s in samples]


# ------------------------------------------------------------------------------------------ writing

class _ShardFile:
    """A tar being written under a temporary name; `finish` completes it and renames it into place durably,
    `abort` removes it. (`fileio.atomic_path` wants one `with` block; a shard spans many `add` calls.)"""

    def __init__(self, path: Path):
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        self.file = open(self.tmp, "wb")
        self.sha, self.bytes, self.samples = hashlib.sha256(), 0, 0
        self.crc32: dict[str, list[int]] = {}

    def add(self, members: bytes, crc32: dict[str, int]) -> None:
        """Append one sample's members, with their crc32 by extension."""
        self.write(members)
        self.samples += 1
        for ext, crc in crc32.items():
            self.crc32.setdefault(ext, []).append(crc)

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.sha.update(data)
        self.bytes += len(data)

    def finish(self) -> dict:
        end = bytes(2 * tarfile.BLOCKSIZE)  # end-of-archive, then padding to a whole record, as tarfile does
        self.write(end + bytes(-(self.bytes + len(end)) % tarfile.RECORDSIZE))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)
        return {"name": self.path.name, "samples": self.samples, "bytes": self.bytes, "sha256": self.sha.hexdigest(),
                "crc32": self.crc32, "staged": True}

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


class _SplitWriter:
    """Cuts one split's encoded samples, in order, into shards of `shard_size` in the staging folder,
    journalling each finished one."""

    def __init__(self, staging: Path, split: str, samples: list[Sample], settings: dict, journal, *,
                 shard_size: int, start: int, index: int, display: Callable[[str], str]):
        self.staging, self.split, self.samples, self.settings, self.journal = staging, split, samples, settings, journal
        self.shard_size, self.start, self.index, self.display = shard_size, start, index, display
        self.current: _ShardFile | None = None
        self.pending_skips: list[dict] = []  # inputs skipped since the last finished shard
        self.finished: list[dict] = []  # shard entries, each with the skips among its inputs

    def add(self, position: int, result: tuple[bytes, dict[str, int]] | str, strict: bool) -> None:
        if isinstance(result, str):
            skip = {"file": self.display(self.samples[position].member), "reason": result}
            if strict:
                raise ShardError(f"{skip['file']}: {result} (--strict makes skipped inputs fatal)")
            self.pending_skips.append(skip)
            return
        if self.current is None:
            self.current = _ShardFile(self.staging / shard_name(self.split, self.index))
        self.current.add(*result)
        if self.current.samples == self.shard_size:
            self._close(position + 1)

    def _close(self, end: int) -> None:
        entry = {**self.current.finish(), "inputs": [self.start, end],
                 "plan": _plan_hash(self.settings, self.samples[self.start:end]), "skipped": self.pending_skips}
        self.current = None
        self.journal.write(json.dumps(entry) + "\n")
        self.journal.flush()
        self.finished.append(entry)
        self.start, self.index, self.pending_skips = end, self.index + 1, []

    def finish(self) -> list[dict]:
        """Close the last shard; returns skips after it (there are some only when the split ends in bad files)."""
        if self.current is not None:
            self._close(len(self.samples))
        return self.pending_skips

    def abort(self) -> None:
        if self.current is not None:
            self.current.abort()


def _reusable_prefix(out: Path, split: str, samples: list[Sample], settings: dict, previous: dict[str, list[dict]],
                     display: Callable[[str], str]) -> tuple[list[dict], int]:
    """The split's leading shards already on disk (in `out`, or staged by an unfinished build) from an identical
    plan, with their skips and whether they are staged; and the next input."""
    entries, start = [], 0
    while start < len(samples) and (found := _reusable(out, previous.get(shard_name(split, len(entries)), []),
                                                       start, settings, samples)):
        old, staged = found
        end = old["inputs"][1]
        files = {display(s.member) for s in samples[start:end]}
        entries.append({**{k: old[k] for k in SHARD_FIELDS}, "staged": staged,
                        "skipped": [s for s in old["skipped"] if s["file"] in files]})
        start = end
    return entries, start


def _reusable(out: Path, candidates: list[dict], start: int, settings: dict,
              samples: list[Sample]) -> tuple[dict, bool] | None:
    """The first candidate entry made from the inputs from `start` with these settings whose file is intact, and
    whether that file is staged; None if there is none."""
    for old in candidates:
        try:
            begin, end = old["inputs"]
            if not (begin == start and end > start and old["plan"] == _plan_hash(settings, samples[start:end])
                    and all(k in old for k in (*SHARD_FIELDS, "skipped"))):
                continue
            for staged, path in ((False, out / old["name"]), (True, out / STAGING_NAME / old["name"])):
                if path.is_file() and path.stat().st_size == old["bytes"] and sha256_of(path) == old["sha256"]:
                    return old, staged
        except (TypeError, KeyError, ValueError):
            continue
    return None


def _run_workers(tasks: list, writers: dict[str, _SplitWriter], *, workers: int, initargs: tuple, strict: bool,
                 log: Callable[[str], None]) -> None:
    """Encode the tasks in parallel and hand the results, in input order, to their split's writer."""
    todo, done, started = sum(len(t[2]) for t in tasks), 0, time.perf_counter()
    processes = min(workers, len(tasks))
    with process_pool(processes, _init_worker, initargs) as pool:
        for split, position, results in ordered_map(pool, _encode_chunk, tasks, 2 * processes):
            writer = writers[split]
            before = len(writer.finished)
            for offset, result in enumerate(results):
                writer.add(position + offset, result, strict)
            done += len(results)
            for entry in writer.finished[before:]:
                log(f"{entry['name']}: {entry['samples']} samples, {entry['bytes'] / 1e6:.1f} MB "
                    f"({done:,}/{todo:,} images, {done / (time.perf_counter() - started):,.0f} img/s)")


def build_shards(source: Path, out: Path, *, size: int = 64, fmt: str = "png", shard_size: int = 5000,
                 workers: int | None = None, valid_fraction: float = 0.1, allow_missing: bool = False,
                 strict: bool = False, crop: bool = False, seed: int = 0, fast_decode: bool = False,
                 log: Callable[[str], None] | None = None) -> dict:
    """Build `out/celeba64-{split}-NNNNNN.tar` and `out/manifest.json` from `source`; returns the manifest.

    `fast_decode` decodes JPEGs at a reduced DCT scale: faster, but not pixel-identical to the
    lab's transform of the full image, so it is off by default. Raises ShardError on bad input.
    """
    log = log or (lambda message: None)
    if fmt not in FORMATS:
        raise ShardError(f"format: got {fmt!r}, expected one of png, jpg, raw")
    for name, value in (("size", size), ("shard_size", shard_size), ("workers", 1 if workers is None else workers)):
        if value < 1:
            raise ShardError(f"{name}: got {value}, expected at least 1")
    if not 0.0 <= valid_fraction < 1.0:
        raise ShardError(f"valid_fraction: got {valid_fraction}, expected a value in [0, 1)")
    ext, workers = FORMATS[fmt], workers or default_workers()
    started = time.perf_counter()
    src = find_source(Path(source))
    lists = read_lists(src.lists_dir)
    with gc_paused():
        by_split, skipped, missing = _plan_samples(src, lists, valid_fraction=valid_fraction, seed=seed,
                                                   allow_missing=allow_missing)
    if strict and skipped:
        raise ShardError(f"{skipped[0]['file']}: {skipped[0]['reason']} (--strict makes skipped inputs fatal)")
    if not any(by_split.values()):
        raise ShardError(f"{src.path}: no images to build from, expected at least one ({len(skipped):,} not listed in "
                         f"{lists.partition_file}, {missing['count']:,} listed but missing)")
    preprocessing = {
        "transform": f"Resize({size}) + CenterCrop({size}) (dcgan_dist.data.images.lab_resize, PIL bilinear)",
        "face_crop": f"centred square of side round({FACE_CROP_FRACTION:.4f} x shorter side), first" if crop else None,
        "decode": "JPEG draft (reduced DCT scale, not pixel-identical)" if fast_decode else "full resolution",
        "encoding": {"png": PNG_OPTIONS, "jpg": JPG_OPTIONS, "npy": "np.save of uint8 (size, size, 3)"}[ext],
    }
    settings = {"tool": TOOL, "format": ext, "size": size, "preprocessing": preprocessing, "shard_size": shard_size}

    out = Path(out)
    staging = out / STAGING_NAME
    if out.exists() and not out.is_dir():
        raise ShardError(f"{out}: exists and is not a folder, expected a folder for the shards (--out)")
    try:
        staging.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ShardError(f"{out}: cannot create the shard folder ({type(e).__name__}: {e.strerror})") from None
    previous = _previous_shards(out)
    for stale in [*out.glob("*.tmp"), *staging.glob("*.tmp")]:  # from a killed build
        if SHARD_NAME.fullmatch(stale.name[:-4]) or stale.name in (MANIFEST_NAME + ".tmp", JOURNAL_NAME + ".tmp"):
            stale.unlink()
    shards, starts = {}, {}
    for split in SPLITS:
        shards[split], starts[split] = _reusable_prefix(out, split, by_split[split], settings, previous, src.display)
    kept_skips = [s for entries in shards.values() for e in entries for s in e["skipped"]]
    if strict and kept_skips:
        raise ShardError(f"{kept_skips[0]['file']}: {kept_skips[0]['reason']} (skipped by an earlier build; "
                         "--strict makes skipped inputs fatal)")
    # The journal: the shards kept from before, then each new one as it is finished.
    atomic_write(out / JOURNAL_NAME, "".join(json.dumps(entry) + "\n" for entries in shards.values() for entry in entries))
    kept = sum(len(entries) for entries in shards.values())
    if kept:
        log(f"kept {kept} complete shards from an earlier build of the same input and options")
    tasks = [(split, p, by_split[split][p:p + CHUNK]) for split in SPLITS
             for p in range(starts[split], len(by_split[split]), CHUNK)]
    todo = sum(len(t[2]) for t in tasks)
    with open(out / JOURNAL_NAME, "a") as journal:
        writers = {split: _SplitWriter(staging, split, by_split[split], settings, journal, shard_size=shard_size,
                                       start=starts[split], index=len(shards[split]), display=src.display)
                   for split in SPLITS}
        try:
            if tasks:
                log(f"{todo:,} images from {src.path} ({src.layout}) with {workers} workers")
                _run_workers(tasks, writers, workers=workers, strict=strict, log=log,
                             initargs=(src.images, size, ext, crop, fast_decode, lists.attribute_names))
            for split, writer in writers.items():
                skipped += writer.finish()
                shards[split] += writer.finished
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
    skipped += [s for entries in shards.values() for e in entries for s in e["skipped"]]
    if not any(shards.values()):
        raise ShardError(f"{src.path}: no image could be used, expected at least one "
                         f"({skipped[0]['file']}: {skipped[0]['reason']}; {len(skipped):,} skipped)")
    manifest = _manifest(src, lists, ext, size, preprocessing, shards, skipped, missing)
    _replace_build(out, manifest, [e for entries in shards.values() for e in entries])
    _log_summary(log, manifest, out, todo, time.perf_counter() - started)
    return manifest


def _replace_build(out: Path, manifest: dict, entries: list[dict]) -> None:
    """Put the finished build in place of the previous one: the staged shards move into `out`, shards of the
    previous build that this one lacks are deleted, and the manifest is written last.

    The previous manifest goes first, so no manifest ever names a shard being replaced; an interruption
    in between leaves the journal, from which the next build resumes.
    """
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    fsync_dir(out)
    for entry in entries:
        if entry["staged"]:
            os.replace(out / STAGING_NAME / entry["name"], out / entry["name"])
    names = {entry["name"] for entry in entries}
    for path in out.iterdir():
        if SHARD_NAME.fullmatch(path.name) and path.name not in names:
            path.unlink()  # left by an earlier build with more shards
    fsync_dir(out)
    write_manifest(out, manifest)
    (out / JOURNAL_NAME).unlink()
    shutil.rmtree(out / STAGING_NAME)


def _manifest(src: CelebaSource, lists: CelebaLists, ext: str, size: int, preprocessing: dict,
              shards: dict[str, list[dict]], skipped: list[dict], missing: dict) -> dict:
    source = {"path": str(src.path.resolve()), "layout": src.layout,
              "images": src.images.name if src.is_zip else src.display(""),
              "lists": sorted(lists.files.values())}
    synth = src.lists_dir / SYNTH_JSON
    if synth.is_file():
        source["synthetic"] = json.loads(synth.read_text())
    splits = {split: {"samples": sum(e["samples"] for e in entries),
                      "shards": [{k: e[k] for k in SHARD_FIELDS} for e in entries]}
              for split, entries in shards.items()}
    all_shards = [e for entries in shards.values() for e in entries]
    return {"tool": TOOL, "format": ext, "size": size, "preprocessing": preprocessing, "source": source,
            "splits": splits,
            "totals": {"samples": sum(e["samples"] for e in all_shards), "bytes": sum(e["bytes"] for e in all_shards),
                       "shards": len(all_shards)},
            "skipped": sorted(skipped, key=lambda s: s["file"]), "missing": missing}


def _log_summary(log: Callable[[str], None], manifest: dict, out: Path, encoded: int, seconds: float) -> None:
    splits = ", ".join(f"{split} {v['samples']:,} in {len(v['shards'])} shards" for split, v in manifest["splits"].items())
    log(f"{out}: {splits}; {manifest['totals']['bytes'] / 1e6:,.1f} MB; "
        f"{encoded:,} images encoded in {seconds:.1f} s ({encoded / max(seconds, 1e-9):,.0f} img/s)")
    if manifest["missing"]["count"]:
        log(f"missing: {manifest['missing']['count']:,} listed images not present (--allow-missing)")
    if manifest["skipped"]:
        reasons = Counter(s["reason"].split(" (")[0] for s in manifest["skipped"])
        log(f"skipped {len(manifest['skipped'])} inputs: " + ", ".join(f"{n} {r}" for r, n in reasons.most_common())
            + f" (each named in {out / MANIFEST_NAME})")
