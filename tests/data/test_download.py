"""`python -m cbn_detect.data.download` without the internet: a local HTTP server (with Range
support) serves a tiny VOC folder as a tar; checksums, a cut-short transfer, resuming, offline."""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from torchvision.datasets.voc import DATASET_YEAR_DICT

from cbn_detect.data.download import DATASETS, Archive, DownloadError, download, main
from cbn_detect.data.voc import VOCDataset
from tests.helpers.voc_fixture import STANDARD_SPLITS, write_standard_voc


class Server:
    """Serves ``files`` (name -> bytes) on 127.0.0.1; ``cut_after`` sends only that many bytes of a
    response (announcing the full length) and then drops the connection; ``requests`` records
    (path, Range header, status)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut_after: int | None = None
        self.requests: list[tuple[str, str | None, int]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                name = self.path.lstrip("/")
                data = server.files.get(name)
                wanted = self.headers.get("Range")
                if data is None:
                    server.requests.append((name, wanted, 404))
                    self.send_error(404)
                    return
                start = int(wanted.removeprefix("bytes=").split("-")[0]) if wanted else 0
                if start >= len(data) and wanted:
                    server.requests.append((name, wanted, 416))
                    self.send_error(416)
                    return
                status = 206 if wanted else 200
                server.requests.append((name, wanted, status))
                body = data[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                if wanted:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                self.wfile.write(body if server.cut_after is None else body[: server.cut_after])
                self.wfile.flush()
                if server.cut_after is not None:
                    self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    with Server() as running:
        yield running


def voc_tar(tmp_path: Path) -> bytes:
    """The shared test fixture's VOCdevkit/VOC2007 folder as an uncompressed tar, like VOC's."""
    write_standard_voc(tmp_path / "source")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(tmp_path / "source" / "VOCdevkit", arcname="VOCdevkit")
    return buffer.getvalue()


def archive_of(server: Server, name: str, data: bytes, md5: str | None = None) -> Archive:
    server.files[name] = data
    return Archive(f"https://example.invalid/voc2007/{name}", md5 or hashlib.md5(data).hexdigest())


def test_download_verify_and_extract_into_the_devkit_layout(tmp_path, server):
    archive = archive_of(server, "VOCtiny.tar", voc_tar(tmp_path))
    devkit = download("voc2007", tmp_path / "data", mirror=server.url, archives=[archive])
    assert devkit == tmp_path / "data" / "VOCdevkit"
    test_set = VOCDataset(devkit, "test", year="2007")
    assert test_set.ids == list(STANDARD_SPLITS["test"])
    assert not (tmp_path / "data" / "VOCtiny.tar").exists()  # the tar is removed once extracted
    assert server.requests == [("VOCtiny.tar", None, 200)]
    # A second run finds it extracted and downloads nothing.
    download("voc2007", tmp_path / "data", mirror=server.url, archives=[archive])
    assert len(server.requests) == 1


def test_a_wrong_checksum_is_refused_in_one_line_and_the_file_deleted(tmp_path, server):
    archive = archive_of(server, "VOCtiny.tar", voc_tar(tmp_path), md5="0" * 32)
    with pytest.raises(DownloadError) as err:
        download("voc2007", tmp_path / "data", mirror=server.url, archives=[archive])
    message = str(err.value)
    assert "\n" not in message and "MD5" in message and "0" * 32 in message
    assert list((tmp_path / "data").iterdir()) == []
    assert not (tmp_path / "data" / "VOCdevkit").exists()


def test_a_cut_short_download_is_refused_then_resumed_with_a_range_request(tmp_path, server):
    data = voc_tar(tmp_path)
    archive = archive_of(server, "VOCtiny.tar", data)
    server.cut_after = 5000
    with pytest.raises(DownloadError) as err:
        download("voc2007", tmp_path / "data", mirror=server.url, archives=[archive])
    assert str(err.value) == (
        f"the download of {server.url}VOCtiny.tar stopped at 5000 of {len(data)} bytes; "
        "rerun the same command to resume it"
    )
    part = tmp_path / "data" / "VOCtiny.tar.part"
    assert part.read_bytes() == data[:5000]
    assert not (tmp_path / "data" / "VOCdevkit").exists()

    server.cut_after = None
    download("voc2007", tmp_path / "data", mirror=server.url, archives=[archive])
    assert server.requests[-1] == ("VOCtiny.tar", "bytes=5000-", 206)
    assert not part.exists()
    assert (tmp_path / "data" / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main" / "test.txt").is_file()


def test_an_archive_already_in_root_is_verified_and_extracted_without_a_download(tmp_path):
    data = voc_tar(tmp_path)
    archive = Archive("http://127.0.0.1:9/VOCtiny.tar", hashlib.md5(data).hexdigest())  # nothing listens
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "VOCtiny.tar").write_bytes(data)
    devkit = download("voc2007", tmp_path / "data", archives=[archive], keep_archives=True)
    assert (devkit / "VOC2007" / "Annotations" / "000001.xml").is_file()
    assert (tmp_path / "data" / "VOCtiny.tar").exists()


def test_offline_is_one_line_saying_what_to_do(tmp_path, capsys, server):
    port = server.httpd.server_address[1]
    server.httpd.shutdown()
    server.httpd.server_close()  # the port now refuses connections, as with no network
    assert main(["voc2012", "--root", str(tmp_path), "--mirror", f"http://127.0.0.1:{port}/", "--timeout", "5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"download: error: cannot reach 127.0.0.1:{port} (")
    assert "offline? Fetch " in err and "VOCtrainval_11-May-2012.tar" in err and "--mirror" in err


def test_the_official_list_is_torchvisions():
    theirs = {(v["url"], v["md5"]) for k, v in DATASET_YEAR_DICT.items() if k in ("2007", "2007-test", "2012")}
    ours = {(a.url, a.md5) for archives in DATASETS.values() for a in archives}
    assert ours == theirs
