"""The library versions tram_dist is tested with, and the check of the private internals it uses.

Some backends reach past the public API (FSDP1's flat-parameter handles, ZeRO's fragment
mappings and partition buffers). A version without them must fail when the backend is built,
naming what is missing and what was tested, never later with a wrong norm or a silent no-op.
"""
from __future__ import annotations

from importlib import metadata

# Tested together (CI installs exactly these through the Makefile and pyproject's test extra).
TESTED = {"torch": "2.13.0", "deepspeed": "0.19.8", "transformers": "5.24.0", "accelerate": "1.15.0",
          "peft": "0.21.2", "trl": "1.16.0"}


def installed(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def require(package: str, what: str, present: bool) -> None:
    """Raise ValueError when an internal of `package` that a backend needs is absent."""
    if not present:
        raise ValueError(f"{package} {installed(package)} lacks {what}, which tram_dist's backend relies on; "
                         f"tram_dist is tested with {package} {TESTED[package]} (all tested versions: {TESTED})")
