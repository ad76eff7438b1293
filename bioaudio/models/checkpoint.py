"""Model files in and out: our export format, the official BEATs / EAT checkpoints, safe reading.

`load_model(path)` reads, by content (not by file name):
- our export: a folder with `config.json` (format marker "bioaudio.export") + `model.safetensors`;
- an official BEATs `.pt` (`{'cfg', 'model'}`, pretrained or finetuned);
- an EAT Hugging Face checkpoint: a folder with `config.json` + `model.safetensors`, or the
  `.safetensors` file with its config beside it (`config.json`, `<stem>_config.json`,
  `<stem>.json`) or given as `config=`;
- an EAT fairseq `.pt` (pretrained or finetuned).

Safety: nothing from a user file is ever executed. PyTorch files are read with
`torch.load(weights_only=True)`; when that refuses (real fairseq files pickle an omegaconf
DictConfig), `RestrictedUnpickler` reads the archive itself: it allows torch's tensor rebuild
functions and storages, plain containers, and maps omegaconf / fairseq / EAT config classes and
enums to inert stand-ins that are never imported; any other class is refused with a
CheckpointError naming it.

`save_export(model, out_dir)` writes an export atomically: into a temporary folder first, moved
into place only when complete; an existing export is replaced only after the new one is whole.
"""

from __future__ import annotations

import _compat_pickle
import collections
import datetime
import hashlib
import importlib
import io
import json
import math
import os
import pathlib
import pickle
import shutil
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from bioaudio import runinfo
from bioaudio.errors import CheckpointError, ConfigError
from bioaudio.fileio import replace_dir, temp_dir_beside
from bioaudio.models import registry

EXPORT_FORMAT = "bioaudio.export"
EXPORT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


# ----------------------------------------------------------------------------------------------
# Reading PyTorch pickles safely
# ----------------------------------------------------------------------------------------------
class StandIn:
    """Inert record of an object whose class we never import (omegaconf, fairseq, EAT configs).

    Keeps the constructor arguments (`_args`, e.g. an enum's value) and the pickled state
    (`_state`, e.g. a DictConfig's `_content`). `to_plain` turns a tree of them into dicts.
    """

    _qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> StandIn:
        obj = object.__new__(cls)
        obj.__dict__["_args"] = args
        obj.__dict__["_state"] = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state

    def __repr__(self) -> str:
        return f"<stand-in {self._qualname}{self._args if self._args else ''}>"


_STANDIN_TYPES: dict[str, type] = {}
# Packages whose classes may appear inside a fairseq cfg (as config types and enum values).
_STANDIN_PACKAGES = frozenset(
    {"omegaconf", "fairseq", "fairseq_cli", "hydra", "examples", "EAT", "eat", "models", "tasks"}
)


def _standin_type(module: str, name: str) -> type:
    qual = f"{module}.{name}"
    if qual not in _STANDIN_TYPES:
        _STANDIN_TYPES[qual] = type(name, (StandIn,), {"_qualname": qual})
    return _STANDIN_TYPES[qual]


class _AnyType:
    """Stand-in for `typing.Any` (omegaconf metadata refers to it)."""


def _safe_reconstructor(cls: type, base: type, state: Any) -> Any:
    """copyreg._reconstructor restricted to stand-ins and plain containers."""
    if isinstance(cls, type) and issubclass(cls, StandIn):
        return cls.__new__(cls)
    if cls in (collections.OrderedDict, dict, list, set) and base in (object, dict, list, set):
        return cls()
    raise CheckpointError(f"refusing to reconstruct {getattr(cls, '__name__', cls)}")


