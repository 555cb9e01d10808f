"""Checkpoint folders: tensors as safetensors, everything else as JSON, never a pickle.

A folder holds `encoder.safetensors` (the compressor's parameters) and `config.json` (what built
it: encoder, transform, the model it was trained for, the prompt format). The training run's
`last/` also holds `optimizer.safetensors` and `trainer_state.json`, what resuming needs.
A checkpoint of a run over several models (an adapter per model) records, instead of one model
and prompt format, `answerers` (each model's name, identity, prompt format and loss weight, in
the order of its adapters) and `reader` (the model whose copy reads the text): `answerers()` and
`reader()` read either kind.
A folder is written beside its target and swapped in by renames, so a reader (or a resume after
SIGKILL) sees the old folder or the new one, never half of one.
Tensors are read and written by functions that import torch themselves: the checks the command
makes before any work (is there a checkpoint, what does it record) need none.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

from ..errors import UsageError
from ..files import write_bytes, writing

FORMAT = "latentwire-checkpoint"
VERSION = 1
WEIGHTS, CONFIG = "encoder.safetensors", "config.json"
OPTIMIZER, STATE = "optimizer.safetensors", "trainer_state.json"


def _tensors(path: Path, tensors: dict) -> None:
    """Serialised in memory, then written by Python: a full disk is an OSError (safetensors'
    own writer reports it as an error of its own)."""
    from safetensors.torch import save as serialised

    with open(path, "wb") as fh:
        fh.write(serialised(tensors))
        fh.flush()
        os.fsync(fh.fileno())


def _json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())


def save(folder, weights: dict, config: dict, optimizer: dict | None = None,
         state: dict | None = None) -> None:
    """Write a checkpoint folder atomically (see the module's note)."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    old = folder.with_name(f".{folder.name}.old")
    # A failure before the renames leaves the previous checkpoint untouched.
    with writing(folder, tmp):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _tensors(tmp / WEIGHTS, {k: v.detach().contiguous().cpu() for k, v in weights.items()})
        _json(tmp / CONFIG, {"format": FORMAT, "version": VERSION, **config})
        if optimizer is not None:
            tensors, groups = flatten_optimizer(optimizer)
            _tensors(tmp / OPTIMIZER, tensors)
            _json(tmp / STATE, {**(state or {}), "optimizer_param_groups": groups})
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def press_file(run, model_name: str) -> Path:
    """Where a run keeps the scores its fitted press learned for one of its models (a model's
    folder name, models.model_dirname): beside its checkpoints, which were trained behind it."""
    return Path(run) / f"press-{model_name}.safetensors"


def save_tensors(path, tensors: dict, metadata: dict) -> None:
    """One safetensors file, its string `metadata` beside the tensors, written atomically
    (files.write_bytes: a reader never sees half of it)."""
    from safetensors.torch import save as serialised

    write_bytes(Path(path), serialised(
        {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata))


def load_tensors(path) -> tuple[dict, dict] | None:
    """(tensors, metadata) of a file `save_tensors` wrote; None where it is missing or cannot
    be read (what it holds can be computed again)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata() or {}
    except (OSError, SafetensorError):
        return None


def existing(folder) -> Path | None:
    """The folder, or the previous one left by a swap that a kill interrupted; None if neither."""
    folder = Path(folder)
    for candidate in (folder, folder.with_name(f".{folder.name}.old")):
        if (candidate / CONFIG).is_file() and (candidate / WEIGHTS).is_file():
            return candidate
    return None


def read_config(folder) -> dict:
    folder = Path(folder)
    path = folder / CONFIG
    if not path.is_file():
        raise UsageError(f"{folder} is not a checkpoint folder (no {CONFIG}); pass a folder "
                         "written by `latentwire train`, e.g. runs/train/<run>/checkpoints/best")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"{path} cannot be read ({err}); the checkpoint is damaged")
    if config.get("format") != FORMAT:
        raise UsageError(f"{folder} is not a latentwire checkpoint (format "
                         f"{config.get('format')!r}); write one with `latentwire train`")
    if not (folder / WEIGHTS).is_file():
        raise UsageError(f"{folder} has no {WEIGHTS}; the checkpoint is incomplete")
    return config


def answerers(config: dict) -> list[dict]:
    """Each model a checkpoint's latents are for: {model, prompt_format} and, for a shared
    encoder, its name and weight; the one model of a one-model checkpoint."""
    return config.get("answerers") or [{"model": config["model"],
                                        "prompt_format": config["prompt_format"]}]


def reader(config: dict) -> dict:
    """The model whose copy reads the text: {model, prompt_format}."""
    return config.get("reader") or answerers(config)[0]


def load(folder) -> tuple[dict, dict]:
    """(weights, config) of a checkpoint folder."""
    from safetensors.torch import load_file

    config = read_config(folder)
    return load_file(Path(folder) / WEIGHTS), config


def load_training(folder) -> tuple[dict, dict, dict, dict]:
    """(weights, config, optimizer state dict, trainer state) of a `last/` folder."""
    from safetensors.torch import load_file

    weights, config = load(folder)
    state = json.loads((Path(folder) / STATE).read_text(encoding="utf-8"))
    optimizer = unflatten_optimizer(load_file(Path(folder) / OPTIMIZER),
                                    state.pop("optimizer_param_groups"))
    return weights, config, optimizer, state


def digest(folder) -> str:
    """A hash of what the checkpoint holds (weights and config), not of where it lies."""
    h = hashlib.sha256()
    for name in (WEIGHTS, CONFIG):
        h.update((Path(folder) / name).read_bytes())
    return h.hexdigest()[:16]


def flatten_optimizer(state_dict: dict) -> tuple[dict, list]:
    """A torch optimizer's state dict as {name: tensor} plus JSON param groups."""
    import torch

    tensors = {}
    for index, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            tensors[f"{index}.{key}"] = torch.as_tensor(value).clone()
    return tensors, state_dict["param_groups"]


def unflatten_optimizer(tensors: dict, groups: list) -> dict:
    state: dict = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": groups}
