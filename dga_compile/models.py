"""`load_model`: every model format dga-compile reads, for the CLI and the evaluation alike.

- a Hugging Face model directory (``config.json`` + safetensors), or a name in
  `dga_compile.eval.fetch.MODEL_ALIASES` (``smollm2``, ``minilm``: fetched once); sample
  ``input_ids`` of ``seq_len`` tokens;
- a ``torch.export`` archive (``.pt2``), read without running code from the file: its example
  inputs and pickled tensors must load with ``torch.load(weights_only=True)``; whatever needs a
  full unpickler (other objects, tensor subclasses, script objects) or native code
  (AOTInductor) is refused unless ``trust_pickle=True``;
- a pickled ``nn.Module`` (``.pt``/``.pth``/``.pkl``/``.bin``), only with ``trust_pickle=True``
  (unpickling runs code stored in the file).

Bad arguments raise `ValueError` / `TypeError`, an unreadable file `dga_compile.errors.ModelLoadError`.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import json
import logging
import pathlib
import zipfile
from typing import Any, Optional, Sequence, Union

import torch

from .errors import ModelLoadError

__all__ = ["LoadedModel", "PICKLE_SUFFIXES", "bind_inputs", "load_model", "sample_inputs"]

log = logging.getLogger("dga_compile.models")

#: File suffixes read as a pickled ``nn.Module``.
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".bin")
#: Sample length of a Hugging Face model's ``input_ids`` when none is given (clipped to its maximum).
DEFAULT_SEQ_LEN = 64
_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "bool")


@dataclasses.dataclass
class LoadedModel:
    """What `load_model` read.

    Attributes:
        model: an ``nn.Module`` (eval mode) or a ``torch.export.ExportedProgram``.
        args, kwargs: sample inputs (for tracing and verification).
        kind: ``"huggingface"``, ``"pt2"`` or ``"pickle"``.
        path: the file or directory read (an alias resolved to its fetched directory).
        task: Hugging Face models: ``"causal-lm"`` or ``"encoder"``; otherwise None.
        tokenizer: the model's tokenizer when ``load_model(..., tokenizer=True)``.
    """

    model: Any
    args: tuple
    kwargs: dict
    kind: str
    path: Optional[pathlib.Path] = None
    task: Optional[str] = None
    tokenizer: Any = None


def load_model(source: Union[str, pathlib.Path], *, trust_pickle: bool = False,
               inputs: Optional[Sequence[Union[str, torch.Tensor]]] = None, seq_len: Optional[int] = None,
               tokenizer: bool = False) -> LoadedModel:
    """Reads ``source`` in any supported format (module docstring).

    Args:
        source: a model alias, a Hugging Face directory, a ``.pt2`` archive or a pickle.
        trust_pickle: allow what runs code from the file (pickles, archives that need them).
        inputs: sample inputs of an archive or pickle, tensors or specs such as ``"2x128:int64"``
            (`sample_inputs`), one per forward argument; an archive's are checked against it.
        seq_len: Hugging Face models: tokens of the sample ``input_ids`` (default 64), ≤ the
            model's ``max_position_embeddings``.
        tokenizer: Hugging Face models: also load the tokenizer (the evaluation needs it).
    """
    path = _resolve(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir():
        if inputs:
            raise ValueError(f"{path} is a Hugging Face model directory: its sample input is input_ids of seq_len "
                             f"tokens (--seq-len); inputs (--input) are for .pt2 archives and pickles")
        return _load_huggingface(path, seq_len, tokenizer)
    if tokenizer:
        raise ValueError(f"{path} is not a Hugging Face model directory: the evaluation needs one, with its tokenizer "
                         f"(or an alias such as smollm2)")
    if seq_len is not None:
        raise ValueError(f"seq_len={seq_len} (--seq-len) applies to Hugging Face model directories; give the sample "
                         f"inputs of {path.name} with inputs (--input), e.g. 2x128:int64")
    suffix = path.suffix.lower()
    if suffix == ".pt2":
        return _load_pt2(path, inputs, trust_pickle)
    if suffix in PICKLE_SUFFIXES:
        if not trust_pickle:
            raise ValueError(f"refusing to unpickle {path}: loading a pickle executes code stored in the file. "
                             f"Pass trust_pickle=True (--trust-pickle) if you trust its source, or save a torch.export "
                             f"archive (torch.export.save(torch.export.export(model, args), 'model.pt2'))")
        return _load_pickle(path, inputs)
    raise ValueError(f"{path}: unknown model format {suffix or '(no suffix)'}; expected a .pt2 archive, a Hugging "
                     f"Face model directory, or a pickled module ({'/'.join(PICKLE_SUFFIXES)} with --trust-pickle)")


def _resolve(source: Union[str, pathlib.Path]) -> pathlib.Path:
    """A `MODEL_ALIASES` name -> its fetched directory; anything else -> a path."""
    if isinstance(source, str):
        from .eval.fetch import MODEL_ALIASES

        if source in MODEL_ALIASES:
            return MODEL_ALIASES[source]()
    return pathlib.Path(source)


def _unreadable(path: pathlib.Path, what: str, e: BaseException) -> ModelLoadError:
    first = (str(e).strip().splitlines() or [""])[0]
    return ModelLoadError(f"cannot read {path} as {what} (corrupt or truncated?): {type(e).__name__}: {first}")


# ------------------------------------------------------------------------- torch.export archives

def _load_pt2(path: pathlib.Path, inputs, trust_pickle: bool) -> LoadedModel:
    data = path.read_bytes()  # read once: what is checked is what torch loads
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            bad = archive.testzip()
            if bad is not None:
                raise zipfile.BadZipFile(f"entry {bad} fails its CRC check")
            unsafe = _needs_code(archive)
    except (zipfile.BadZipFile, OSError, ValueError, KeyError) as e:
        raise _unreadable(path, "a torch.export archive (.pt2)", e) from e
    if unsafe and not trust_pickle:
        raise ValueError(f"refusing to load {path}: {unsafe[0]}, which runs code stored in the file. Pass "
                         f"--trust-pickle (trust_pickle=True) if you trust its source, or re-export it from the "
                         f"model with tensor inputs (torch.export.save)")
    if unsafe:
        log.warning("%s: %s: code stored in the file will run (--trust-pickle)", path, "; ".join(unsafe))
    try:
        program = torch.export.load(io.BytesIO(data))
    except Exception as e:
        raise _unreadable(path, "a torch.export archive (.pt2)", e) from e
    if inputs:
        return LoadedModel(program, *bind_inputs(program, sample_inputs(inputs)), "pt2", path)
    example = program.example_inputs
    if example is None:
        raise ValueError(f"{path} holds no example inputs; give them with inputs (--input), one per forward "
                         f"argument: {_describe_inputs(program)}")
    args, kwargs = example
    return LoadedModel(program, tuple(args), dict(kwargs), "pt2", path)


def _needs_code(archive: zipfile.ZipFile) -> list[str]:
    """What ``torch.export.load`` would read from ``archive`` with more than
    ``torch.load(weights_only=True)``: a full unpickler or native code (one phrase each)."""
    from torch.export.pt2_archive import constants as c

    names = set(archive.namelist())
    found = []
    for name in sorted(names):
        top, sep, part = name.partition("/")  # the archive's root folder, then the path torch reads
        root, part = (top + sep, part) if sep else ("", name)
        if part.startswith(c.AOTINDUCTOR_DIR):
            found.append(f"it holds AOTInductor code ({c.AOTINDUCTOR_DIR}), native code that torch.export.load loads")
        elif part.startswith(c.SAMPLE_INPUTS_DIR) or part.endswith(".pt"):  # .pt: legacy weights, the 2.7 format
            if not _weights_only(archive.read(name)):
                found.append(f"its {'example inputs' if part.startswith(c.SAMPLE_INPUTS_DIR) else part} need a "
                             f"full unpickler")
        elif part.startswith((c.WEIGHTS_DIR, c.CONSTANTS_DIR)) and part.endswith("_config.json"):
            folder = c.WEIGHTS_DIR if part.startswith(c.WEIGHTS_DIR) else c.CONSTANTS_DIR
            for fqn, meta in json.loads(archive.read(name))["config"].items():
                payload = root + folder + meta["path_name"]
                if meta["path_name"].startswith((c.CUSTOM_OBJ_FILENAME_PREFIX, c.OPAQUE_OBJ_FILENAME_PREFIX)):
                    found.append(f"its constant {fqn} is a pickled Python object")
                elif meta.get("use_pickle") and (payload not in names or not _weights_only(archive.read(payload))):
                    found.append(f"its {'weight' if folder == c.WEIGHTS_DIR else 'constant'} {fqn} needs a full "
                                 f"unpickler")
    return list(dict.fromkeys(found))


def _weights_only(data: bytes) -> bool:
    """Whether ``torch.load(weights_only=True)`` reads ``data`` (it runs no code from it)."""
    try:
        torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception:
        return False
    return True


def bind_inputs(program: torch.export.ExportedProgram, inputs: Sequence[torch.Tensor]) -> tuple[tuple, dict]:
    """(args, kwargs) for ``program`` from ``inputs``, its tensor inputs in call order (inputs the
    archive fixed to a constant keep it). Raises `ValueError` when they cannot run it: their
    number, dtypes, ranks, or sizes outside its dynamic-shape ranges."""
    wanted = _user_inputs(program)
    tensors = [(name, val) for name, val in wanted if isinstance(val, torch.Tensor)]
    if len(inputs) != len(tensors):
        raise ValueError(f"{len(inputs)} sample input(s) given, the archive takes {len(tensors)}: "
                         f"{_describe_inputs(program)}")
    bound: dict = {}
    for i, (x, (name, val)) in enumerate(zip(inputs, tensors), 1):
        problem = _mismatch(x, val, program.range_constraints, bound)
        if problem:
            raise ValueError(f"sample input {i} ({name}) is {_describe(x)}, but {problem}; the archive takes "
                             f"{_describe_inputs(program)}")
    given = iter(inputs)
    flat = [next(given) if isinstance(val, torch.Tensor) else val for _, val in wanted]
    args, kwargs = torch.utils._pytree.tree_unflatten(flat, program.call_spec.in_spec)
    return tuple(args), dict(kwargs)


def _user_inputs(program: torch.export.ExportedProgram) -> list[tuple[str, Any]]:
    """(name, fake tensor or constant) of each user input, in call order."""
    from torch.export.graph_signature import InputKind, TensorArgument

    vals = {n.name: n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"}
    return [(spec.arg.name, vals[spec.arg.name] if isinstance(spec.arg, TensorArgument)
             else getattr(spec.arg, "value", None))
            for spec in program.graph_signature.input_specs if spec.kind == InputKind.USER_INPUT]


def _describe(x: torch.Tensor) -> str:
    """``int64[2, s0]``: dtype and shape (sizes or symbols)."""
    return f"{str(x.dtype).removeprefix('torch.')}[{', '.join(str(s) for s in x.shape)}]"


def _mismatch(x, val, ranges: dict, bound: dict) -> Optional[str]:
    """Why ``x`` cannot stand for the traced input ``val`` (None when it can); ``bound`` collects
    the sizes symbolic dims took so far (the same symbol must take the same size)."""
    if x.dtype != val.dtype:
        return f"it must be {str(val.dtype).removeprefix('torch.')}"
    if x.dim() != val.dim():
        return f"it must have {val.dim()} dimensions"
    for d, (size, want) in enumerate(zip(x.shape, val.shape)):
        if isinstance(want, int):
            if size != want:
                return f"dim {d} must be {want}"
            continue
        expr = want.node.expr
        if expr in ranges:
            lo, hi = ranges[expr].lower, ranges[expr].upper
            if not (bool(lo <= size) and bool(size <= hi)):
                return f"dim {d} ({expr}) must lie in [{lo}, {hi}]"
        if bound.setdefault(expr, size) != size:
            return f"dim {d} ({expr}) must equal the size {bound[expr]} it has in another input"
    return None


def _describe_inputs(program: torch.export.ExportedProgram) -> str:
    """``input_ids: int64[2, s0] with s0 in [2, 4096]`` for each user input."""
    parts, ranges = [], {}
    for name, val in _user_inputs(program):
        if not isinstance(val, torch.Tensor):
            parts.append(f"{name}={val!r}")
            continue
        parts.append(f"{name}: {_describe(val)}")
        ranges.update({s.node.expr: program.range_constraints.get(s.node.expr) for s in val.shape
                       if not isinstance(s, int)})
    bounds = [f"{s} in [{r.lower}, {r.upper}]" for s, r in ranges.items() if r is not None]
    return "; ".join(parts) + (f" with {', '.join(bounds)}" if bounds else "")


# ------------------------------------------------------------------------- sample inputs, pickles

def sample_inputs(specs: Sequence[Union[str, torch.Tensor]]) -> tuple:
    """Tensors as given; ``"2x128:int64"`` -> a random tensor of that shape (ints 0/1: valid
    token ids and masks; floats standard normal), seeded by its position."""
    out = []
    for spec in specs:
        if isinstance(spec, torch.Tensor):
            out.append(spec)
            continue
        shape_s, _, dtype_s = spec.partition(":")
        dtype_s = dtype_s or "float32"
        try:
            shape = [int(d) for d in shape_s.lower().split("x")]
        except ValueError:
            shape = []
        if not shape or min(shape) < 1 or dtype_s not in _DTYPES:
            raise ValueError(f"--input {spec!r}: expected SHAPE[:DTYPE] such as 2x128:int64, DTYPE one of "
                             f"{', '.join(_DTYPES)}")
        dtype = getattr(torch, dtype_s)
        g = torch.Generator().manual_seed(len(out))
        if dtype.is_floating_point:
            out.append(torch.randn(shape, generator=g).to(dtype))
        else:
            out.append(torch.randint(0, 2, shape, generator=g).to(dtype))
    return tuple(out)


def _load_pickle(path: pathlib.Path, inputs) -> LoadedModel:
    log.warning("%s is a pickle: code stored in the file will run (--trust-pickle)", path)
    try:
        model = torch.load(str(path), weights_only=False, map_location="cpu")
    except Exception as e:
        raise _unreadable(path, "a pickled nn.Module", e) from e
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{path} holds a {type(model).__name__}, not an nn.Module; save the module itself "
                        f"(torch.save(model, path)) or a .pt2 archive")
    if not inputs:
        raise ValueError("a pickled module carries no sample inputs: give one per forward argument with inputs "
                         "(--input), e.g. 2x128:int64")
    return LoadedModel(model.eval(), sample_inputs(inputs), {}, "pickle", path)


# ------------------------------------------------------------------------- Hugging Face directories

def _load_huggingface(path: pathlib.Path, seq_len: Optional[int], tokenizer: bool) -> LoadedModel:
    if not (path / "config.json").exists():
        raise ValueError(f"{path} is a directory without config.json; expected a Hugging Face model directory")
    if seq_len is not None and (not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1):
        raise ValueError(f"seq_len (--seq-len) must be a whole number of tokens ≥ 1, got {seq_len!r}; use e.g. 64")
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(path))
    except Exception as e:
        raise _unreadable(path, "a Hugging Face model directory", e) from e
    arch = ", ".join(config.architectures or [type(config).__name__])
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{path} is an encoder-decoder model ({arch}); dga-compile takes decoder-only and "
                         f"encoder-only models: trace the part you need (e.g. model.get_encoder()) with torch.export "
                         f"and pass the .pt2 archive")
    limit = getattr(config, "max_position_embeddings", None)
    if seq_len is not None and limit and seq_len > limit:
        raise ValueError(f"seq_len={seq_len} (--seq-len) exceeds the model's max_position_embeddings={limit}; "
                         f"use at most {limit} tokens")
    causal = any(a.endswith("ForCausalLM") for a in (config.architectures or [])) or config.is_decoder
    cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    tok = _load_tokenizer(path) if tokenizer else None
    try:
        model = cls.from_pretrained(str(path), attn_implementation="sdpa", dtype=torch.float32).eval()
    except Exception as e:
        raise _unreadable(path, "a Hugging Face model directory", e) from e
    n = seq_len or min(DEFAULT_SEQ_LEN, limit or DEFAULT_SEQ_LEN)
    ids = torch.randint(0, model.config.vocab_size, (2, n), generator=torch.Generator().manual_seed(0))
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False  # a traced KV cache is an output no exporter wants
    return LoadedModel(model, (), kwargs, "huggingface", path, "causal-lm" if causal else "encoder", tok)


def _load_tokenizer(path: pathlib.Path):
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path} has no usable tokenizer ({first}); the evaluation cuts text into tokens with the "
                         f"model's own tokenizer: save it into the directory (tokenizer.save_pretrained(path))") from e