def _safe_globals() -> dict[tuple[str, str], Any]:
    import torch._utils as tu

    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("collections", "defaultdict"): collections.defaultdict,
        ("copyreg", "_reconstructor"): _safe_reconstructor,
        ("_codecs", "encode"): __import__("_codecs").encode,  # protocol-2 pickles of bytes
        ("argparse", "Namespace"): _standin_type("argparse", "Namespace"),  # old fairseq `args`
        ("typing", "Any"): _AnyType,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("pathlib", "PosixPath"): pathlib.PurePosixPath,
        ("pathlib", "WindowsPath"): pathlib.PureWindowsPath,
        ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
        ("pathlib", "PureWindowsPath"): pathlib.PureWindowsPath,
    }
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter"):
        allowed[("torch._utils", name)] = getattr(tu, name)
    for name in (
        "dict list tuple set frozenset int float complex str bytes bytearray bool slice object"
    ).split():
        allowed[("builtins", name)] = getattr(__import__("builtins"), name)
    for name in dir(torch):
        obj = getattr(torch, name, None)
        if isinstance(obj, torch.dtype) or (name.endswith("Storage") and isinstance(obj, type)):
            allowed[("torch", name)] = obj
    try:
        import numpy as np

        for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
            allowed[(mod, "scalar")] = np._core.multiarray.scalar  # type: ignore[attr-defined]
            allowed[(mod, "_reconstruct")] = np._core.multiarray._reconstruct  # type: ignore
        allowed[("numpy", "dtype")] = np.dtype
        allowed[("numpy", "ndarray")] = np.ndarray
        for kind in ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType"):
            if hasattr(np.dtypes, kind):
                allowed[("numpy.dtypes", kind)] = getattr(np.dtypes, kind)
    except (ImportError, AttributeError):  # pragma: no cover - numpy layout differences
        pass
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for the `data.pkl` of a PyTorch zip archive that executes nothing foreign."""

    def __init__(
        self, file: Any, archive: zipfile.ZipFile | None, prefix: str, source: str
    ) -> None:
        super().__init__(file, encoding="utf-8")
        self._archive = archive
        self._prefix = prefix
        self._source = source
        self._allowed = _safe_globals()
        self._storages: dict[str, Any] = {}

    def find_class(self, module: str, name: str) -> Any:
        # Protocol-2 pickles name Python 2 modules (`__builtin__`); map them like pickle does.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        if module.split(".")[0] in _STANDIN_PACKAGES:
            return _standin_type(module, name)
        raise CheckpointError(
            f"{self._source}: refusing to unpickle {module}.{name} (only tensors, plain "
            "containers and fairseq/omegaconf configs are allowed)"
        )

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self._source}: unsupported persistent id {pid!r:.60}")
        if self._archive is None:
            raise CheckpointError(
                f"{self._source}: legacy (pre-zip) tensor storage is not supported"
            )
        storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
        with warnings.catch_warnings():  # legacy storage classes warn on use; torch.load too
            warnings.simplefilter("ignore", UserWarning)
            dtype = storage_type if isinstance(storage_type, torch.dtype) else storage_type.dtype
        if key not in self._storages:
            try:
                raw = self._archive.read(f"{self._prefix}data/{key}")
            except KeyError:
                raise CheckpointError(
                    f"{self._source}: storage {key} missing (truncated?)"
                ) from None
            itemsize = torch.empty((), dtype=dtype).element_size()
            if len(raw) < numel * itemsize:
                raise CheckpointError(f"{self._source}: storage {key} is truncated")
            untyped = (
                torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8)
                if raw
                else (torch.UntypedStorage(0))
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                self._storages[key] = torch.storage.TypedStorage(
                    wrap_storage=untyped, dtype=dtype, _internal=True
                )
        return self._storages[key]


def _restricted_load_zip(path: Path) -> Any:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt PyTorch archive ({e})") from e
    with archive:
        pkls = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pkls) != 1:
            raise CheckpointError(f"{path}: not a PyTorch checkpoint archive (no data.pkl)")
        prefix = pkls[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in archive.namelist():
            if archive.read(f"{prefix}byteorder").strip() not in (b"little", b""):
                raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
        try:
            data = archive.read(pkls[0])
            return RestrictedUnpickler(io.BytesIO(data), archive, prefix, str(path)).load()
        except CheckpointError:
            raise
        except Exception as e:  # corrupt pickles raise many types
            raise CheckpointError(f"{path}: cannot read checkpoint ({_first_line(e)})") from e


# ----------------------------------------------------------------------------------------------
# Checking pickles without loading them (training states that Accelerate / torch.load read)
# ----------------------------------------------------------------------------------------------
_STRING_OPS = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING",
     "STRING"}
)  # fmt: skip


def pickle_globals(data: bytes, source: str) -> list[tuple[str, str]]:
    """Every (module, name) a pickle would import, read from its opcodes without running it.

    A pickle can only call what it imports (GLOBAL, STACK_GLOBAL, INST) or takes from the
    extension registry (refused here), so this list is everything it could execute. The stack
    is simulated (as `pickletools.dis` does) to know the names a STACK_GLOBAL takes; names that
    are not plain strings are refused as unreadable."""
    import pickletools

    mark = object()
    stack: list[Any] = []  # str for pushed strings, `mark`, None for anything else
    memo: dict[Any, Any] = {}
    found: list[tuple[str, str]] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            name = op.name
            if name in ("EXT1", "EXT2", "EXT4"):
                raise CheckpointError(
                    f"{source}: refusing a pickle that uses the extension registry"
                )
            if name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):  # the stack is unchanged
                memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1] if stack else None
                continue
            if name == "DUP":
                stack.append(stack[-1] if stack else None)
                continue
            pushed: Any = None
            if name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                found.append((module, attr))
            elif name == "STACK_GLOBAL":
                module, attr = (stack[-2], stack[-1]) if len(stack) >= 2 else (None, None)
                if not (isinstance(module, str) and isinstance(attr, str)):
                    raise CheckpointError(f"{source}: refusing a pickle that hides what it imports")
                found.append((module, attr))
            elif name in _STRING_OPS:
                pushed = arg if isinstance(arg, str) else None
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                pushed = memo.get(arg)
            before, after = op.stack_before, op.stack_after
            if pickletools.markobject in before or (name == "POP" and stack and stack[-1] is mark):
                while stack and stack[-1] is not mark:  # everything above the mark
                    stack.pop()
                if stack:
                    stack.pop()
                below = before.index(pickletools.markobject) if name != "POP" else 0
            else:
                below = len(before)
            if below:
                del stack[max(0, len(stack) - below) :]
            if pickletools.markobject in after:
                stack.append(mark)
            else:
                stack.extend([pushed] * len(after))
    except CheckpointError:
        raise
    except Exception as e:  # a damaged pickle: genops raises ValueError and friends
        raise CheckpointError(f"{source}: not a readable pickle ({_first_line(e)})") from e
    return found


def _allowed_state_globals() -> set[tuple[str, str]]:
    allowed = set(_safe_globals())
    try:
        import numpy as np

        for name in dir(np.dtypes):
            if name.endswith("DType"):
                allowed.add(("numpy.dtypes", name))
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    allowed.update({("torch._utils", "_rebuild_device_tensor_from_numpy")})
    return allowed


def check_pickle_file(path: str | Path) -> None:
    """CheckpointError when a PyTorch file or plain pickle would import anything beyond tensors,
    numpy arrays and plain containers. Nothing in the file is run or even loaded."""
    p = Path(path)
    try:
        if zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as archive:
                blobs = [(n, archive.read(n)) for n in archive.namelist() if n.endswith(".pkl")]
        else:
            blobs = [(p.name, p.read_bytes())]
    except (OSError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{p}: unreadable ({_first_line(e)})") from e
    allowed = _allowed_state_globals()
    for _, data in blobs:
        for module, name in pickle_globals(data, str(p)):
            mapped = (module, name)
            if mapped in _compat_pickle.NAME_MAPPING:
                mapped = _compat_pickle.NAME_MAPPING[mapped]
            elif module in _compat_pickle.IMPORT_MAPPING:
                mapped = (_compat_pickle.IMPORT_MAPPING[module], name)
            if mapped not in allowed:
                raise CheckpointError(
                    f"{p}: refusing to unpickle {module}.{name} (a training state holds only "
                    "tensors, arrays and plain containers)"
                )


STATE_PICKLE_SUFFIXES = (".pkl", ".bin", ".pt", ".pth")


def check_state_files(state: str | Path) -> None:
    """`check_pickle_file` on every pickle of a saved training state folder, before Accelerate or
    torch.load opens any of them (Accelerate reads some with weights_only=False, and quietly
    skips a random-state file it cannot read)."""
    for f in sorted(Path(state).rglob("*")):
        if f.is_file() and f.suffix in STATE_PICKLE_SUFFIXES:
            check_pickle_file(f)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _check_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_file() and path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes)")


def read_torch_file(path: str | Path) -> Any:
    """Read a PyTorch checkpoint without executing anything from it (see module doc)."""
    p = Path(path)
    _check_file(p)
    with open(p, "rb") as f:
        magic = f.read(4)
    is_zip = magic[:2] == b"PK"
    if not is_zip and magic[:1] != b"\x80":
        raise CheckpointError(f"{p}: not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # refused globals, corrupt archives...: decide below
        first = e
    if is_zip:
        return _restricted_load_zip(p)
    # A plain (or legacy-format) pickle: the restricted reader names any refused class.
    try:
        with open(p, "rb") as f:
            obj = RestrictedUnpickler(f, None, "", str(p)).load()  # type: ignore[arg-type]
    except CheckpointError:
        raise
    except Exception:
        obj = None
    if isinstance(obj, dict):
        return obj
    raise CheckpointError(f"{p}: cannot read this PyTorch file safely ({_first_line(first)})")


def to_plain(obj: Any) -> Any:
    """Stand-ins (omegaconf DictConfig / ListConfig / nodes, enums) -> plain dicts, lists, values.

    Enum values become their member name when the pickle recorded it (omegaconf EnumNode), else
    their raw value. Tensors and other values pass through.
    """
    if isinstance(obj, StandIn):
        qual, state = type(obj)._qualname, obj._state
        if isinstance(state, dict) and "_content" in state:  # DictConfig / ListConfig
            content = state["_content"]
            if isinstance(content, dict):
                return {str(k): to_plain(v) for k, v in content.items()}
            if isinstance(content, (list, tuple)):
                return [to_plain(v) for v in content]
            return content  # None, "???" or an interpolation string
        if isinstance(state, dict) and "_val" in state:  # value nodes
            val = state["_val"]
            fields = state.get("fields")
            if isinstance(val, StandIn) and isinstance(fields, dict):
                raw = val._args[0] if val._args else None
                for member, v in fields.items():
                    if v == raw or (isinstance(v, StandIn) and v._args and v._args[0] == raw):
                        return member
            return to_plain(val)
        if state is None and len(obj._args) == 1:  # an enum member: keep its value
            return to_plain(obj._args[0])
        if isinstance(state, dict):
            return {str(k): to_plain(v) for k, v in state.items()}
        return qual
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------
# safetensors
# ----------------------------------------------------------------------------------------------
def _safetensors_header(path: Path) -> dict[str, Any] | None:
    """The JSON header of a safetensors file, or None when the file is not one."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return None
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > min(size - 8, 100 * 2**20):
            return None
        first = f.read(1)
        if first != b"{":
            return None
        try:
            return json.loads(first + f.read(n - 1))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None


