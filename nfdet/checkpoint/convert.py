"""Import released NFNet weights (DeepMind Haiku files, timm ``dm_nfnet_f*`` state dicts) into the
nfdet checkpoint format.

The nfdet checkpoint format is a ``torch.save``d dict ``{"model": {name: tensor}, "meta": {...}}``:
``model`` is the state dict of ``build_nfnet(variant, num_classes)`` (keys ``trunk.*`` and
``head.*``, plain tensors only) and ``meta`` holds plain Python values (``variant``,
``num_classes``, ``source``, ``source_file``), so ``torch.load(..., weights_only=True)`` reads it.

Name mapping (nfdet <- DeepMind <- timm), per block ``trunk.stages.S.B``:

==============  ============================  ==========================
nfdet           DeepMind (``nf_block_<i>``)   timm (``stages.S.B``)
==============  ============================  ==========================
conv1           conv0                         conv1
conv2           conv1                         conv2
conv2b          conv1b                        conv2b
conv3           conv2                         conv3
shortcut        conv_shortcut                 downsample.conv
se.fc1 / fc2    squeeze_excite/~/linear(_1)   attn_last.fc1 / fc2 (1x1)
skip_gain       skip_gain                     skipinit_gain
==============  ============================  ==========================

DeepMind numbers blocks globally (``i`` over all stages); stage boundaries are the blocks that
own a ``conv_shortcut``. Its conv weights are HWIO, linear weights in x out, gains vectors.
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from typing import IO, Any

import numpy as np
import torch

from ..modeling import NFNET_VARIANTS, NFNetSpec, build_nfnet, canonical_name

__all__ = [
    "CheckpointFormatError",
    "detect_format",
    "load_source",
    "convert_timm_state_dict",
    "convert_deepmind_params",
    "convert_weights",
    "save_checkpoint",
    "load_torch_checkpoint",
    "atomic_write",
    "write_text_atomic",
    "infer_variant",
]

# DeepMind module name -> nfdet module name inside a block.
_DM_BLOCK_CONVS = {
    "conv0": "conv1",
    "conv1": "conv2",
    "conv1b": "conv2b",
    "conv2": "conv3",
    "conv_shortcut": "shortcut",
}
_DM_SE = {"linear": "fc1", "linear_1": "fc2"}
_DM_PARAMS = {"w": "weight", "b": "bias", "gain": "gain"}
_TIMM_BLOCK_RENAMES = (
    ("downsample.conv.", "shortcut."),
    ("attn_last.fc1.", "se.fc1."),
    ("attn_last.fc2.", "se.fc2."),
)


class CheckpointFormatError(ValueError):
    """A source file or state dict that cannot be converted (the message says why)."""


# ----------------------------------------------------------------------------------------------
# Reading source files
# ----------------------------------------------------------------------------------------------


def _import_dill():
    try:
        return importlib.import_module("dill")
    except ImportError as e:
        raise ImportError(
            "Reading DeepMind's released NFNet files (dill pickles) needs the 'dill' package: "
            "`pip install dill` or `pip install nfdet[deepmind]`."
        ) from e


def _is_deepmind_tree(obj: Any) -> bool:
    if not isinstance(obj, Mapping) or not obj:
        return False
    return all(
        isinstance(k, str) and "/~/" in k and isinstance(v, Mapping) for k, v in obj.items()
    )


def _is_timm_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(
        isinstance(k, str) and re.match(r"^(module\.)?stages\.\d+\.\d+\.conv1\.weight$", k)
        for k in obj
    )


def _is_nfdet_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(
        isinstance(k, str) and k.startswith("trunk.") for k in obj
    )


def _unwrap(obj: Any) -> Any:
    """Strip the usual training-checkpoint wrappers around a state dict."""
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "params"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and (
                _is_timm_state_dict(inner)
                or _is_deepmind_tree(inner)
                or _is_nfdet_state_dict(inner)
            ):
                return inner
    return obj


def detect_format(obj: Any) -> str:
    """Name the format of a loaded object: "deepmind", "timm" or "nfdet".

    Raises:
        CheckpointFormatError: when it is none of them.
    """
    obj = _unwrap(obj)
    if _is_deepmind_tree(obj):
        return "deepmind"
    if _is_timm_state_dict(obj):
        return "timm"
    if _is_nfdet_state_dict(obj):
        return "nfdet"
    raise CheckpointFormatError("not a DeepMind NFNet param tree, timm state dict or nfdet model")


def load_source(path: str) -> tuple[str, Mapping]:
    """Read a DeepMind file or a timm/nfdet ``torch.save`` file.

    ``torch.save`` files are read with ``weights_only=True``. DeepMind's ``*_haiku.npz`` files
    are dill pickles: like any pickle they can run code when loaded, so only read trusted files.

    Args:
        path (str): the file.

    Returns:
        (format, params): format is "deepmind", "timm" or "nfdet"; params the (unwrapped) dict.

    Raises:
        FileNotFoundError: no such file.
        ImportError: a DeepMind file and ``dill`` is not installed.
        CheckpointFormatError: the file is of no known format (the message names it).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No such weight file: {path}")
    with open(path, "rb") as f:
        head = f.read(2)
    obj: Any = None
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        if not any(n.endswith("data.pkl") for n in names):
            raise CheckpointFormatError(
                f"{path}: a zip archive that is not a torch.save file (entries: {names[:5]}...); "
                "expected a DeepMind NFNet dill pickle or a timm/nfdet torch checkpoint"
            )
        obj = load_torch_checkpoint(path)
    elif head == b"PK":
        raise CheckpointFormatError(
            f"{path}: a damaged zip archive (truncated or corrupted torch.save file?): its "
            "central directory cannot be read"
        )
    elif head[:1] == b"\x80" and _is_legacy_torch_file(path):
        obj = _torch_load(path)
    elif head[:1] == b"\x80":
        # A plain pickle stream: DeepMind's files are dill pickles.
        dill = _import_dill()
        try:
            with open(path, "rb") as f:
                obj = dill.load(f)
        except Exception as e:
            raise CheckpointFormatError(f"{path}: cannot unpickle the file ({e})") from e
    else:
        raise CheckpointFormatError(
            f"{path}: unrecognized file (neither a pickle nor a torch.save archive); expected a "
            "DeepMind NFNet dill pickle (*_haiku.npz) or a timm/nfdet torch checkpoint"
        )
    try:
        fmt = detect_format(obj)
    except CheckpointFormatError as e:
        raise CheckpointFormatError(f"{path}: {e}") from None
    return fmt, _unwrap(obj)


