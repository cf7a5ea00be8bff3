"""Checkpoint loading that never runs pickled code, for timm's, IBM's and users' own checkpoints.

* ``.safetensors`` (timm's hub format) through safetensors;
* ``.pth`` / ``.pt`` / ``.bin`` through ``torch.load(weights_only=True)``: a pickle that carries code
  is refused;
* containers ``{"model": ...}``, ``{"state_dict": ...}``, ``{"state_dict_ema": ...}``, DDP's
  ``module.`` prefix, IBM's four renamed keys;
* the class count from the head shapes unless given; the variant from the safetensors metadata or,
  failing that, from the tensor shapes;
* ``hf-hub:timm/<name>.in1k`` when huggingface_hub is installed and the network answers.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from . import safe_io
from .crossvit import CROSSVIT_CONFIGS, CrossViT, filter_ibm_keys, resolve_name
from .errors import UserError, brief

log = logging.getLogger(__name__)

_CONTAINER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
# Bounds (docs/security.md): the file, and what a zip-format .pth inflates to in all (torch.save
# stores its records uncompressed, but a re-zipped file may deflate them): a checkpoint cannot cost
# more memory than the largest file allowed. crossvit_18_dagger_408 in fp32 is 180 MB.
MAX_CHECKPOINT_BYTES = 2 << 30
MAX_CHECKPOINT_RECORDS = 100_000


@dataclass
class LoadedCheckpoint:
    model: CrossViT
    name: str  # timm variant name
    source: str
    num_classes: int
    labels: Optional[List[str]] = None
    metadata: Dict[str, str] = field(default_factory=dict)


def save_checkpoint(state_dict: Mapping[str, torch.Tensor], path, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write a safetensors checkpoint atomically (temporary file, then rename)."""
    from safetensors.torch import save

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = save({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, metadata=metadata or {})
    safe_io.write_bytes(path, data)  # a new file renamed into place


def _read_safetensors(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        tensors = {}
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
        return tensors, metadata
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot read {path}: not a valid safetensors file ({_first_line(e)})") from None


def _check_zip_records(f, path: Path) -> None:
    """A zip-format .pth: the record count and their inflated total, from the zip directory, before
    torch reads a record (torch checks each record's size against the tensor it makes)."""
    import zipfile

    is_zip = zipfile.is_zipfile(f)
    f.seek(0)  # is_zipfile leaves a file object at its end
    if not is_zip:
        return  # the legacy format: torch checks each storage's size against the file as it reads
    try:
        infos = zipfile.ZipFile(f).infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: corrupt or truncated checkpoint ({_first_line(e)})") from None
    finally:
        f.seek(0)
    inflated = sum(i.file_size for i in infos)
    if len(infos) > MAX_CHECKPOINT_RECORDS or inflated > MAX_CHECKPOINT_BYTES:
        raise UserError(f"cannot read {path}: {len(infos)} records inflating to {inflated} bytes, more than "
                        f"{MAX_CHECKPOINT_RECORDS} or {MAX_CHECKPOINT_BYTES} bytes")


def _read_pickle(path: Path) -> Dict[str, torch.Tensor]:
    try:
        with warnings.catch_warnings(), safe_io.open_regular(path, f"checkpoint {brief(str(path), 200)}", max_bytes=MAX_CHECKPOINT_BYTES) as f:
            warnings.simplefilter("ignore")  # torch warns about pickle protocols; the error says enough
            _check_zip_records(f, path)
            # the file checked is the file read: torch.load gets the open file, not the name
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = _first_line(e)
        if "Weights only load failed" in msg or "Unsupported global" in str(e) or "GLOBAL" in str(e):
            raise UserError(
                f"refusing to load {path}: it carries pickled code or objects, not only tensors "
                "(re-save it as a plain state dict or .safetensors)"
            ) from None
        raise UserError(f"cannot read {path}: corrupt or truncated checkpoint ({msg})") from None
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001: a hostile or non-pickle file makes the unpickler raise anything (IndexError, TypeError, ...)
        raise UserError(f"cannot read {path}: corrupt or truncated checkpoint ({type(e).__name__}: {_first_line(e)})") from None
    return _unwrap(obj, path)


def _unwrap(obj, path) -> Dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _CONTAINER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise UserError(f"{path}: no state dict found (expected tensors, or a 'model'/'state_dict'/'state_dict_ema' entry)")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(f"{path}: no tensors in the checkpoint")
    return tensors


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:200] if s else type(e).__name__


def _normalise_keys(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return filter_ibm_keys(sd)


def _expected_shapes(name: str, num_classes: int) -> Dict[str, Tuple[int, ...]]:
    with torch.device("meta"):
        model = CrossViT(replace(CROSSVIT_CONFIGS[name], num_classes=num_classes))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def infer_variant(sd: Mapping[str, torch.Tensor]) -> str:
    """The variant whose parameter shapes match ``sd`` exactly (class count aside)."""
    num_classes = _num_classes(sd)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    for name in CROSSVIT_CONFIGS:
        if _expected_shapes(name, num_classes) == shapes:
            return name
    raise UserError("cannot tell which CrossViT variant this checkpoint is; pass --model NAME")


def _num_classes(sd: Mapping[str, torch.Tensor]) -> int:
    if "head.0.weight" not in sd:
        raise UserError("checkpoint has no 'head.0.weight': not a CrossViT classifier state dict")
    shape = tuple(sd["head.0.weight"].shape)
    if len(shape) != 2 or shape[0] < 1:
        raise UserError(f"checkpoint's 'head.0.weight' has shape {shape}: a classifier head is (classes, features), "
                        "at least one class")
    return int(shape[0])


def _hub_unreachable(endpoint: str, timeout: float = 5.0) -> Optional[str]:
    """Why the hub's host does not answer a TCP connect, or None when it does. huggingface_hub
    itself retries a failed name lookup five times with back-off (about 25 s) before it gives up."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(endpoint)
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")):
        return None  # behind a proxy a direct connect proves nothing: let huggingface_hub try
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout).close()
        return None
    except OSError as e:
        return f"{url.hostname} does not answer ({e.strerror or e})"


def _download_hub(spec: str) -> Path:
    """``hf-hub:timm/crossvit_9_240.in1k`` -> local path of its model.safetensors (the local cache
    when the hub does not answer)."""
    repo = spec[len("hf-hub:") :]
    try:
        from huggingface_hub import constants, hf_hub_download
    except ImportError:
        raise UserError(f"{spec}: huggingface_hub is not installed (pip install huggingface_hub)") from None
    offline = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _hub_unreachable(constants.ENDPOINT)
    try:
        return Path(hf_hub_download(repo, "model.safetensors", local_files_only=offline is not None))
    except Exception as e:  # unknown repo, auth, not cached: all are one-line user errors here
        if offline:
            raise UserError(f"cannot download {spec}: offline ({offline}) and not in the local Hugging Face cache") from None
        raise UserError(f"cannot download {spec} (offline or unknown repository): {_first_line(e)}") from None


def read_state_dict(source) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(state dict with timm keys, metadata) from a path or an ``hf-hub:`` name."""
    source = str(source)
    path = _download_hub(source) if source.startswith("hf-hub:") else Path(source)
    if not os.path.lexists(path):
        raise UserError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise UserError(f"checkpoint is a folder, expected a file: {path}")
    # a regular file of bounded size: a FIFO or device node is refused without blocking
    safe_io.check_regular(path, f"checkpoint {brief(str(path), 200)}", max_bytes=MAX_CHECKPOINT_BYTES)
    if path.suffix == ".safetensors":
        sd, meta = _read_safetensors(path)
    else:
        sd, meta = _read_pickle(path), {}
    return _normalise_keys(sd), meta


def load_checkpoint(source, model_name: Optional[str] = None, num_classes: Optional[int] = None) -> LoadedCheckpoint:
    """Build the variant and load ``source`` into it strictly; any mismatch is a UserError."""
    sd, meta = read_state_dict(source)
    ckpt_classes = _num_classes(sd)
    if num_classes is not None and num_classes != ckpt_classes:
        raise UserError(f"checkpoint head has {ckpt_classes} classes, but {num_classes} were asked for")
    if model_name is None:
        model_name = meta.get("model") or (str(source).split("/")[-1] if str(source).startswith("hf-hub:") else None)
    name = resolve_name(model_name) if model_name else infer_variant(sd)
    model = CrossViT(replace(CROSSVIT_CONFIGS[name], num_classes=ckpt_classes))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_preview(unexpected)}")
        raise UserError(f"checkpoint does not fit {name}: " + "; ".join(parts))
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if sd[k].shape != v.shape]
    if wrong:
        raise UserError(f"checkpoint does not fit {name}: shape mismatch in {_preview(wrong)}")
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    labels = None
    if "labels" in meta:
        try:
            labels = [str(x) for x in json.loads(meta["labels"])]
        except ValueError:
            log.warning("ignoring unreadable 'labels' metadata in %s", source)
    return LoadedCheckpoint(model.eval(), name, str(source), ckpt_classes, labels, dict(meta))


def _preview(items: List[str], n: int = 8) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more
