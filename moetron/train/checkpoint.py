"""Checkpoints that are either complete or absent.

Layout of ``runs/<name>/checkpoints/``::

    step_00000500/
        model.safetensors   weights and persistent buffers (safetensors; tied weights stored once)
        train_state.pt      optimizer, scheduler, RNG states, data position, non-persistent buffers (torch.save)
        manifest.json       byte size and sha256 of both files, written last
    latest                  the name of the newest complete checkpoint

The format is the one-process model's whatever the run's layout: expert-parallel training
(moetron/train/distributed.py) gathers the expert shards and their optimizer state to rank 0, which writes them in
global expert order, and ``load_checkpoint`` slices them back for an expert-parallel model. So a checkpoint resumes at
any EP size and ``moetron generate`` reads it.

A checkpoint is written into a hidden temporary folder, flushed to disk, and renamed into place in one step; only
then does ``latest`` move (itself replaced atomically) and are older checkpoints pruned. A crash at any moment
therefore leaves the previous good checkpoint untouched. Loading checks every file against the manifest, so a
truncated or altered checkpoint raises ``CheckpointError`` instead of resuming from garbage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import torch

__all__ = ["CheckpointError", "save_checkpoint", "find_checkpoint", "verify_checkpoint", "load_checkpoint",
           "load_weights", "list_checkpoints"]

MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, truncated or corrupt."""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint folder that has a manifest, oldest first (not verified)."""
    ck = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ck):
        return []
    out = []
    for name in os.listdir(ck):
        if name.startswith("step_") and os.path.isfile(os.path.join(ck, name, MANIFEST_FILE)):
            try:
                out.append((int(name[5:]), os.path.join(ck, name)))
            except ValueError:
                continue
    return sorted(out)


def _save_state_dict(sd: dict, path: str, metadata: dict) -> None:
    """safetensors.torch.save_model for a state dict: names sharing one tensor (tied weights) are stored once,
    under the first name in sorted order, and the others recorded in the metadata (what save_model does)."""
    from safetensors.torch import save_file

    by_id: dict = {}
    for name in sorted(sd):
        by_id.setdefault(id(sd[name]), []).append(name)
    out, meta = {}, dict(metadata)
    for names in by_id.values():
        out[names[0]] = sd[names[0]].contiguous()
        for other in names[1:]:
            meta.setdefault(other, names[0])
    save_file(out, path, metadata=meta)


def save_checkpoint(run_dir: str, step: int, model: torch.nn.Module | dict, state: dict, *, keep: int = 2) -> str:
    """Write checkpoint ``step`` (model weights + the training ``state`` dict) atomically; keep the newest ``keep``.
    ``model``: the module, or its one-process state dict (expert-parallel training gathers one; tied weights are
    the same tensor object under each name). Returns the checkpoint folder."""
    from safetensors.torch import save_model

    ck = os.path.join(run_dir, "checkpoints")
    os.makedirs(ck, exist_ok=True)
    final = os.path.join(ck, step_dirname(step))
    tmp = os.path.join(ck, f".tmp-{step_dirname(step)}-{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    model_path = os.path.join(tmp, MODEL_FILE)
    state_path = os.path.join(tmp, STATE_FILE)
    if isinstance(model, dict):
        _save_state_dict(model, model_path, {"step": str(step), "format": "pt"})
    else:
        save_model(model, model_path, metadata={"step": str(step), "format": "pt"})
    torch.save(state, state_path)
    files = {}
    for name, path in ((MODEL_FILE, model_path), (STATE_FILE, state_path)):
        _fsync_file(path)
        files[name] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
    manifest = {"format_version": FORMAT_VERSION, "step": step, "files": files}
    with open(os.path.join(tmp, MANIFEST_FILE), "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if os.path.exists(final):
        # The same step saved again (a resumed run stopped where it started): swap, never leave a gap.
        old = os.path.join(ck, f".old-{step_dirname(step)}-{os.getpid()}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(ck)
    _atomic_write_text(os.path.join(ck, "latest"), step_dirname(step) + "\n")
    for s, path in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        if s != step:
            shutil.rmtree(path, ignore_errors=True)
    return final


def find_checkpoint(run_dir: str) -> str:
    """The newest checkpoint folder of a run (from ``latest``, else the highest step with a manifest)."""
    ck = os.path.join(run_dir, "checkpoints")
    latest = os.path.join(ck, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            name = f.read().strip()
        path = os.path.join(ck, name)
        if name.startswith("step_") and os.path.isdir(path):
            return path
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"no checkpoint in {ck!r} (nothing to resume or load; train first)")
    return found[-1][1]


def verify_checkpoint(path: str, names: tuple[str, ...] = (MODEL_FILE, STATE_FILE)) -> dict:
    """Check the files ``names`` of a checkpoint (default: all) against its manifest; returns the manifest.
    Raises CheckpointError."""
    mpath = os.path.join(path, MANIFEST_FILE)
    if not os.path.isfile(mpath):
        raise CheckpointError(f"checkpoint {path!r} is incomplete: it has no {MANIFEST_FILE} (the write was cut "
                              "short); delete that folder to fall back to the previous checkpoint")
    try:
        with open(mpath) as f:
            manifest = json.load(f)
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path!r} has an unreadable {MANIFEST_FILE}: {e}") from e
    for name in names:
        fpath = os.path.join(path, name)
        if name not in files:
            raise CheckpointError(f"checkpoint {path!r}: {MANIFEST_FILE} does not list {name}")
        if not os.path.isfile(fpath):
            raise CheckpointError(f"checkpoint {path!r} is missing {name}")
        size = os.path.getsize(fpath)
        if size != files[name]["bytes"]:
            raise CheckpointError(f"checkpoint {path!r}: {name} is truncated or altered ({size} bytes, the manifest "
                                  f"says {files[name]['bytes']}); delete that folder to fall back to the previous "
                                  "checkpoint")
        if _sha256(fpath) != files[name]["sha256"]:
            raise CheckpointError(f"checkpoint {path!r}: {name} is corrupt (its sha256 does not match the manifest); "
                                  "delete that folder to fall back to the previous checkpoint")
    return manifest


def _is_expert_parallel(model: torch.nn.Module) -> bool:
    from ..parallel import ParallelGroups

    return any(isinstance(getattr(m, "parallel", None), ParallelGroups) and m.parallel.ep_size > 1
               for m in model.modules())


def _load_global(model: torch.nn.Module, file: str):
    """Load a one-process weights file into an expert-parallel model: MoELayer's load hook slices each expert
    tensor [E, ...] to this rank's experts (by global expert id). Tied names stored once get the kept tensor."""
    from safetensors.torch import load_file

    sd = load_file(file, device="cpu")
    aliases: dict = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    for names in aliases.values():
        have = [n for n in names if n in sd]
        for n in names:
            if have and n not in sd:
                sd[n] = sd[have[0]]
    result = model.load_state_dict(sd, strict=False)
    return list(result.missing_keys), list(result.unexpected_keys)