# torch.save's legacy (non-zip) format starts with this pickled magic number.
_LEGACY_TORCH_MAGIC = 0x1950A86A20F9469CFC6C


class _NoGlobalsUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"global {module}.{name} refused")


def _is_legacy_torch_file(path: str) -> bool:
    """Whether the first pickled object is torch's magic number (safe: no globals loaded)."""
    try:
        with open(path, "rb") as f:
            first = _NoGlobalsUnpickler(f).load()
    except Exception:
        return False
    return isinstance(first, int) and first == _LEGACY_TORCH_MAGIC


def _torch_load(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointFormatError(
                f"{path}: the torch checkpoint holds non-tensor objects that weights_only loading "
                "refuses; save just the state dict (torch.save(model.state_dict(), ...))"
            ) from e
        raise CheckpointFormatError(f"{path}: cannot unpickle the torch file ({e})") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointFormatError(
            f"{path}: cannot read the torch file (truncated or corrupted?): {e}"
        ) from e


def load_torch_checkpoint(path: str) -> Any:
    """``torch.load`` a checkpoint on CPU (``weights_only=True``) after checking it is complete.

    A ``torch.save`` file is a zip archive whose entries carry CRC32 checksums: a truncated file
    (no central directory) and damaged bytes (a failing checksum) are reported by name instead of
    surfacing as torch's "Invalid argument" or, worse, loading silently altered tensors.

    Args:
        path (str): the file.

    Raises:
        FileNotFoundError: no such file.
        CheckpointFormatError: empty, truncated, corrupted or unreadable (the message names the
            file and what is wrong).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint {path} does not exist")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointFormatError(f"{path}: empty checkpoint file (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(2)
    if head == b"PK":
        if not zipfile.is_zipfile(path):
            raise CheckpointFormatError(
                f"{path}: truncated or corrupted checkpoint ({size} bytes): the end of its zip "
                "archive (central directory) is missing or damaged"
            )
        try:
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise CheckpointFormatError(f"{path}: corrupted checkpoint ({e})") from e
        if bad is not None:
            raise CheckpointFormatError(
                f"{path}: corrupted checkpoint: entry {bad!r} fails its CRC32 check"
            )
    return _torch_load(path)


# ----------------------------------------------------------------------------------------------
# Variant inference
# ----------------------------------------------------------------------------------------------


def _spec_signature(spec: NFNetSpec) -> tuple:
    return (
        tuple(spec.depths),
        tuple(spec.widths),
        tuple(spec.stem_widths) + (spec.stem_out,),
        tuple(spec.bottleneck_width(w) for w in spec.widths),
        tuple(spec.bottleneck_width(w) // spec.group_size for w in spec.widths),
        spec.num_features,
    )


def infer_variant(signature: tuple) -> str:
    """Find the variant whose architecture has the given signature.

    Args:
        signature (tuple): (depths, widths, stem widths incl. output, bottleneck widths,
            groups per stage, final conv width), as read from a state dict.

    Raises:
        CheckpointFormatError: no variant matches (the message shows what was found).
    """
    for name, spec in NFNET_VARIANTS.items():
        if _spec_signature(spec) == signature:
            return name
    depths, widths, stem, mids, groups, feats = signature
    raise CheckpointFormatError(
        f"No nfdet variant matches the weights (depths={list(depths)}, widths={list(widths)}, "
        f"stem={list(stem)}, bottleneck={list(mids)}, groups={list(groups)}, "
        f"final_conv={feats}); variants: {', '.join(NFNET_VARIANTS)}"
    )


def _signature_from_nfdet(sd: Mapping[str, torch.Tensor]) -> tuple:
    depths, widths, mids, groups = [], [], [], []
    s = 0
    while f"trunk.stages.{s}.0.conv1.weight" in sd:
        b = 0
        while f"trunk.stages.{s}.{b}.conv1.weight" in sd:
            b += 1
        depths.append(b)
        widths.append(sd[f"trunk.stages.{s}.0.conv3.weight"].shape[0])
        w2 = sd[f"trunk.stages.{s}.0.conv2.weight"]
        mids.append(w2.shape[0])
        groups.append(w2.shape[0] // w2.shape[1])
        s += 1
    stem = tuple(sd[f"trunk.stem.conv{i}.weight"].shape[0] for i in range(1, 5))
    feats = sd["trunk.final_conv.weight"].shape[0] if "trunk.final_conv.weight" in sd else 0
    return tuple(depths), tuple(widths), stem, tuple(mids), tuple(groups), feats


# ----------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------


def _as_tensor(value: Any, key: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    try:
        arr = np.asarray(value)
    except Exception as e:
        raise CheckpointFormatError(f"{key}: not an array ({type(value).__name__})") from e
    if arr.dtype.kind not in "fiub":
        raise CheckpointFormatError(f"{key}: not a numeric array (dtype {arr.dtype})")
    if arr.dtype.kind == "f" and arr.dtype != np.float64 and arr.dtype.itemsize < 4:
        # bfloat16 / float16 arrays from JAX: widen before handing to torch.
        arr = arr.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr)).clone()


def _finalize(
    sd: dict[str, torch.Tensor],
    variant: str | None,
    source: str,
    source_keys: Mapping[str, str],
) -> tuple[dict[str, torch.Tensor], str, int]:
    """Check ``sd`` against ``build_nfnet(variant)``: reshape compatible tensors (gains, 1x1-conv
    SE weights), cast to float32, and raise clear errors for missing/unexpected/mismatched keys."""
    if "head.fc.weight" not in sd:
        raise CheckpointFormatError(f"{source}: no classifier weight (head.fc / linear) found")
    num_classes = int(sd["head.fc.weight"].shape[0])
    found = _signature_from_nfdet(sd)
    if variant is None:
        variant = infer_variant(found)
    else:
        variant = canonical_name(variant)
    with torch.device("meta"):
        reference = build_nfnet(variant, num_classes=num_classes).state_dict()
    missing = [k for k in reference if k not in sd]
    unexpected = [source_keys.get(k, k) for k in sd if k not in reference]
    if missing or unexpected:
        raise CheckpointFormatError(
            f"{source}: weights do not fit nfdet variant {variant!r}: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    out = {}
    for key, ref in reference.items():
        value = sd[key]
        if tuple(value.shape) != tuple(ref.shape):
            if value.numel() == ref.numel() and _same_up_to_unit_dims(value.shape, ref.shape):
                value = value.reshape(ref.shape)
            else:
                raise CheckpointFormatError(
                    f"{source}: shape mismatch for {source_keys.get(key, key)} -> {key}: "
                    f"got {tuple(value.shape)}, variant {variant!r} expects {tuple(ref.shape)}"
                )
        if value.is_floating_point() or ref.is_floating_point():
            value = value.to(torch.float32)
        out[key] = value.contiguous()
    return out, variant, num_classes


def _same_up_to_unit_dims(a: torch.Size, b: torch.Size) -> bool:
    return [d for d in a if d != 1] == [d for d in b if d != 1]


def convert_timm_state_dict(
    state_dict: Mapping[str, Any], variant: str | None = None, source: str = "timm state dict"
) -> tuple[dict[str, torch.Tensor], str, int]:
    """Convert a timm ``dm_nfnet_f*`` state dict to nfdet names.

    Args:
        state_dict (Mapping): timm keys (``stem.conv1.weight``, ``stages.0.0.conv1.gain``, ...);
            a ``module.`` prefix is ignored.
        variant (str | None): the nfdet variant; inferred from the shapes when None.
        source (str): how to name the source in error messages.

    Returns:
        (state_dict, variant, num_classes).

    Raises:
        CheckpointFormatError: unknown keys, shape mismatches, no matching variant, or a timm
            NFNet that is not DeepMind-compatible (no ``skipinit_gain``: timm's own ``nfnet_f*``).
    """
    sd: dict[str, torch.Tensor] = {}
    source_keys: dict[str, str] = {}
    has_skip = False
    for key, value in state_dict.items():
        name = key[len("module."):] if key.startswith("module.") else key
        if name.startswith("stem."):
            new = "trunk." + name
        elif name.startswith("stages."):
            new = "trunk." + name
            for old, repl in _TIMM_BLOCK_RENAMES:
                new = new.replace("." + old, "." + repl)
            if new.endswith(".skipinit_gain"):
                new = new[: -len("skipinit_gain")] + "skip_gain"
                has_skip = True
        elif name.startswith("final_conv."):
            new = "trunk." + name
        elif name.startswith("head.fc."):
            new = name
        else:
            new = name  # reported as unexpected by _finalize
        sd[new] = _as_tensor(value, key)
        source_keys[new] = key
    if not has_skip:
        raise CheckpointFormatError(
            f"{source}: no 'skipinit_gain' parameters: only timm's DeepMind-compatible "
            "dm_nfnet_f* models (SAME padding, gamma in the activation, skip gains) convert"
        )
    return _finalize(sd, variant, source, source_keys)


_DM_PATH = re.compile(r"^[^/]+/~/(?P<rest>.+)$")
_DM_BLOCK = re.compile(r"^nf_block_(?P<idx>\d+)(?:/~/(?P<sub>.+))?$")


def convert_deepmind_params(
    params: Mapping[str, Mapping[str, Any]],
    variant: str | None = None,
    source: str = "DeepMind params",
) -> tuple[dict[str, torch.Tensor], str, int]:
    """Convert a DeepMind Haiku NFNet param tree to nfdet names and PyTorch layouts.

    Args:
        params (Mapping): ``{module_path: {param_name: array}}``, e.g.
            ``params["NFNet/~/nf_block_3/~/conv1b"]["w"]`` (HWIO).
        variant (str | None): the nfdet variant; inferred from the shapes when None.
        source (str): how to name the source in error messages.

    Returns:
        (state_dict, variant, num_classes).

    Raises:
        CheckpointFormatError: unknown module paths or params, shape mismatches, no matching
            variant.
    """
    # First pass: block paths by global index, and which blocks start a stage.
    blocks: dict[int, dict[str, Mapping[str, Any]]] = {}
    others: dict[str, Mapping[str, Any]] = {}
    for path, leaves in params.items():
        m = _DM_PATH.match(path)
        if m is None:
            raise CheckpointFormatError(f"{source}: unexpected module path {path!r}")
        rest = m.group("rest")
        bm = _DM_BLOCK.match(rest)
        if bm:
            blocks.setdefault(int(bm.group("idx")), {})[bm.group("sub") or ""] = leaves
        else:
            others[rest] = leaves
    if sorted(blocks) != list(range(len(blocks))):
        raise CheckpointFormatError(
            f"{source}: NFNet blocks are not numbered 0..N-1 (found {sorted(blocks)[:10]}...)"
        )
    location: dict[int, tuple[int, int]] = {}
    stage, index = -1, 0
    for i in range(len(blocks)):
        if "conv_shortcut" in blocks[i]:
            stage, index = stage + 1, 0
        if stage < 0:
            raise CheckpointFormatError(
                f"{source}: nf_block_0 has no conv_shortcut; cannot find the stage boundaries"
            )
        location[i] = (stage, index)
        index += 1

    sd: dict[str, torch.Tensor] = {}
    source_keys: dict[str, str] = {}

    def put(new: str, value: Any, key: str, kind: str) -> None:
        t = _as_tensor(value, key)
        if kind == "conv" and t.ndim == 4:
            t = t.permute(3, 2, 0, 1)  # HWIO -> OIHW
        elif kind == "linear" and t.ndim == 2:
            t = t.t()  # in x out -> out x in
        sd[new] = t.contiguous()
        source_keys[new] = key

    def put_module(prefix: str, path: str, leaves: Mapping[str, Any], kind: str) -> None:
        for pname, value in leaves.items():
            if pname not in _DM_PARAMS or (kind == "linear" and pname == "gain"):
                raise CheckpointFormatError(f"{source}: unexpected param {path}/{pname}")
            put(f"{prefix}.{_DM_PARAMS[pname]}", value, f"{path}/{pname}", kind)

    root = next(iter(params)).split("/~/", 1)[0]
    for rest, leaves in others.items():
        path = f"{root}/~/{rest}"
        sm = re.match(r"^stem_conv(\d)$", rest)
        if sm and int(sm.group(1)) < 4:
            put_module(f"trunk.stem.conv{int(sm.group(1)) + 1}", path, leaves, "conv")
        elif rest == "final_conv":
            put_module("trunk.final_conv", path, leaves, "conv")
        elif rest == "linear":
            put_module("head.fc", path, leaves, "linear")
        else:
            raise CheckpointFormatError(f"{source}: unexpected module path {path!r}")
    for i, subs in blocks.items():
        s, b = location[i]
        prefix = f"trunk.stages.{s}.{b}"
        for sub, leaves in subs.items():
            path = f"{root}/~/nf_block_{i}" + (f"/~/{sub}" if sub else "")
            if sub == "":
                for pname, value in leaves.items():
                    if pname != "skip_gain":
                        raise CheckpointFormatError(f"{source}: unexpected param {path}/{pname}")
                    put(f"{prefix}.skip_gain", value, f"{path}/{pname}", "scalar")
            elif sub in _DM_BLOCK_CONVS:
                put_module(f"{prefix}.{_DM_BLOCK_CONVS[sub]}", path, leaves, "conv")
            elif sub.startswith("squeeze_excite/~/") and sub.split("/~/", 1)[1] in _DM_SE:
                fc = _DM_SE[sub.split("/~/", 1)[1]]
                put_module(f"{prefix}.se.{fc}", path, leaves, "linear")
            else:
                raise CheckpointFormatError(f"{source}: unexpected module path {path!r}")
    return _finalize(sd, variant, source, source_keys)


def _fsync_dir(directory: str) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` atomically: ``write(f)`` fills a temporary file in the same folder, which is
    flushed, fsynced and renamed onto ``path``.

    Readers (and a process killed at any moment, even with SIGKILL) see either the old complete
    file or the new complete file, never a partial one. A failure leaves ``path`` untouched and
    removes the temporary file; a temporary file left by a killed writer of the same ``path`` is
    removed by the next successful write.

    Args:
        path (str): the destination.
        write (callable): writes the content into the binary file object it is given.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    prefix = ".tmp-" + os.path.basename(path) + "-"
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(directory)
    for name in os.listdir(directory):
        if name.startswith(prefix):  # left by a writer killed mid-write
            try:
                os.remove(os.path.join(directory, name))
            except OSError:
                pass


def save_checkpoint(checkpoint: Mapping[str, Any], path: str) -> None:
    """``torch.save`` atomically (see ``atomic_write``): a temporary file beside ``path``,
    fsynced, then renamed. A failure or a kill leaves any existing ``path`` untouched."""
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def write_text_atomic(path: str, text: str) -> None:
    """Replace a small text file (e.g. a ``last_checkpoint`` pointer) atomically."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def convert_weights(src: str, out: str | None = None, variant: str | None = None) -> dict:
    """Convert a DeepMind or timm NFNet weight file into an nfdet checkpoint.

    The source format is detected from the file; the variant is inferred from the shapes unless
    given (then the shapes must fit it).

    Args:
        src (str): DeepMind ``F*_haiku.npz`` (dill pickle), or a ``torch.save``d timm
            ``dm_nfnet_f*`` state dict (a ``{"state_dict": ...}`` wrapper is accepted).
        out (str | None): where to write the checkpoint (atomically); nothing written if None.
        variant (str | None): nfdet variant name ("F0", "dm_nfnet_f0", ...).

    Returns:
        dict: the checkpoint ``{"model": state_dict, "meta": {...}}``.
    """
    fmt, params = load_source(src)
    name = f"{src} ({fmt} format)"
    if fmt == "deepmind":
        sd, variant, num_classes = convert_deepmind_params(params, variant, source=name)
    elif fmt == "timm":
        sd, variant, num_classes = convert_timm_state_dict(params, variant, source=name)
    else:
        tensors = {k: _as_tensor(v, k) for k, v in params.items()}
        sd, variant, num_classes = _finalize(tensors, variant, name, {})
    checkpoint = {
        "model": sd,
        "meta": {
            "variant": variant,
            "num_classes": num_classes,
            "source": fmt,
            "source_file": os.path.basename(os.fspath(src)),
        },
    }
    if out is not None:
        save_checkpoint(checkpoint, out)
    return checkpoint
