"""SHA-256 manifests of exported files: what ``tools/export_checkpoint.py`` writes beside its outputs and what every
reader of an export checks before it uses one.

An export is a set of files users copy around (``FILE.safetensors`` + ``FILE.json``, or a Hugging Face folder).
Its manifest names every file with its size and SHA-256; a reader recomputes them and refuses a file that differs
(a truncated download, a disk error, an edited file) in one line.  The manifest is plain JSON: reading it runs no
code, and the files it lists are safetensors and JSON (never unpickled) or, in a Hugging Face folder of a VQMoE
model, the ``trust_remote_code`` Python files, which vqmoe-ds itself never imports.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Iterable, Optional

from .layout import CheckpointError, file_digest, write_atomic

FOLDER_MANIFEST = "vqmoe_manifest.json"  # a Hugging Face export's manifest (in the folder)


def file_manifest_path(path: str) -> str:
    """The manifest of a single-file export ``FILE.safetensors``: ``FILE.sha256.json``."""
    return os.path.splitext(path)[0] + ".sha256.json"


def write_manifest(manifest_path: str, folder: str, names: Iterable[str]) -> Dict[str, Dict[str, object]]:
    """Record size and SHA-256 of each of ``names`` (files of ``folder``) in ``manifest_path`` (written atomically)."""
    files = {}
    for name in sorted(names):
        full = os.path.join(folder, name)
        files[name] = {"size": os.path.getsize(full), "sha256": file_digest(full)}
    write_atomic(manifest_path, json.dumps({"format": "vqmoe-export-manifest", "files": files}, indent=1))
    return files


def verify_manifest(manifest_path: str, folder: str, required: bool = True, what: Optional[str] = None) -> bool:
    """Check every file the manifest lists (present, same size, same SHA-256).  Returns False when there is no
    manifest and ``required`` is False (a folder that was not exported by vqmoe-ds); raises `CheckpointError`
    naming the first bad file otherwise."""
    what = what or folder
    if not os.path.isfile(manifest_path):
        if not required:
            return False
        raise CheckpointError(f"{what} has no checksum manifest ({os.path.basename(manifest_path)}): export it again "
                              f"with tools/export_checkpoint.py, which writes one")
    try:
        with open(manifest_path) as f:
            files = json.load(f)["files"]
        items = [(str(name), int(rec["size"]), str(rec["sha256"])) for name, rec in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{manifest_path} is not a valid checksum manifest ({type(e).__name__}): export the "
                              f"model again") from None
    for name, size, sha in items:
        full = os.path.join(folder, name)
        if os.path.basename(name) != name or not os.path.isfile(full):
            raise CheckpointError(f"{what}: {name}, listed in {os.path.basename(manifest_path)}, is missing: copy the "
                                  f"whole export again")
        if os.path.getsize(full) != size:
            raise CheckpointError(f"{what}: {name} has {os.path.getsize(full)} bytes, {size} were exported (truncated "
                                  f"or replaced): copy the export again")
        if file_digest(full) != sha:
            raise CheckpointError(f"{what}: {name} does not match the SHA-256 recorded when it was exported (its "
                                  f"content changed): copy the export again")
    return True


__all__ = ["FOLDER_MANIFEST", "file_manifest_path", "write_manifest", "verify_manifest"]