def is_safetensors(path: Path) -> bool:
    return path.is_file() and _safetensors_header(path) is not None


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file to CPU tensors; truncated or foreign files give a CheckpointError."""
    from safetensors.torch import load_file

    p = Path(path)
    _check_file(p)
    header = _safetensors_header(p)
    if header is None:
        raise CheckpointError(f"{p}: not a safetensors file (bad or truncated header)")
    with p.open("rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
            and offsets[0] <= offsets[1]
        ):
            raise CheckpointError(
                f"{p}: corrupt safetensors header: tensor {key!r} has no valid data_offsets"
            )
        end = max(end, offsets[1])
    have = p.stat().st_size - 8 - n
    if have < end:
        raise CheckpointError(
            f"{p}: truncated safetensors file ({have} of {end} bytes of tensor data present)"
        )
    try:
        return load_file(str(p), device="cpu")
    except Exception as e:  # SafetensorError and friends
        raise CheckpointError(f"{p}: cannot read safetensors file ({_first_line(e)})") from e


# ----------------------------------------------------------------------------------------------
# Weights into a model, with one-line reports
# ----------------------------------------------------------------------------------------------
def _examples(keys: list[str], n: int = 3) -> str:
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `model`; any missing / unexpected key or shape disagreement is a
    one-line CheckpointError naming the first offenders."""
    expected = model.state_dict()
    bad_shape = [
        f"{k} is {tuple(v.shape)} in the file, {tuple(expected[k].shape)} in the model"
        for k, v in state.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if bad_shape:
        raise CheckpointError(
            f"{source}: weights disagree with the model config: {_examples(bad_shape, 1)}"
        )
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_examples(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_examples(unexpected)})")
        raise CheckpointError(f"{source}: weights do not match the model: {'; '.join(parts)}")
    bad = [
        k
        for k, v in state.items()
        if isinstance(v, torch.Tensor)
        and v.is_floating_point()
        and not bool(torch.isfinite(v).all())
    ]
    if bad:
        raise CheckpointError(
            f"{source}: non-finite weights (NaN or inf) in {_examples(bad)}; the model that wrote"
            " them diverged or the file is damaged"
        )
    with torch.no_grad():
        model.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------------------------
