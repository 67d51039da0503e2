"""The frozen CLIP backbone: open_clip models by name, weights from a local file, nothing from the network.

``load_clip`` accepts the three kinds of file users actually hold; the kind is read from the file's
first bytes, never from its name:

- ``.safetensors`` files: plain tensors, no code at all;
- open_clip / PyTorch checkpoints (a state dict, or ``{"state_dict": ...}``, ``module.`` prefixes
  allowed), read with ``torch.load(weights_only=True)``, which rebuilds only tensors and containers;
- OpenAI's released ``.pt`` archives (TorchScript). By default their tensors are read WITHOUT running
  the archive: the pickled module tree (``data.pkl``) goes through torch's weights-only unpickler, with
  every TorchScript class replaced by an inert record of its attributes, and the archive's code
  (``code/``, ``__setstate__`` methods) is never compiled or run. Only ``trust_torchscript=True`` (CLI:
  ``--trust-weights``) hands the file to ``torch.jit.load``, which runs code stored in the file: use
  it only for files from a source you trust, and then convert them once to safetensors
  (``stop-fast convert-weights IN OUT``).

What is safe: any file can be passed to ``load_clip`` / ``--weights`` without ``trust_torchscript``:
the worst a malicious file can do is fail to load (or use memory in proportion to its size).
Tensors must be floating point and finite; weights must match the architecture key for key.

Getting real CLIP weights as a file, once (the one step that uses the network)::

    import stop_fast
    from safetensors.torch import save_file

    clip = stop_fast.load_clip("ViT-B-32", pretrained_tag="openai", allow_download=True)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, "ViT-B-32-openai.safetensors")

then ``--weights ViT-B-32-openai.safetensors`` (OpenAI's weights use QuickGELU, the default
``--gelu quick``; LAION / open_clip-trained checkpoints mostly need ``--gelu erf``). An OpenAI ``.pt``
file already on disk can be converted with ``stop-fast convert-weights ViT-B-32.pt ViT-B-32.safetensors``.

The returned model carries ``clip.stop_fast_source``, a dict saying where its weights came from
(``model_name``, ``gelu``, ``weights``, ``sha256``, ``random_seed``): prompt files record it, so that
prompts trained on one backbone are not silently used with another.
"""
from __future__ import annotations

import ast
import contextlib
import hashlib
import logging
import os
import pickletools
import re
import warnings
import zipfile
from pathlib import Path
from typing import Dict, Optional, Set, Union

import open_clip
import torch
from torch import nn

_CONFIG_DIR = Path(__file__).with_name("model_configs")
# `stop-tiny`: 3 layers, width 128, 4 heads of 32, 112 px in 16 px patches (a 7 x 7 grid like ViT-B/32
# at 224 px), small enough to train on a laptop CPU. Registered with open_clip so every open_clip API
# knows it by name.
open_clip.add_model_config(_CONFIG_DIR)

# Keys OpenAI's TorchScript archives carry beside the weights.
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")

PathLike = Union[str, os.PathLike]
# safetensors metadata "format" of files written by `stop-fast convert-weights`
WEIGHTS_FORMAT = "stop_fast.weights"


class WeightsError(ValueError):
    """A weights file is missing, unreadable, or does not fit the requested architecture."""


