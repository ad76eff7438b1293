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
import importlib
import io
import json
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
    n = struct.unpack("<Q", p.open("rb").read(8))[0]
    end = max(
        (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0
    )
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
    with torch.no_grad():
        model.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------------------------
# Our export format
# ----------------------------------------------------------------------------------------------
def read_export_config(path: str | Path) -> dict[str, Any]:
    """The config.json of an export folder (format marker and version checked)."""
    p = Path(path)
    cfg_path = p / CONFIG_FILE if p.is_dir() else p
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{p}: no {CONFIG_FILE} (not a bioaudio export)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({_first_line(e)})") from e
    if not isinstance(cfg, dict) or cfg.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{cfg_path}: not a bioaudio export config (no format marker)")
    version = cfg.get("format_version")
    if not isinstance(version, int) or version > EXPORT_VERSION:
        raise CheckpointError(
            f"{cfg_path}: export format version {version} is newer than this bioaudio "
            f"reads ({EXPORT_VERSION}); upgrade bioaudio"
        )
    return cfg


def is_export_dir(path: Path) -> bool:
    """True for a folder holding one of our exports (its config.json has the format marker)."""
    cfg = path / CONFIG_FILE
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def load_export(path: str | Path) -> Any:
    """Load one of our export folders -> its model (eval mode), rebuilt by the model type's
    registered class (an AudioModel subclass, a BaselineClassifier, ...)."""
    p = Path(path)
    cfg = read_export_config(p)
    try:
        cls = registry.wrapper_class(str(cfg.get("model_type")))
        model = cls.from_config(cfg)
    except ConfigError as e:
        raise CheckpointError(f"{p / CONFIG_FILE}: {e}") from e
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
        },
    }
    save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "bioaudio": EXPORT_FORMAT})
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