# Our export format
# ----------------------------------------------------------------------------------------------
def read_versioned_config(
    cfg_path: Path, marker: str, max_version: int, what: str, folder: Path | None = None
) -> dict[str, Any]:
    """A JSON config that carries `"format": marker` and an integer `"format_version"` no newer
    than `max_version` (exports, tokenizer folders); `what` names the kind in errors ("export",
    "tokenizer"), `folder` the folder to name when the file is missing."""
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        where = folder if folder is not None else cfg_path.parent
        raise CheckpointError(f"{where}: no {cfg_path.name} (not a bioaudio {what})") from None
    except (OSError, ValueError) as e:  # JSON and UTF-8 errors are ValueErrors
        raise CheckpointError(f"{cfg_path}: not valid JSON ({_first_line(e)})") from e
    if not isinstance(cfg, dict) or cfg.get("format") != marker:
        raise CheckpointError(f"{cfg_path}: not a bioaudio {what} config (no format marker)")
    version = cfg.get("format_version")
    if not isinstance(version, int) or version > max_version:
        raise CheckpointError(
            f"{cfg_path}: {what} format version {version} is newer than this bioaudio "
            f"reads ({max_version}); upgrade bioaudio"
        )
    return cfg


def read_export_config(path: str | Path) -> dict[str, Any]:
    """The config.json of an export folder (format marker and version checked)."""
    p = Path(path)
    cfg_path = p / CONFIG_FILE if p.is_dir() else p
    return read_versioned_config(cfg_path, EXPORT_FORMAT, EXPORT_VERSION, "export", folder=p)


