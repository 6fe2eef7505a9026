"""The OCI distribution client: the one module of unionimg that talks HTTP to a registry.

Why httpx and ~350 lines of the distribution spec here rather than a ready client library:
oras-py 0.2.x keeps custom media types, but its plain push reads a whole blob into memory
(layer blobs are hundreds of MiB), it does not resume a pull with Range, does not check a
blob's digest while it streams it to disk, and its cross-repository mount is not exposed the
way a deploy needs it (try a mount, fall back to an upload in the same session). The parts of
the spec unionimg needs are small and stable (``/v2/`` API, distribution-spec v1.1):

    HEAD /v2/R/blobs/D                         does R hold blob D (and its size)
    POST /v2/R/blobs/uploads/?mount=D&from=S   mount D from repository S (201), or an upload
                                               session (202) when S lacks it
    POST /v2/R/blobs/uploads/                  an upload session (its Location); a POST with a
                                               body is ignored by Distribution 2.8, so never one
    PATCH LOCATION (Content-Range a-b)         one chunk (``chunk_size``), streamed from the file
    PUT LOCATION?digest=D                      close the session: the registry checks D
    PUT/GET /v2/R/manifests/REF                a manifest by tag or digest, with its media type
    HEAD /v2/R/manifests/REF                   the digest REF names (a PUT that would change
                                               nothing is not sent)
    GET /v2/R/blobs/D (Range: bytes=N-)        a blob, resumed from byte N of a ``.partial`` file
    GET /v2/R/tags/list, /v2/_catalog          listings

httpx (a maintained, typed HTTP client) gives connection reuse, separate connect/read/write
timeouts and streaming bodies both ways; everything else is here: bounded retries (a broken
transfer, or an answer in :data:`TRANSIENT` such as the 500 a Distribution registry gives a
read racing a write of the same file, is retried ``retries`` times with backoff, a pull
resuming where it stopped), the sha256 of every
blob checked as it arrives before the file is renamed into place (a mismatch removes the
partial file: exit 5), and byte counters (:class:`Counters`) for the callers' reports.

A registry that does not answer is one line naming its URL and what to do. No auth: unionimg
talks to a registry it started on a trusted address (see ``docs/oci.md`` for a production
setup with TLS and token auth in front).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Final

import httpx

from unionimg.display import shown
from unionimg.errors import NotFound, ToolFailed, UsageError
from unionimg.fs.follow import Growing
from unionimg.fs.manifest import sha256_file
from unionimg.fs.pagecache import DropBehind, drop
from unionimg.registry.manifests import (
    MAX_MANIFEST,
    MEDIA_MANIFEST,
    check_digest,
    check_repo,
    digest_of,
)
from unionimg.store.layout import fsync_dir

CHUNK: Final = 8 << 20
"""Bytes per PATCH of a chunked upload, and per read of a blob."""
MAX_LISTING: Final = 8 << 20
"""A catalog or tag list larger than this is refused (a registry is a remote party)."""
RETRIES: Final = 3
KNOWN_MAX: Final = 16 << 20
"""Bytes of checked manifests and small blobs one client keeps by digest (asked again, they
are not fetched again)."""
TRANSIENT: Final = frozenset({429, 500, 502, 503, 504})
"""Answers another attempt may get past. Distribution's filesystem storage rewrites a link or
manifest file in place (truncate, then write), so a GET racing a PUT of the same manifest reads
an empty file and answers 500 "invalid checksum digest format" (distribution issue #4489); two
deploys of one system at once did that."""
MAX_RETRY_AFTER: Final = 10.0
"""A registry's Retry-After is honoured up to this many seconds."""
TIMEOUT: Final = httpx.Timeout(connect=5.0, read=60.0, write=60.0, pool=10.0)

_URL = re.compile(
    r"https?://[A-Za-z0-9.\-]+(:[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?"
)


def check_url(url: str) -> str:
    """A registry URL: ``http(s)://HOST[:PORT]`` with nothing after it; returned without a
    trailing slash."""
    url = url.rstrip("/")
    if not _URL.fullmatch(url):
        raise UsageError(
            f"registry URL {url!r} is not http(s)://HOST[:PORT] (no path, user or query), "
            "e.g. http://127.0.0.1:5000"
        )
    return url


@dataclass
class Counters:
    """What a client sent and received (payload bytes, not headers) and what it saved."""

    bytes_up: int = 0
    bytes_down: int = 0
    blobs_uploaded: int = 0
    blobs_mounted: int = 0
    blobs_present: int = 0
    blobs_fetched: int = 0
    bytes_resumed: int = 0
    requests: int = 0
    retried: int = 0
    """Requests sent again after a broken connection or a transient answer (TRANSIENT)."""

    def to_json(self) -> dict[str, int]:
        return asdict(self)


class _Retry(Exception):
    """A transfer broke in a way another attempt may get past (the connection, or a
    TRANSIENT answer: then its cause is the ToolFailed that answer makes, and ``answer``
    the answer, whose Retry-After the next attempt honours)."""

    def __init__(self, answer: httpx.Response | None = None) -> None:
        super().__init__()
        self.answer = answer


class Registry:
    """One registry at ``url``; use as a context manager (closes its connections)."""

    def __init__(
        self,
        url: str,
        *,
        retries: int = RETRIES,
        chunk_size: int = CHUNK,
        timeout: httpx.Timeout = TIMEOUT,
        backoff: float = 0.2,
    ) -> None:
        self.url = check_url(url)
        self.retries = max(0, retries)
        self.chunk_size = max(1, chunk_size)
        self.backoff = backoff
        self.counters = Counters()
        # manifests and small blobs already fetched and checked, by (repo, digest): content
        # addressed, so never stale; a pull of many nodes asks for the shared ones once
        self._known: dict[tuple[str, str], bytes] = {}
        self._known_bytes = 0
        self._http = httpx.Client(
            base_url=self.url, timeout=timeout, follow_redirects=False, trust_env=False
        )

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- the plumbing ---------------------------------------------------------------------
    def _gave_up(self, exc: _Retry) -> ToolFailed:
        """The error of a last failed attempt: the registry's own answer when it gave one."""
        cause = exc.__cause__
        return cause if isinstance(cause, ToolFailed) else self._down(cause or exc)

    def _down(self, exc: BaseException) -> ToolFailed:
        why = shown(str(exc))[:160] or type(exc).__name__
        return ToolFailed(
            f"registry {self.url} does not answer ({why}); start it "
            "('unionimg registry serve --dir DIR --listen ADDR') or check --registry"
        )

    def _pause(self, attempt: int, resp: httpx.Response | None = None) -> None:
        """Wait before attempt ``attempt + 1``: exponential backoff, or the answer's
        Retry-After (seconds, at most MAX_RETRY_AFTER) when it asks for longer."""
        wait = self.backoff * 2**attempt
        after = resp.headers.get("retry-after", "") if resp is not None else ""
        if after.isdigit():
            wait = max(wait, min(float(after), MAX_RETRY_AFTER))
        self.counters.retried += 1
        time.sleep(wait)

    def _request(self, method: str, url: str | httpx.URL, **kw: Any) -> httpx.Response:
        """One request with bounded retries on connection errors and TRANSIENT answers (all
        of unionimg's requests but the streamed ones are idempotent or restartable); the last
        answer is returned whatever its status."""
        for attempt in range(self.retries + 1):
            self.counters.requests += 1
            try:
                resp = self._http.request(method, url, **kw)
            except httpx.TransportError as exc:
                if attempt == self.retries:
                    raise self._down(exc) from None
                self._pause(attempt)
                continue
            if resp.status_code not in TRANSIENT or attempt == self.retries:
                return resp
            self._pause(attempt, resp)
        raise AssertionError("unreachable")

    def _fail(self, resp: httpx.Response, what: str) -> ToolFailed | NotFound:
        detail = ""
        with contextlib.suppress(Exception):
            errors = resp.json().get("errors") or []
            if errors and isinstance(errors[0], dict):
                detail = f"{errors[0].get('code', '')}: {errors[0].get('message', '')}"
        detail = shown(detail or resp.reason_phrase or "")[:200]
        msg = f"registry {self.url}: {what}: HTTP {resp.status_code} {detail}".rstrip()
        if resp.status_code == 404:
            return NotFound(msg)
        return ToolFailed(msg)

    # -- listings and presence --------------------------------------------------------------
    def ping(self) -> None:
        """The registry answers the /v2/ API (exception otherwise)."""
        resp = self._request("GET", "/v2/")
        if resp.status_code != 200:
            raise self._fail(resp, "the /v2/ API")

    def _get_bounded(
        self,
        path: str,
        what: str,
        limit: int,
        *,
        params: dict[str, int] | None = None,
        headers: dict[str, str] | None = None,
        follow_redirects: bool = False,
        missing_ok: bool = False,
    ) -> bytes | None:
        """A GET whose body is read into memory, at most ``limit`` bytes (more: one line,
        refused), with bounded retries on connection errors and TRANSIENT answers; None on
        404 if ``missing_ok``."""
        for attempt in range(self.retries + 1):
            self.counters.requests += 1
            body = bytearray()
            try:
                with self._http.stream(
                    "GET", path, params=params, headers=headers, follow_redirects=follow_redirects
                ) as resp:
                    if missing_ok and resp.status_code == 404:
                        return None
                    if resp.status_code != 200:
                        resp.read()
                        if resp.status_code in TRANSIENT and attempt < self.retries:
                            self._pause(attempt, resp)
                            continue
                        raise self._fail(resp, what)
                    for part in resp.iter_bytes():
                        body += part
                        if len(body) > limit:
                            raise ToolFailed(
                                f"registry {self.url}: {what} is larger than {limit} bytes; refused"
                            )
            except httpx.TransportError as exc:
                if attempt == self.retries:
                    raise self._down(exc) from None
                self._pause(attempt)
                continue
            self.counters.bytes_down += len(body)
            return bytes(body)
        raise AssertionError("unreachable")

    def _listing(self, path: str, params: dict[str, int], key: str, what: str) -> list[str] | None:
        """A JSON listing (``{KEY: [names]}``) read up to :data:`MAX_LISTING` bytes; None
        on 404; a body that is no such object is one line."""
        body = self._get_bounded(path, what, MAX_LISTING, params=params, missing_ok=True)
        if body is None:
            return None
        try:
            names = json.loads(body).get(key) or []
        except (ValueError, AttributeError):
            raise ToolFailed(f"registry {self.url}: {what}: the answer is not JSON") from None
        if not isinstance(names, list):
            raise ToolFailed(f"registry {self.url}: {what}: '{key}' is not a list")
        return [n for n in names if isinstance(n, str)]

    def catalog(self, limit: int = 1000) -> list[str]:
        """The registry's repositories (at most ``limit``)."""
        names = self._listing("/v2/_catalog", {"n": limit}, "repositories", "listing repositories")
        return names or []

    def tags(self, repo: str) -> list[str]:
        """The tags of ``repo`` ([] for a repository with none or that does not exist)."""
        path = f"/v2/{check_repo(repo)}/tags/list"
        names = self._listing(path, {"n": 10000}, "tags", f"listing the tags of {repo}")
        return sorted(names or [])

    def blob_size(self, repo: str, digest: str) -> int | None:
        """The size of blob ``digest`` in ``repo``, or None when ``repo`` lacks it."""
        resp = self._request("HEAD", f"/v2/{check_repo(repo)}/blobs/{check_digest(digest)}")
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise self._fail(resp, f"asking for blob {digest} in {repo}")
        length = resp.headers.get("content-length", "")
        return int(length) if length.isdigit() else -1

    # -- pushing blobs ----------------------------------------------------------------------
    def push_blob(
        self, repo: str, path: Path, digest: str, *, mount_from: Sequence[str] = ()
    ) -> str:
        """Make ``repo`` hold blob ``digest`` (the file ``path``): ``"present"`` when it
        already does, ``"mounted"`` when a repository of ``mount_from`` had it (no bytes sent),
        else ``"uploaded"`` in chunks. The registry checks the digest when the upload closes."""
        check_repo(repo)
        check_digest(digest)
        size = path.stat().st_size
        if self.blob_size(repo, digest) is not None:
            self.counters.blobs_present += 1
            return "present"
        location: str | None = None
        for source in mount_from:
            if source == repo:
                continue
            resp = self._request(
                "POST",
                f"/v2/{repo}/blobs/uploads/",
                params={"mount": digest, "from": check_repo(source)},
            )
            if resp.status_code == 201:
                self.counters.blobs_mounted += 1
                return "mounted"
            if resp.status_code != 202:
                raise self._fail(resp, f"mounting blob {digest} from {source} into {repo}")
            # the source lacks it: the registry opened an upload session instead; use it
            location = resp.headers.get("location")
            break
        for attempt in range(self.retries + 1):
            try:
                self._upload(repo, path, digest, size, location)
                self.counters.blobs_uploaded += 1
                return "uploaded"
            except _Retry as exc:
                location = None
                if attempt == self.retries:
                    raise self._gave_up(exc) from None
                self._pause(attempt, exc.answer)
        raise AssertionError("unreachable")

    def push_bytes(self, repo: str, data: bytes, digest: str | None = None) -> str:
        """A small blob (a config) from memory, in one session; returns its digest."""
        digest = digest or digest_of(data)
        if self.blob_size(repo, digest) is not None:
            self.counters.blobs_present += 1
            return digest
        location = self._open_upload(repo, None)
        resp = self._request(
            "PUT",
            _with_digest(location, digest),
            content=data,
            headers={"content-type": "application/octet-stream"},
        )
        if resp.status_code != 201:
            raise self._fail(resp, f"uploading blob {digest} to {repo}")
        self.counters.bytes_up += len(data)
        self.counters.blobs_uploaded += 1
        return digest

    def _open_upload(self, repo: str, location: str | None) -> httpx.URL:
        if location is None:
            resp = self._request("POST", f"/v2/{repo}/blobs/uploads/")
            if resp.status_code != 202 or "location" not in resp.headers:
                raise self._fail(resp, f"starting an upload to {repo}")
            location = resp.headers["location"]
        return self._http.base_url.join(location)

    def _upload(self, repo: str, path: Path, digest: str, size: int, location: str | None) -> None:
        url = self._open_upload(repo, location)
        sent = 0
        try:
            with path.open("rb") as fh:
                while sent < size:
                    data = fh.read(self.chunk_size)
                    if not data:
                        raise ToolFailed(f"{path} shrank while it was uploaded (push it again)")
                    end = sent + len(data) - 1
                    self.counters.requests += 1
                    resp = self._http.patch(
                        url,
                        content=data,
                        headers={
                            "content-type": "application/octet-stream",
                            "content-range": f"{sent}-{end}",
                            "content-length": str(len(data)),
                        },
                    )
                    if resp.status_code != 202:
                        failed = self._fail(resp, f"uploading a chunk of blob {digest} to {repo}")
                        if resp.status_code in TRANSIENT:  # a new session starts over
                            raise _Retry(resp) from failed
                        raise failed
                    sent += len(data)
                    self.counters.bytes_up += len(data)
                    url = self._http.base_url.join(resp.headers.get("location", str(url)))
            self.counters.requests += 1
            resp = self._http.put(_with_digest(url, digest), headers={"content-length": "0"})
        except httpx.TransportError as exc:
            raise _Retry() from exc
        if resp.status_code != 201:
            raise self._fail(resp, f"closing the upload of blob {digest} to {repo}")

    # -- manifests --------------------------------------------------------------------------
    def put_manifest(
        self, repo: str, ref: str, data: bytes, media_type: str = MEDIA_MANIFEST
    ) -> str:
        """Store manifest ``data`` in ``repo`` under ``ref`` (a tag, or its own digest);
        returns its digest (checked against the registry's answer). A ``ref`` that already
        names these very bytes is not written again: Distribution rewrites the files in place,
        and a reader racing that write gets a 500 (see :data:`TRANSIENT`)."""
        digest = digest_of(data)
        if self.manifest_digest(repo, ref, media_type) == digest:
            return digest
        resp = self._request(
            "PUT",
            f"/v2/{check_repo(repo)}/manifests/{ref}",
            content=data,
            headers={"content-type": media_type},
        )
        if resp.status_code != 201:
            raise self._fail(resp, f"storing manifest {ref} in {repo}")
        said = resp.headers.get("docker-content-digest")
        if said is not None and said != digest:
            raise ToolFailed(
                f"registry {self.url} stored manifest {ref} in {repo} as {said[:80]}, not {digest}"
            )
        self.counters.bytes_up += len(data)
        return digest

    def manifest_digest(self, repo: str, ref: str, media_type: str = MEDIA_MANIFEST) -> str | None:
        """The digest the registry says ``ref`` of ``repo`` names (its Docker-Content-Digest
        header), or None when it holds no such manifest or does not say. Only a hint: what is
        pulled is checked against its own digest."""
        resp = self._request(
            "HEAD",
            f"/v2/{check_repo(repo)}/manifests/{ref}",
            headers={"accept": media_type},
        )
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise self._fail(resp, f"asking for manifest {ref} in {repo}")
        said = resp.headers.get("docker-content-digest", "")
        return said if said.startswith("sha256:") else None

    def get_manifest(
        self, repo: str, ref: str, media_type: str = MEDIA_MANIFEST
    ) -> tuple[bytes, str]:
        """Manifest ``ref`` (a tag or a digest) of ``repo``: its bytes and digest. Fetched by
        digest, the bytes are checked against it; by tag, the digest is computed (never taken
        from the registry's header)."""
        path = f"/v2/{check_repo(repo)}/manifests/{ref}"
        known = self._known.get((repo, ref)) if ref.startswith("sha256:") else None
        if known is not None:
            return known, ref
        what = f"manifest {ref} of {repo}"
        data = self._get_bounded(path, what, MAX_MANIFEST, headers={"accept": media_type})
        assert data is not None  # not missing_ok: a 404 raised NotFound
        digest = digest_of(data)
        if ref.startswith("sha256:") and digest != ref:
            raise ToolFailed(
                f"manifest {repo}@{ref} from registry {self.url} has digest {digest}: refused "
                "(damaged or tampered in the registry; push it again)"
            )
        self._keep(repo, digest, data)
        return data, digest

    def _keep(self, repo: str, digest: str, data: bytes) -> None:
        """Remember checked content by its digest (up to :data:`KNOWN_MAX` bytes in all)."""
        if (repo, digest) in self._known or self._known_bytes + len(data) > KNOWN_MAX:
            return
        self._known[(repo, digest)] = data
        self._known_bytes += len(data)

    # -- fetching blobs ---------------------------------------------------------------------
    def get_small_blob(self, repo: str, digest: str, max_size: int = 1 << 20) -> bytes:
        """A small blob (a config) into memory, checked against ``digest``."""
        check_digest(digest)
        path = f"/v2/{check_repo(repo)}/blobs/{digest}"
        known = self._known.get((repo, digest))
        if known is not None and len(known) <= max_size:
            return known
        data = self._get_bounded(path, f"blob {digest} of {repo}", max_size, follow_redirects=True)
        assert data is not None  # not missing_ok: a 404 raised NotFound
        if digest_of(data) != digest:
            raise ToolFailed(_tampered(self.url, repo, digest, digest_of(data)))
        self._keep(repo, digest, data)
        return data

    def fetch_blob(
        self,
        repo: str,
        digest: str,
        size: int,
        dest: Path,
        *,
        on_bytes: Callable[[int], None] | None = None,
        follow: Growing | None = None,
    ) -> int:
        """Blob ``digest`` of ``repo`` (``size`` bytes, from its manifest) into ``dest``.

        The bytes go to ``dest.partial`` first; a partial file left by an earlier, broken
        transfer is resumed with ``Range: bytes=N-`` (the registry answers 206; a 200 starts
        over). The sha256 is computed while the bytes arrive (over the partial file's part
        first); only a match renames the file to ``dest``; a mismatch, or more bytes than
        ``size``, removes the partial file and raises ToolFailed. Returns the bytes received.
        ``follow``: told where the bytes are written and how far, and when ``dest`` is
        complete and verified, so readers can consume the blob as it arrives (a pull
        extracting it meanwhile: :mod:`unionimg.fs.follow`); the caller fails it on error."""
        check_repo(repo)
        check_digest(digest)
        partial = dest.with_name(dest.name + ".partial")
        received = 0
        for attempt in range(self.retries + 1):
            try:
                got, actual = self._fetch_once(repo, digest, size, partial, on_bytes, follow)
                received += got
                break
            except _Retry as exc:
                if attempt == self.retries:
                    kept = partial.stat().st_size if partial.exists() else 0
                    if not kept:
                        raise self._gave_up(exc) from None
                    raise ToolFailed(
                        f"the transfer of blob {digest} from registry {self.url} broke after "
                        f"{kept} of {size} bytes ({shown(str(exc.__cause__))[:120]}); "
                        f"{partial} is kept: pull again to resume"
                    ) from None
                self._pause(attempt, exc.answer)
        if actual != digest:
            partial.unlink(missing_ok=True)
            raise ToolFailed(_tampered(self.url, repo, digest, actual))
        os.replace(partial, dest)
        fsync_dir(dest.parent)
        self.counters.blobs_fetched += 1
        if follow is not None:
            follow.finish(dest)
        return received

    def _stream_into(
        self,
        resp: httpx.Response,
        fh: IO[bytes],
        h: hashlib._Hash,
        limit: int,
        refuse: Callable[[], ToolFailed],
        on_bytes: Callable[[int], None] | None = None,
    ) -> int:
        """The answer's body written to ``fh`` and hashed into ``h``, then fsynced; at most
        ``limit`` bytes (one more: ``refuse()`` is raised). Returns the bytes written. What
        is written leaves the page cache behind the writer (:class:`DropBehind`): the host
        keeps the blob, it does not read it again but once, as it arrives."""
        got = 0
        start = fh.tell()
        behind = DropBehind(fh.fileno(), start)
        for part in resp.iter_bytes():
            if got + len(part) > limit:
                raise refuse()
            fh.write(part)
            h.update(part)
            got += len(part)
            self.counters.bytes_down += len(part)
            if on_bytes is not None:
                on_bytes(len(part))
            behind.at(start + got)
        fh.flush()
        os.fsync(fh.fileno())
        drop(fh.fileno())
        return got

    def fetch_range(self, repo: str, digest: str, start: int, end: int, dest: Path) -> str:
        """Bytes ``start`` to ``end`` (exclusive) of blob ``digest`` of ``repo`` into ``dest``
        (written whole, fsynced; retried from the start on a broken transfer), with
        ``Range: bytes=START-END-1`` (the registry answers 206 with that Content-Range; any
        other answer, or more or fewer bytes, is refused). Returns the range's sha256."""
        check_repo(repo)
        check_digest(digest)
        want = end - start
        if start < 0 or want <= 0:
            raise UsageError(f"byte range {start}-{end} of blob {digest}: empty or negative")
        headers = {"range": f"bytes={start}-{end - 1}"}
        for attempt in range(self.retries + 1):
            self.counters.requests += 1
            h, got = hashlib.sha256(), 0
            try:
                with self._http.stream(
                    "GET", f"/v2/{repo}/blobs/{digest}", headers=headers, follow_redirects=True
                ) as resp:
                    if resp.status_code != 206:
                        resp.read()
                        failed = self._fail(resp, f"bytes {start}-{end} of blob {digest}")
                        if resp.status_code in TRANSIENT and attempt < self.retries:
                            self._pause(attempt, resp)
                            continue
                        raise failed
                    if _range_start(resp.headers.get("content-range", "")) != start:
                        raise ToolFailed(
                            f"registry {self.url} answered bytes {start}-{end} of blob {digest} "
                            f"with {shown(resp.headers.get('content-range', ''))[:40]!r}; refused"
                        )
                    with dest.open("wb") as fh:
                        got = self._stream_into(
                            resp,
                            fh,
                            h,
                            want,
                            lambda: ToolFailed(
                                f"registry {self.url} sent more than bytes {start}-{end} "
                                f"of blob {digest}; refused"
                            ),
                        )
            except httpx.TransportError as exc:
                if attempt == self.retries:
                    raise self._down(exc) from None
                self._pause(attempt)
                continue
            if got != want:
                raise ToolFailed(
                    f"registry {self.url} sent {got} of bytes {start}-{end} of blob {digest}; "
                    "refused"
                )
            return "sha256:" + h.hexdigest()
        raise AssertionError("unreachable")

    def _wrong_size(
        self, repo: str, digest: str, said: str, size: int, partial: Path
    ) -> ToolFailed:
        partial.unlink(missing_ok=True)
        return ToolFailed(
            f"registry {self.url} serves blob {digest} of {repo} as {shown(said)[:20]} bytes, "
            f"its manifest says {size}: refused, nothing imported (damaged or truncated in the "
            "registry; push it again)"
        )

    def _fetch_once(
        self,
        repo: str,
        digest: str,
        size: int,
        partial: Path,
        on_bytes: Callable[[int], None] | None,
        follow: Growing | None = None,
    ) -> tuple[int, str]:
        """One GET of the blob's rest; returns the bytes received and the whole file's
        sha256, computed as the bytes arrive (over the resumed prefix first)."""
        have = partial.stat().st_size if partial.exists() else 0
        if have > size:
            partial.unlink()
            have = 0
        if follow is not None:
            follow.begin(partial, have)
        if have == size:
            return 0, "sha256:" + sha256_file(partial)
        headers = {"range": f"bytes={have}-"} if have else {}
        received = 0
        self.counters.requests += 1
        try:
            # a registry with object storage redirects blob GETs (S3, a CDN): followed, the
            # bytes are checked by digest whoever serves them
            with self._http.stream(
                "GET", f"/v2/{repo}/blobs/{digest}", headers=headers, follow_redirects=True
            ) as resp:
                if resp.status_code == 206:
                    start = _range_start(resp.headers.get("content-range", ""))
                    if start != have:
                        raise ToolFailed(
                            f"registry {self.url} answered a resume of blob {digest} at byte "
                            f"{have} with bytes from {start}; remove {partial} and pull again"
                        )
                    total = resp.headers.get("content-range", "").rpartition("/")[2]
                    if total not in ("*", str(size)):
                        raise self._wrong_size(repo, digest, total, size, partial)
                    self.counters.bytes_resumed += have
                    mode, h = "ab", _sha256_of(partial)
                elif resp.status_code == 200:
                    length = resp.headers.get("content-length")
                    if length is not None and length != str(size):
                        raise self._wrong_size(repo, digest, length, size, partial)
                    have, mode, h = 0, "wb", hashlib.sha256()
                    if follow is not None:
                        follow.begin(partial, 0)  # started over: readers past 0 restart
                else:
                    resp.read()
                    failed = self._fail(resp, f"blob {digest} of {repo}")
                    if resp.status_code in TRANSIENT:
                        raise _Retry(resp) from failed
                    raise failed

                def too_much() -> ToolFailed:
                    partial.unlink(missing_ok=True)
                    return ToolFailed(
                        f"registry {self.url} sent more than the {size} bytes of blob "
                        f"{digest} in {repo}: refused (damaged or tampered; push it again)"
                    )

                with partial.open(mode) as fh:
                    arrived = on_bytes
                    if follow is not None:
                        tail = _Tail(fh, follow, have, on_bytes)
                        arrived = tail.wrote
                    received = self._stream_into(resp, fh, h, size - have, too_much, arrived)
        except httpx.TransportError as exc:
            raise _Retry() from exc
        if have + received < size:
            raise _Retry() from ConnectionError(
                f"the transfer of blob {digest} stopped at byte {have + received} of {size}"
            )
        return received, "sha256:" + h.hexdigest()


class _Tail:
    """After each part written: flushed, and the follower told how far the file goes."""

    def __init__(
        self, fh: IO[bytes], follow: Growing, start: int, on_bytes: Callable[[int], None] | None
    ) -> None:
        self._fh, self._follow, self._end, self._on_bytes = fh, follow, start, on_bytes

    def wrote(self, n: int) -> None:
        self._fh.flush()
        self._end += n
        self._follow.wrote(self._end)
        if self._on_bytes is not None:
            self._on_bytes(n)


def _with_digest(url: httpx.URL | str, digest: str) -> httpx.URL:
    return httpx.URL(url).copy_merge_params({"digest": digest})


def _range_start(value: str) -> int:
    m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", value.strip())
    return int(m.group(1)) if m else -1


def _tampered(url: str, repo: str, digest: str, actual: str) -> str:
    return (
        f"blob {digest} of {repo} from registry {url} has digest {actual}: refused, "
        "nothing imported (damaged or tampered in the registry; push it again)"
    )


def _sha256_of(path: Path) -> hashlib._Hash:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for part in iter(lambda: fh.read(CHUNK), b""):
            h.update(part)
    return h