def load_clip(
    model_name: str = "ViT-B-32",
    weights: Optional[PathLike] = None,
    *,
    device: Union[str, torch.device] = "cpu",
    quick_gelu: bool = True,
    seed: int = 0,
    trust_torchscript: bool = False,
    allow_download: bool = False,
    pretrained_tag: Optional[str] = None,
) -> nn.Module:
    """Build the open_clip model ``model_name``, load ``weights``, freeze it and return it (in eval mode).

    Args:
        model_name: any open_clip model name (``ViT-B-32``, ``ViT-B-16``, ``ViT-L-14``, ...) or ``stop-tiny``.
        weights: a local weights file (OpenAI ``.pt``, open_clip checkpoint, ``.safetensors``).
            ``None`` gives random weights, with a warning saying so.
        quick_gelu: OpenAI's CLIP weights were trained with QuickGELU (the default); False builds the
            MLPs with the exact (erf) GELU that most LAION checkpoints use. It overrides what the
            model's config says (``ViT-B-32-quickgelu`` with ``quick_gelu=False`` gets erf GELU).
        seed: with random weights, the seed they are drawn from: every random backbone is seeded, so
            two builds with the same seed are the same network, and prompt files record the seed
            (a checked field, like a weights file's sha256). The global RNG is left untouched.
        trust_torchscript: read a TorchScript archive with ``torch.jit.load``, which RUNS CODE stored
            in the file. Without it, the archive's tensors are read without running anything.
        allow_download: the only way this function touches the network: with ``pretrained_tag`` (e.g.
            ``"openai"``) and ``weights=None``, open_clip downloads the weights.
    """
    if model_name not in open_clip.list_models():
        raise ValueError(
            f"model_name {model_name!r} is not an open_clip model; choose one of e.g. "
            "'ViT-B-32', 'ViT-B-16', 'ViT-L-14', 'stop-tiny' (open_clip.list_models() lists all)"
        )
    if not isinstance(quick_gelu, bool):
        raise ValueError(f"quick_gelu must be True or False, got {quick_gelu!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random_weights = weights is None and pretrained_tag is None
    # `quick_gelu` goes in as a model-config override (highest priority in open_clip), so it switches
    # QuickGELU off as well as on; open_clip's `force_quick_gelu` can only switch it on.
    if pretrained_tag is not None:
        if not allow_download:
            raise ValueError(
                f"pretrained_tag={pretrained_tag!r} downloads weights from the network; pass "
                "allow_download=True to allow it, or weights=<local file> instead"
            )
        if weights is not None:
            raise ValueError("pass either weights (a local file) or pretrained_tag, not both")
        model = open_clip.create_model(model_name, pretrained=pretrained_tag, quick_gelu=quick_gelu)
    else:
        with _quiet_open_clip(), _seeded(seed if random_weights else None):
            model = open_clip.create_model(model_name, pretrained=None, quick_gelu=quick_gelu)
        if weights is None:
            warnings.warn(
                f"load_clip: {model_name} has RANDOM weights (no weights file given, seed {seed}); features are "
                "meaningless until you pass weights=<CLIP checkpoint>",
                stacklevel=2,
            )
        else:
            load_weights(model, weights, model_name, trust_torchscript=trust_torchscript)
    model.stop_fast_source = {
        "model_name": model_name,
        "gelu": gelu_flavour(model),
        "weights": str(weights) if weights is not None else (f"pretrained:{pretrained_tag}" if pretrained_tag else None),
        "sha256": weights_fingerprint(weights) if weights is not None else None,
        "random_seed": seed if random_weights else None,
    }
    model = model.to(device)
    return freeze(model)


def freeze(model: nn.Module) -> nn.Module:
    """Make every parameter non-trainable and keep the module in eval mode for good."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def gelu_flavour(model: nn.Module) -> str:
    """``"quick"`` if the model's MLPs use QuickGELU (OpenAI's CLIP), else ``"erf"`` (``nn.GELU``)."""
    quick = any(isinstance(m, open_clip.transformer.QuickGELU) for m in model.modules())
    return "quick" if quick else "erf"


def file_sha256(path: PathLike) -> str:
    """Hex sha256 of a file's bytes: the fingerprint prompt files record for their backbone."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_fingerprint(path: PathLike) -> str:
    """The sha256 that identifies a weights file's weights: the file's own, or for a file written by
    ``stop-fast convert-weights`` the sha256 of the file it was converted from (the same weights)."""
    if weights_format(path) == "safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
        except Exception:  # noqa: BLE001 - unreadable files were refused while loading; hash the bytes
            metadata = {}
        source = metadata.get("source_sha256", "")
        if metadata.get("format") == WEIGHTS_FORMAT and re.fullmatch(r"[0-9a-f]{64}", source):
            return source
    return file_sha256(path)