def is_export_dir(path: Path) -> bool:
    """True for a folder holding one of our exports (its config.json has the format marker)."""
    cfg = path / CONFIG_FILE
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _json_type_errors(cls: type, data: Any, where: str) -> str | None:
    """The first value of `data` whose JSON type does not fit `cls`'s field (a string where a
    number goes, "yes" where a boolean goes, ...), as a message; None when all fit. from_dict
    converts flag strings, which is right for command lines but hides a damaged config."""
    import dataclasses
    import typing

    from bioaudio.config import _resolved_hints, _unwrap_optional

    if not isinstance(data, dict):
        return f"{where} must be a JSON object, got {type(data).__name__}"
    hints = _resolved_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        tp, optional = _unwrap_optional(hints[f.name])
        if value is None and optional:
            continue
        origin = typing.get_origin(tp)
        if dataclasses.is_dataclass(tp):
            problem = _json_type_errors(tp, value, f"{where}.{f.name}")
            if problem:
                return problem
            continue
        if tp is bool:
            ok = isinstance(value, bool)
        elif tp is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif tp is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif tp is str or origin is typing.Literal:
            ok = isinstance(value, str)
        elif origin in (list, tuple):
            ok = isinstance(value, list)
        else:
            continue
        if not ok:
            return f"{where}.{f.name} is {value!r} ({type(value).__name__}), not a JSON {getattr(tp, '__name__', 'value')}"
    return None


