"""The on-disk layout of a checkpoint folder, and the one error type of the checkpoint package.

A save folder (``--save``; the default is ``OUT_DIR/checkpoints``)::

    latest                  the tag of the newest *complete* checkpoint (DeepSpeed's pointer file)
    step{N}/                regular saves (the last ``--keep-last`` are kept); best/ the best validation metric
      mp_rank_00_model_states.pt                     DeepSpeed: dense weights, client state (step, data, config)
      layer_{l}_expert_{e}_mp_rank_00_model_states.pt  DeepSpeed: one file per expert, named by *global* id
      *_optim_states.pt                              DeepSpeed: optimizer partitions (ZeRO 1/2) when present
      rank{r}_state.pt      per rank: RNG states, module buffers, the task's per-rank state (TXL memory)
      vqmoe_complete.json   the completion marker: every file with its size and SHA-256, step, world size, configs
    .tmp_{tag}/             a save in progress (never loaded; removed by the next save)
    .old_{tag}/             the previous ``{tag}`` during its replacement (a complete checkpoint)

Only this module spells these names; everything else asks it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Dict, List, Optional, Tuple

BEST = "best"
LATEST = "latest"
MARKER = "vqmoe_complete.json"
MODEL_FILE = "mp_rank_00_model_states.pt"
TMP_PREFIX, OLD_PREFIX = ".tmp_", ".old_"
STEP_TAG = re.compile(r"^step(\d+)$")
EXPERT_FILE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")
# DeepSpeed's partitioned optimizer state (ZeRO 1/2, fp32 or bf16): one file per data-parallel rank
ZERO_OPTIM_FILE = re.compile(r"^(bf16_)?zero_pp_rank_\d+_mp_rank_\d+_optim_states\.pt$")
# a parameter key of one expert in a DeepSpeed MoE layer: (layer prefix, global expert id, parameter name)
EXPERT_KEY = re.compile(r"^(.*)\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(.+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be saved, read or used as asked; the message is one line naming the problem and
    the fix."""


def expert_file(layer: int, expert: int) -> str:
    return f"layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt"


def rank_file(rank: int) -> str:
    return f"rank{rank}_state.pt"


def step_tag(step: int) -> str:
    return f"step{step}"


