"""Download PASCAL VOC into the layout ``data.root`` expects:
``python -m cbn_detect.data.download voc2007|voc2012 --root DIR``.

The official tar files (torchvision's ``VOCDetection`` list: same URLs, same MD5s) are fetched into
``DIR``, checked against their MD5, and extracted there, which gives ``DIR/VOCdevkit/VOC2007/``
(``Annotations``, ``JPEGImages``, ``ImageSets``) for ``data=voc07 data.root=DIR/VOCdevkit``; VOC2012
lands beside it for ``data=voc0712``. A download that stops part-way (a dropped connection, ^C)
leaves ``<file>.part``; the same command continues it with an HTTP Range request. An archive already
in ``DIR`` (downloaded on another machine, or with a browser) is verified and extracted without a
download, which is the way to install VOC on a machine without internet access. ``--mirror`` fetches
the same files by name from another server.

Exit status: 0 done, 2 a problem the one-line message says how to fix (offline, wrong checksum,
download cut short, not a tar file).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit
from urllib.request import Request, urlopen

from tqdm import tqdm

from cbn_detect.runtime.errors import ReportedError

log = logging.getLogger(__name__)

CHUNK = 1 << 20


@dataclass(frozen=True)
class Archive:
    """One tar file: where it is served and its MD5 (as torchvision's ``voc.py`` lists them)."""

    url: str
    md5: str

    @property
    def filename(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    def at(self, mirror: str | None) -> str:
        """The URL to fetch: the official one, or the same file name under ``mirror``."""
        return self.url if mirror is None else f"{mirror.rstrip('/')}/{self.filename}"


OFFICIAL = "https://thor.robots.ox.ac.uk/pascal/VOC"
DATASETS: dict[str, tuple[Archive, ...]] = {
    "voc2007": (
        Archive(f"{OFFICIAL}/voc2007/VOCtrainval_06-Nov-2007.tar", "c52e279531787c972589f7e41ab4ae64"),
        Archive(f"{OFFICIAL}/voc2007/VOCtest_06-Nov-2007.tar", "b6e924de25625d8de591ea690078ad9f"),
    ),
    "voc2012": (Archive(f"{OFFICIAL}/voc2012/VOCtrainval_11-May-2012.tar", "6cd6e144f989b92b3379bac3b3de84fd"),),
}
"""torchvision's ``VOCDetection`` archives (``torchvision/datasets/voc.py``); VOC2012 has no public
test annotations."""


class DownloadError(ReportedError):
    """A download or an archive that cannot be used; the one-line message says what to do."""


def md5_of(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


class Unreachable(Exception):
    """The server could not be reached (no network, refused, timed out); ``reason`` says how."""

    def __init__(self, url: str, reason: object) -> None:
        super().__init__(f"{url}: {reason}")
        self.url, self.reason = url, reason


def _offline(err: Unreachable, urls: Sequence[str], root: Path) -> DownloadError:
    host = urlsplit(err.url).netloc or err.url
    files = " and ".join(urls)
    return DownloadError(
        f"cannot reach {host} ({err.reason}): offline? Fetch {files} on a machine with internet access, "
        f"put {'them' if len(urls) > 1 else 'it'} in {root} and rerun this command (it verifies and extracts "
        "archives already there), or pass --mirror URL of a server holding the same files"
    )


def fetch(
    url: str, part: Path, *, timeout: float = 60.0, progress: Callable[[int, int | None], None] | None = None
) -> None:
    """Download ``url`` into ``part``, continuing the bytes already there (HTTP Range; a server that
    ignores it sends the whole file again). Raises :class:`DownloadError` when the transfer ends
    before the size the server announced (the bytes received are kept, so the next call continues)
    and :class:`Unreachable` when the server cannot be reached."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "cbn_detect-download"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urlopen(Request(url, headers=headers), timeout=timeout)  # noqa: S310 (http/https only)
    except HTTPError as err:
        if err.code == 416 and have:  # nothing left to send: the part is complete (the MD5 decides)
            return
        raise DownloadError(f"{url}: HTTP {err.code} {err.reason} (check the URL or --mirror)") from None
    except URLError as err:
        raise Unreachable(url, err.reason) from None
    except (HTTPException, OSError) as err:  # a timeout or a reset before the headers
        raise Unreachable(url, err) from None
    with response:
        resumed = have > 0 and response.status == 206
        if have and not resumed:
            log.info("%s does not support resuming; downloading %s again from the start", url, part.name)
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        received = have
        with part.open("ab" if resumed else "wb") as out:
            while True:
                try:
                    block = response.read(CHUNK)
                except (HTTPException, OSError) as err:  # IncompleteRead, a reset connection, a timeout
                    log.debug("transfer of %s stopped: %s", url, err)
                    break
                if not block:
                    break
                out.write(block)
                received += len(block)
                if progress is not None:
                    progress(received, total)
    if total is not None and received < total:
        raise DownloadError(
            f"the download of {url} stopped at {received} of {total} bytes; rerun the same command to resume it"
        )


def _verify(path: Path, archive: Archive) -> None:
    actual = md5_of(path)
    if actual != archive.md5:
        raise DownloadError(
            f"{path} has MD5 {actual}, not the expected {archive.md5} (a corrupt download or another file): "
            "delete it and rerun"
        )


def _extract(path: Path, root: Path) -> None:
    try:
        with tarfile.open(path) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(root, filter="data")  # no absolute paths, links or devices out of root
            else:  # Python < 3.10.12 / 3.11.4: refuse members that would land outside root
                for member in tar.getmembers():
                    target = (root / member.name).resolve()
                    if not target.is_relative_to(root.resolve()) or member.issym() or member.islnk():
                        raise DownloadError(f"{path}: member {member.name!r} would land outside {root}")
                tar.extractall(root)  # noqa: S202 (checked above)
    except (tarfile.TarError, EOFError) as err:
        raise DownloadError(f"{path} is not a readable tar file ({err}): delete it and rerun") from None


def _progress(name: str) -> Callable[[int, int | None], None]:
    """A tqdm bar on a terminal; otherwise a log line every 10%."""
    if sys.stderr.isatty():
        bar = tqdm(desc=name, unit="B", unit_scale=True, unit_divisor=1024, leave=False)

        def update(received: int, total: int | None) -> None:
            if total is not None and bar.total != total:
                bar.total = total
            bar.update(received - bar.n)

        return update
    shown = [-1]

    def log_tenths(received: int, total: int | None) -> None:
        tenth = 10 * received // total if total else -1
        if tenth > shown[0]:
            shown[0] = tenth
            log.info("%s: %d%% of %.1f MB", name, 10 * tenth, total / 1e6)

    return log_tenths


def download(
    dataset: str,
    root: Path,
    *,
    mirror: str | None = None,
    archives: Sequence[Archive] | None = None,
    keep_archives: bool = False,
    timeout: float = 60.0,
) -> Path:
    """Download, verify and extract ``dataset`` (a key of :data:`DATASETS`) into ``root``; returns
    ``root/VOCdevkit``, the folder ``data.root`` takes. ``archives`` replaces the dataset's list
    (URLs and MD5s) and ``mirror`` the server; an archive already extracted is skipped, one already
    in ``root`` is verified instead of downloaded. ``keep_archives`` keeps the tar files."""
    if dataset not in DATASETS:
        raise DownloadError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    voc_dir = root / "VOCdevkit" / f"VOC{dataset[-4:]}"
    archives = list(archives if archives is not None else DATASETS[dataset])

    def extracted(archive: Archive) -> bool:
        return (root / f".{archive.filename}.extracted").exists() and voc_dir.is_dir()

    for archive in archives:
        if extracted(archive):
            log.info("%s already extracted in %s", archive.filename, root)
            continue
        path = root / archive.filename
        if path.exists():  # fetched by hand (offline install) or kept by --keep-archives
            log.info("verifying %s", path)
            _verify(path, archive)
        else:
            url = archive.at(mirror)
            part = path.with_name(path.name + ".part")
            log.info("downloading %s%s", url, f" (continuing at {part.stat().st_size} bytes)" if part.exists() else "")
            try:
                fetch(url, part, timeout=timeout, progress=_progress(archive.filename))
            except Unreachable as err:
                missing = [a.at(mirror) for a in archives if not extracted(a) and not (root / a.filename).exists()]
                raise _offline(err, missing, root) from None
            try:
                _verify(part, archive)
            except DownloadError:
                part.unlink()
                raise DownloadError(
                    f"{url} gave a file whose MD5 is not the expected {archive.md5}; it was deleted, rerun to "
                    "download it again (or try another --mirror)"
                ) from None
            part.replace(path)
        log.info("extracting %s into %s", path.name, root)
        _extract(path, root)
        (root / f".{archive.filename}.extracted").touch()
        if not keep_archives:
            path.unlink()
    if not voc_dir.is_dir():
        raise DownloadError(
            f"the archives held no VOCdevkit/{voc_dir.name} folder: {root} is not laid out as data.root expects"
        )
    return root / "VOCdevkit"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cbn_detect.data.download",
        description="Download PASCAL VOC (the official tar files), verify their MD5 and extract them into "
        "ROOT/VOCdevkit/VOC<year>, the layout data.root expects. Resumes a partial download; an archive "
        "already in ROOT is verified and extracted without downloading (the way to install offline).",
        epilog="Then: python -m cbn_detect.train data=voc07 data.root=ROOT/VOCdevkit (data=voc0712 needs "
        "voc2007 and voc2012 in the same ROOT).",
    )
    parser.add_argument("dataset", choices=sorted(DATASETS), help="voc2007: trainval + test; voc2012: trainval")
    parser.add_argument("--root", type=Path, required=True, help="folder that receives VOCdevkit/")
    parser.add_argument("--mirror", help="fetch the same file names from this URL instead (e.g. http://host/voc/)")
    parser.add_argument("--keep-archives", action="store_true", help="keep the tar files after extracting them")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds without data before giving up (60)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)  # stderr: the error alone
    try:
        devkit = download(
            args.dataset, args.root, mirror=args.mirror, keep_archives=args.keep_archives, timeout=args.timeout
        )
    except (ReportedError, OSError) as err:
        print(f"download: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(f"{args.dataset} is ready: use data.root={devkit}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