def check_export_config(cfg: dict[str, Any], where: str) -> None:
    """CheckpointError for an export config.json whose values are of the wrong JSON type or out
    of range (the frontend, the head, the encoder config, `multi_label`, class names, the
    training clip length), before anything is built from it."""
    from bioaudio.data.frontend import FrontendConfig
    from bioaudio.models.heads import HeadConfig

    problems = []
    if "multi_label" in cfg and not isinstance(cfg["multi_label"], bool):
        problems.append(f"multi_label is {cfg['multi_label']!r}, not a JSON boolean (true/false)")
    names = cfg.get("class_names")
    if names is not None and not (
        isinstance(names, list) and all(isinstance(n, str) for n in names)
    ):
        problems.append("class_names must be a list of strings")
    for key, cls in (("frontend", FrontendConfig), ("head", HeadConfig)):
        if cfg.get(key) is not None:
            problems.append(_json_type_errors(cls, cfg[key], key))
    if isinstance(cfg.get("encoder"), dict):
        try:
            enc_cls = registry.config_class(str(cfg.get("model_type")))
        except ConfigError:
            enc_cls = None
        if enc_cls is not None:
            problems.append(_json_type_errors(enc_cls, cfg["encoder"], "encoder"))
    prov = cfg.get("provenance")
    if prov is not None and not isinstance(prov, dict):
        problems.append("provenance must be a JSON object")
    elif isinstance(prov, dict) and prov.get("clip_seconds") is not None:
        clip = prov["clip_seconds"]
        if (
            isinstance(clip, bool)
            or not isinstance(clip, (int, float))
            or not math.isfinite(clip)
            or clip <= 0
        ):
            problems.append(f"provenance.clip_seconds must be a positive number, got {clip!r}")
    problems = [m for m in problems if m]
    if problems:
        raise CheckpointError(f"{where}: {problems[0]}")
    if isinstance(cfg.get("frontend"), dict):
        try:
            from bioaudio.config import from_dict

            from_dict(FrontendConfig, cfg["frontend"], where="frontend")
        except ConfigError as e:
            raise CheckpointError(f"{where}: {e}") from e


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_export(path: str | Path) -> Any:
    """Load one of our export folders -> its model (eval mode), rebuilt by the model type's
    registered class (an AudioModel subclass, a BaselineClassifier, ...).

    The config is checked (JSON types, ranges) before anything is built, the weights file
    against the `weights_sha256` in the config (exports written before the hash existed load
    without it), and the weights must be finite."""
    p = Path(path)
    cfg = read_export_config(p)
    check_export_config(cfg, str(p / CONFIG_FILE))
    try:
        cls = registry.wrapper_class(str(cfg.get("model_type")))
        model = cls.from_config(cfg)
    except ConfigError as e:
        raise CheckpointError(f"{p / CONFIG_FILE}: {e}") from e
    expected = cfg.get("weights_sha256")
    if expected is not None and (p / WEIGHTS_FILE).is_file():
        if file_sha256(p / WEIGHTS_FILE) != expected:
            raise CheckpointError(
                f"{p / WEIGHTS_FILE}: sha256 differs from the one recorded in {CONFIG_FILE} "
                "(the file was damaged or changed after export)"
            )
    load_weights(model, read_safetensors(p / WEIGHTS_FILE), str(p / WEIGHTS_FILE))
    model.provenance = cfg.get("provenance") or {}
    return model.eval()


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("bioaudio")
    except Exception:
        return "unknown"


def install_dir(tmp: Path, out: Path) -> None:
    """Move a finished export folder `tmp` to `out`; an existing folder is replaced only when it
    is one of our exports (or empty), and only once `tmp` is whole."""
    if out.exists() or out.is_symlink():
        if not out.is_dir() or (any(out.iterdir()) and not is_export_dir(out)):
            raise CheckpointError(
                f"{out} exists and is not a bioaudio export; refusing to replace it"
            )
    replace_dir(tmp, out)