def load_weights(path: str, model: torch.nn.Module) -> int:
    """Verify and load only the weights of checkpoint ``path`` into ``model`` (strict; on the model's device);
    returns the checkpoint's step. For inference (``moetron generate``): the training state, twice the size of the
    weights with AdamW's moments, is neither hashed nor read."""
    manifest = verify_checkpoint(path, (MODEL_FILE,))
    _load_model_file(path, model)
    return int(manifest.get("step", 0))


def _load_model_file(path: str, model: torch.nn.Module) -> None:
    from safetensors.torch import load_model

    try:
        if _is_expert_parallel(model):
            missing, unexpected = _load_global(model, os.path.join(path, MODEL_FILE))
        else:
            missing, unexpected = load_model(model, os.path.join(path, MODEL_FILE), strict=False,
                                             device=str(next(model.parameters()).device))
    except Exception as e:  # safetensors raises its own types for bad headers and shape mismatches
        raise CheckpointError(f"checkpoint {path!r}: cannot load {MODEL_FILE} into the model: {e}") from e
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path!r} does not fit the model: missing {sorted(missing)}, "
                              f"unexpected {sorted(unexpected)}")


def load_checkpoint(path: str, model: torch.nn.Module | None = None, *, map_location="cpu",
                    verify: bool = True) -> dict:
    """Verify ``path`` (unless ``verify=False``: the caller just did), load its weights into ``model`` (strict)
    and return the training state dict. An expert-parallel model takes this rank's experts from the global
    tensors, so a checkpoint written at any EP size (or by one process) loads."""
    if verify:
        verify_checkpoint(path)
    if model is not None:
        _load_model_file(path, model)
    try:
        return torch.load(os.path.join(path, STATE_FILE), map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path!r}: cannot read {STATE_FILE}: {e}") from e