# ---------------------------------------------------------------------------------------------- reading
def weights_format(path: PathLike) -> str:
    """The kind of weights file, from its content: ``safetensors``, ``torchscript``, ``torch-zip`` or ``pickle``."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip format, and TorchScript archives
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise WeightsError(f"cannot read weights file {path}: a damaged zip archive ({exc})") from None
        torchscript = any(n.endswith("/constants.pkl") or n == "constants.pkl" or "/code/" in n for n in names)
        return "torchscript" if torchscript else "torch-zip"
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"  # an 8-byte little-endian header length, then the JSON header
    if head[:1] == b"\x80":  # a pickle protocol opcode: torch.save's legacy (non-zip) format
        return "pickle"
    raise WeightsError(
        f"cannot read weights file {path}: it is neither safetensors, a PyTorch checkpoint nor a "
        "TorchScript archive"
    )


def read_state_dict(path: PathLike, *, trust_torchscript: bool = False) -> Dict[str, torch.Tensor]:
    """Read a weights file of any supported kind into a flat state dict (no model needed)."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(
            f"weights file not found: {path}. Pass a local CLIP weights file (OpenAI .pt, open_clip "
            "checkpoint or .safetensors), or weights=None for random weights"
        )
    if not path.is_file():
        raise WeightsError(f"weights must be a file, got the directory {path}")
    try:
        kind = weights_format(path)
        if kind == "safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        elif kind == "torchscript" and trust_torchscript:
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        elif kind == "torchscript":
            state = _read_torchscript_tensors(path)
        else:  # an open file, not its name: torch.load would pick a reader by the name's suffix
            with open(path, "rb") as f:
                state = torch.load(f, map_location="cpu", weights_only=True)
    except WeightsError:
        raise
    except Exception as exc:  # corrupt file, foreign pickle, ...
        raise WeightsError(f"cannot read weights file {path}: {type(exc).__name__}: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    for key in _OPENAI_EXTRA_KEYS:
        state.pop(key, None)
    return state


def check_weights(state: Dict[str, torch.Tensor], path: PathLike) -> None:
    """Refuse integer / boolean tensors, NaN, and infinite values, naming the file and the first bad
    key. Attention masks (``*attn_mask``, which TorchScript archives carry) may hold infinities: there
    -inf is how a mask says "not attended"."""
    for key, value in state.items():
        if not value.is_floating_point():
            raise WeightsError(f"weights file {path}: {key} holds {value.dtype} values; CLIP weights are floating point")
        if torch.isnan(value).any():
            raise WeightsError(f"weights file {path}: {key} contains NaN")
        if not key.endswith("attn_mask") and torch.isinf(value).any():
            raise WeightsError(f"weights file {path}: {key} contains infinite values")


def load_weights(model: nn.Module, path: PathLike, model_name: str = "", *, trust_torchscript: bool = False) -> None:
    """Load a weights file into an open_clip model, strictly: every key must match."""
    state = read_state_dict(path, trust_torchscript=trust_torchscript)
    own = model.state_dict()
    # TorchScript archives also carry non-persistent buffers (the text tower's causal mask).
    transient = {name for name, _ in model.named_buffers()} - set(own)
    state = {k: v for k, v in state.items() if k not in transient}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if mismatched:
            k = mismatched[0]
            detail.append(f"{len(mismatched)} of another shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise WeightsError(
            f"weights file {path} does not fit model_name {model_name!r}: " + "; ".join(detail)
            + ". Check that model_name names the architecture the file was trained with"
        )
    check_weights(state, path)
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


# ------------------------------------------------------------------ TorchScript archives, without running them
class _ScriptObject:
    """Stands in for a TorchScript class while unpickling: it only keeps the state it is given."""

    state = None

    def __init__(self, *args, **kwargs):  # REDUCE on the class: keep nothing, run nothing
        pass

    def __setstate__(self, state):  # pickle BUILD: TorchScript would run the class's __setstate__ here
        self.state = state


def _torchscript_globals(pickled: bytes) -> Set[str]:
    """Every ``__torch__.*`` class the pickle names (pickletools parses, nothing is imported or run)."""
    names = set()
    for opcode, arg, _ in pickletools.genops(pickled):
        if opcode.name in ("GLOBAL", "INST") and isinstance(arg, str):
            module, _, name = arg.partition(" ")
            if module == "__torch__" or module.startswith("__torch__."):
                names.add(f"{module}.{name}")
    return names


_CLASS_LINE = re.compile(r"^class ([\w.]+)\(")
_STATE_LINE = re.compile(r"^\s+(__parameters__|__buffers__) = (\[.*\])\s*$")


def _state_attributes(reader, records) -> Dict[str, Set[str]]:
    """Class -> names of its parameters and buffers, read (as text) from the archive's ``code/``.

    These are what ``ScriptModule.state_dict()`` returns; other tensor attributes are left out, as
    there. Nothing is compiled: the lists are Python literals parsed by ``ast.literal_eval``.
    """
    out: Dict[str, Set[str]] = {}
    for record in records:
        if not (record.startswith("code/") and record.endswith(".py")):
            continue
        module = record[len("code/"):-len(".py")].replace("/", ".")
        current = None
        for line in reader.get_record(record).decode("utf-8", "replace").splitlines():
            match = _CLASS_LINE.match(line)
            if match:
                current = out.setdefault(f"{module}.{match.group(1)}", set())
                continue
            match = _STATE_LINE.match(line)
            if match and current is not None:
                names = ast.literal_eval(match.group(2))
                current.update(n for n in names if isinstance(n, str))
    return out


def _read_torchscript_tensors(path: Path) -> Dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript archive, as ``torch.jit.load(path).state_dict()``
    would give them, read without running anything stored in the archive.

    torch's own weights-only machinery does the reading (``torch.serialization._load`` with the
    weights-only unpickler rebuilds tensors from the archive's storages); the one addition is that the
    archive's classes are allowed as inert ``_ScriptObject`` records of their attributes.
    """
    import torch._weights_only_unpickler as weights_only_unpickler
    from torch.jit import _pickle as jit_pickle
    from torch.serialization import _load, _open_zipfile_reader

    # Pure data helpers that TorchScript pickles name (they return their argument).
    jit_helpers = [getattr(jit_pickle, n) for n in (
        "build_intlist", "build_tensorlist", "build_doublelist", "build_boollist",
        "build_tensor_from_id", "restore_type_tag") if hasattr(jit_pickle, n)]
    with _open_zipfile_reader(str(path)) as reader:
        records = reader.get_all_records()
        if "data.pkl" not in records:
            raise WeightsError(
                f"cannot read weights file {path} without running its code: a TorchScript archive of an old "
                "format (no data.pkl); if you trust the file, use --trust-weights (trust_torchscript=True)"
            )
        classes = []
        for qualified in sorted(_torchscript_globals(reader.get_record("data.pkl"))):
            module, _, name = qualified.rpartition(".")
            classes.append(type(name, (_ScriptObject,), {"__module__": module, "__qualname__": name}))
        attributes = _state_attributes(reader, records)
        with torch.serialization.safe_globals(classes + jit_helpers):
            root = _load(reader, "cpu", weights_only_unpickler, pickle_file="data.pkl", encoding="utf-8")
    if not isinstance(root, _ScriptObject):
        raise WeightsError(f"cannot read weights file {path}: the archive does not hold a TorchScript module")
    state: Dict[str, torch.Tensor] = {}
    _collect_tensors(root, "", attributes, state, set(), path)
    return state


def _collect_tensors(obj, prefix, attributes, out, seen, path) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    cls = type(obj)
    qualified = f"{cls.__module__}.{cls.__qualname__}"
    if not isinstance(obj.state, dict):
        raise WeightsError(
            f"cannot read weights file {path} without running its code: {qualified} restores itself with "
            "its own __setstate__. If you trust the file, load it with --trust-weights "
            "(trust_torchscript=True) or convert it once with `stop-fast convert-weights --trust-weights`"
        )
    keep = attributes.get(qualified)  # None: the archive's code does not say; keep every tensor
    for name, value in obj.state.items():
        if isinstance(value, _ScriptObject):
            _collect_tensors(value, f"{prefix}{name}.", attributes, out, seen, path)
        elif isinstance(value, torch.Tensor) and isinstance(name, str) and (keep is None or name in keep):
            out[prefix + name] = value


# ---------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _seeded(seed: Optional[int]):
    """Draw random weights from ``seed`` without touching the global RNG (no-op for None)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _quiet_open_clip():
    """Hide open_clip's own "no pretrained weights" log line: load_clip says it once, as a warning."""

    def drop(record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)