def write_export(model: Any, tmp: Path, provenance: dict[str, Any] | None = None) -> None:
    """Write `model.safetensors` + `config.json` into the (new, empty) folder `tmp`."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    config = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        **model.config(),
        "provenance": {
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "bioaudio_version": _version(),
            **(getattr(model, "provenance", None) or {}),
            **(provenance or {}),
            # Who wrote this file (command line, versions, git commit, machine); a Trainer adds
            # "training" (seeds, data fingerprint, processes). An inherited one is replaced.
            "environment": runinfo.environment(),
        },
    }
    save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "bioaudio": EXPORT_FORMAT})
    config["weights_sha256"] = file_sha256(tmp / WEIGHTS_FILE)  # checked by load_export
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str) + "\n")


def save_export(model: Any, out_dir: str | Path, provenance: dict[str, Any] | None = None) -> Path:
    """Write `model` as an export folder (`model.safetensors` + `config.json`), atomically."""
    out = Path(out_dir)
    tmp = temp_dir_beside(out)
    try:
        write_export(model, tmp, provenance)
        install_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ----------------------------------------------------------------------------------------------
# Format detection and the one loader
# ----------------------------------------------------------------------------------------------
def _config_beside(weights: Path) -> Path | None:
    for cand in (
        weights.with_name(f"{weights.stem}_config.json"),
        weights.with_name(f"{weights.stem}.json"),
        weights.with_name(CONFIG_FILE),
    ):
        if cand.is_file():
            return cand
    return None


def detect_format(
    path: str | Path, config: str | Path | None = None
) -> tuple[str, Path, Path | None]:
    """(kind, weights file or folder, config file) for a checkpoint path.

    kind is "export", "hf" (a Hugging Face folder or .safetensors with its config.json) or "torch"
    (a PyTorch pickle; the registered formats tell its content apart when read). Raises
    CheckpointError for anything else.
    """
    p = Path(path)
    _check_file(p)
    expected = (
        "expected an official BEATs .pt, an EAT fairseq .pt, an EAT Hugging Face folder or "
        ".safetensors with its config.json, or a bioaudio export folder"
    )
    if p.is_dir():
        if is_export_dir(p):
            return "export", p, p / CONFIG_FILE
        cfg = Path(config) if config else p / CONFIG_FILE
        for name in (WEIGHTS_FILE, "pytorch_model.bin"):
            if (p / name).is_file() and cfg.is_file():
                return "hf", p / name, cfg
        raise CheckpointError(f"{p}: folder holds no checkpoint bioaudio can read ({expected})")
    if is_safetensors(p):
        cfg = Path(config) if config else _config_beside(p)
        if cfg is not None and cfg.name == CONFIG_FILE and is_export_dir(p.parent):
            return "export", p.parent, cfg
        if cfg is None:
            raise CheckpointError(
                f"{p}: a safetensors file without its config.json (put it beside the file or "
                "pass --config)"
            )
        return "hf", p, cfg
    with open(p, "rb") as f:
        magic = f.read(2)
    if magic[:2] == b"PK" or magic[:1] == b"\x80":
        return "torch", p, None
    raise CheckpointError(f"{p}: not a checkpoint format bioaudio can read ({expected})")


def _read_hf_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable config ({_first_line(e)})") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: config.json is not a JSON object")
    return cfg


def _load_official(
    path: str | Path, config: str | Path | None, produces: str, **options: Any
) -> tuple[Any, str]:
    """(object, format name) of an official file through the registered formats."""
    kind, weights, cfg = detect_format(path, config)
    source = str(path)
    if kind == "export":
        raise CheckpointError(f"{source}: a bioaudio export, not an official checkpoint")
    if kind == "hf":
        assert cfg is not None
        cfg_dict = _read_hf_config(cfg)
        for spec in registry.formats(reads="hf"):
            detect, load = registry.format_functions(spec)
            if detect(cfg_dict):
                if spec.produces != produces:
                    break
                return load(weights, cfg, source, **options), spec.name
        raise CheckpointError(
            f"{source}: a Hugging Face folder whose config.json no registered format knows "
            f"(known: {', '.join(f.name for f in registry.formats(reads='hf'))})"
        )
    obj = read_torch_file(weights)
    for spec in registry.formats(reads="torch"):
        detect, load = registry.format_functions(spec)
        if detect(obj):
            if spec.produces != produces:
                what = (
                    "a tokenizer (use it with --tokenizer)"
                    if spec.produces == "tokenizer"
                    else "a model"
                )
                raise CheckpointError(
                    f"{source}: this {spec.description} is {what}, not {produces}"
                )
            return load(obj, source, **options), spec.name
    keys = list(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
    known = ", ".join(f.description for f in registry.formats(reads="torch", produces=produces))
    raise CheckpointError(
        f"{source}: a PyTorch file, but not a known checkpoint ({known}; top level: {keys})"
    )


def load_model(
    path: str | Path,
    *,
    config: str | Path | None = None,
    ema: bool = False,
    device: str | torch.device | None = None,
) -> Any:
    """Load any supported checkpoint (see module doc) as a model in eval mode.

    `config`: the Hugging Face config.json of a bare .safetensors file. `ema`: for an EAT
    fairseq pretraining checkpoint, take the EMA teacher's weights instead of the student's.
    """
    kind, weights, _ = detect_format(path, config)
    if kind == "export":
        model = load_export(weights)
    else:
        model, fmt = _load_official(path, config, "model", ema=ema)
        model.provenance = {"source": os.path.abspath(str(path)), "source_format": fmt}
        if ema:
            model.provenance["weights"] = "ema_teacher"
    if device is not None:
        model.to(device)
    return model.eval()


def load_tokenizer(path: str | Path, device: str | torch.device | None = None) -> Any:
    """Load a tokenizer: an official file of a registered tokenizer format, or a tokenizer
    folder saved by this toolkit (`tokenizer.safetensors` + `config.json`)."""
    p = Path(path)
    _check_file(p)
    if p.is_dir() and not is_export_dir(p):
        readers = [f for f in registry.formats(produces="tokenizer") if f.saved_reader]
        if not readers:
            raise CheckpointError(f"{p}: no registered tokenizer format reads folders")
        module = importlib.import_module(readers[0].module)
        tok = getattr(module, readers[0].saved_reader)(p)
    else:
        tok, _ = _load_official(p, None, "tokenizer")
    if device is not None:
        tok.to(device)
    return tok.eval()


def save_tokenizer(tokenizer: Any, out_dir: str | Path, provenance: dict | None = None) -> Path:
    """Write a tokenizer folder with the registered tokenizer format's saver."""
    for spec in registry.formats(produces="tokenizer"):
        if spec.saver:
            module = importlib.import_module(spec.module)
            return getattr(module, spec.saver)(tokenizer, out_dir, provenance)
    raise CheckpointError("no registered tokenizer format can save tokenizers")