# ---- durable writes ----------------------------------------------------------------------------------------
def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    try:
        fsync_file(path)
    except OSError:  # some file systems cannot fsync a folder; the rename is still atomic
        pass


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` so that a reader sees the old content or the new one, never a mix (temp, fsync, rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def list_files(folder: str) -> Dict[str, int]:
    """Every file under ``folder`` (relative path -> size in bytes)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            full = os.path.join(root, name)
            out[os.path.relpath(full, folder)] = os.path.getsize(full)
    return out


# ---- finding a checkpoint ----------------------------------------------------------------------------------
def step_tags(save_dir: str) -> List[Tuple[int, str]]:
    """Complete regular checkpoints in ``save_dir`` as (step, tag), oldest first."""
    if not os.path.isdir(save_dir):
        return []
    tags = []
    for name in os.listdir(save_dir):
        m = STEP_TAG.match(name)
        if m and os.path.isfile(os.path.join(save_dir, name, MARKER)):
            tags.append((int(m.group(1)), name))
    return sorted(tags)


def read_latest(load_dir: str) -> Optional[str]:
    path = os.path.join(load_dir, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip() or None


def resolve(path: str, tag: Optional[str] = None) -> Tuple[str, str]:
    """(save_dir, tag) of the checkpoint to load, from any of: a run's OUT_DIR, its save folder, or one tag's folder;
    ``tag`` None (or "latest"): the one ``latest`` names.  A one-line error when there is none."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} {'is not a folder' if os.path.exists(path) else 'does not exist'}: "
                              f"give a run's --out-dir, its checkpoints folder or one checkpoint (e.g. "
                              f"OUT_DIR/checkpoints/best)")
    if os.path.isfile(os.path.join(path, MODEL_FILE)):  # a tag folder
        if tag is not None and tag != os.path.basename(os.path.normpath(path)):
            raise CheckpointError(f"--tag {tag} given with the checkpoint folder {path}: give the parent folder "
                                  f"with --tag, or the tag folder alone")
        return os.path.dirname(os.path.normpath(path)), os.path.basename(os.path.normpath(path))
    if not os.path.isfile(os.path.join(path, LATEST)) and os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")  # a run's OUT_DIR with the default --save
    tag = _tag_in(path, tag)
    if not os.path.isfile(os.path.join(path, tag, MODEL_FILE)):
        have = sorted(d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, MODEL_FILE)))
        raise CheckpointError(f"{os.path.join(path, tag)} holds no DeepSpeed model states: choose a tag of "
                              f"{', '.join(have) or '(none)'}")
    return path, tag


def _tag_in(load_dir: str, tag: Optional[str]) -> str:
    if tag is None or tag == LATEST:
        tag = read_latest(load_dir)
        if tag is None:
            done = step_tags(load_dir)
            hint = (f"it has complete checkpoint {done[-1][1]}: write that tag into {load_dir}/latest"
                    if done else "give the --save folder of a run that saved (--save-interval) or start without --load")
            raise CheckpointError(f"no checkpoint in {load_dir} (no 'latest' file): {hint}")
    if tag == BEST and not os.path.isdir(os.path.join(load_dir, BEST)) and \
            os.path.isdir(os.path.join(load_dir, OLD_PREFIX + BEST)):
        tag = OLD_PREFIX + BEST  # killed between the two renames of a best save: the previous best is complete
    return tag


def file_digest(path: str, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file (hex).  Why SHA-256: measured 1.6 GB/s on one core here (the CPU's SHA instructions),
    close to zlib's CRC32 (2.4 GB/s), and it cannot miss a change the way a 32-bit sum can."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def digests(folder: str, names: List[str], share: Tuple[int, int] = (0, 1)) -> Dict[str, str]:
    """SHA-256 of the files of ``names`` that fall to this rank: file i of the sorted names when i % world == rank
    (``share`` = (rank, world)), so the ranks of a job split the reading."""
    rank, world = share
    return {n: file_digest(os.path.join(folder, n)) for i, n in enumerate(sorted(names)) if i % world == rank}


def last_good(load_dir: str, but: str) -> str:
    """The newest other checkpoint whose files are all present at their saved sizes (a hint for messages)."""
    for _, tag in reversed(step_tags(load_dir)):
        if tag != but:
            try:
                verify(load_dir, tag, checksums=False)
                return os.path.join(load_dir, tag)
            except CheckpointError:
                continue
    return "none is left: start without --load"


def verify_checksums(load_dir: str, tag: str, marker: Dict[str, Any], share: Tuple[int, int] = (0, 1)) -> None:
    """Every file (of this rank's ``share``) has the SHA-256 the marker recorded; a mismatch is one line naming the
    file and the last good checkpoint.  Markers without checksums pass."""
    recorded = marker.get("sha256") or {}
    path = os.path.join(load_dir, tag)
    for name, digest in digests(path, list(recorded), share).items():
        if digest != recorded[name]:
            raise CheckpointError(f"checkpoint {path}: {name} does not match the checksum recorded at its save (its "
                                  f"content changed): restore the file or load the last good checkpoint, "
                                  f"{last_good(load_dir, tag)}")


def verify(load_dir: str, tag: str, checksums: bool = True) -> Dict[str, Any]:
    """Check that checkpoint ``tag`` is complete (every file of its marker present at its saved size) and, with
    ``checksums``, that every file has its recorded SHA-256; return its marker.  Raises CheckpointError naming the
    missing, truncated or changed file."""
    path = os.path.join(load_dir, tag)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist: choose a saved tag "
                              f"({', '.join(t for _, t in step_tags(load_dir)) or 'none complete'})")
    marker_path = os.path.join(path, MARKER)
    if not os.path.isfile(marker_path):
        raise CheckpointError(f"checkpoint {path} is incomplete (no {MARKER}: its save did not finish, or it was not "
                              f"written by vqmoe-ds): load another tag or re-save it")
    try:
        with open(marker_path) as f:
            marker = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: unreadable {MARKER} ({e}): load another tag") from None
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict):
        raise CheckpointError(f"checkpoint {path}: {MARKER} lists no files (no 'files' record: it was not written "
                              f"by vqmoe-ds or was edited): load another tag or re-save it")
    for name, size in sorted(marker["files"].items()):
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            raise CheckpointError(f"checkpoint {path} is missing {name}: restore the file or load another tag")
        actual = os.path.getsize(full)
        if actual != size:
            raise CheckpointError(f"checkpoint {path}: {name} has {actual} bytes, {size} were saved (truncated or "
                                  f"overwritten): restore the file or load another tag")
    if checksums:
        verify_checksums(load_dir, tag, marker)
    return marker