def checkpoint_kind(path: str | Path, config: str | Path | None = None) -> str:
    """'model' or 'tokenizer': what the checkpoint at `path` holds (read safely)."""
    p = Path(path)
    if p.is_dir() and (p / CONFIG_FILE).is_file() and not is_export_dir(p):
        try:
            marker = json.loads((p / CONFIG_FILE).read_text()).get("format")
        except (OSError, ValueError, AttributeError):
            marker = None
        if marker == "bioaudio.tokenizer":
            return "tokenizer"
    kind, weights, _ = detect_format(path, config)
    if kind != "torch":
        return "model"
    obj = read_torch_file(weights)
    for spec in registry.formats(reads="torch"):
        detect, _ = registry.format_functions(spec)
        if detect(obj):
            return spec.produces
    return "model"


def export_classifier(
    model: torch.nn.Module, out_dir: str | Path, provenance: dict[str, Any] | None = None
) -> Path:
    """Write an export; into `out_dir` directly when it is a new empty folder (the Trainer hands
    over one it moves into place itself), else atomically through `save_export`. A training
    wrapper names what it exports with `export_target()` (a frozen-encoder probe: the whole
    model)."""
    target = getattr(model, "export_target", None)
    model = target() if callable(target) else model
    out = Path(out_dir)
    if out.is_dir() and not any(out.iterdir()):
        write_export(model, out, provenance)
        return out
    return save_export(model, out, provenance)
