"""What a result was made with: the model, the data, the prompt, the versions and the command.
Sweeps put it in summary.json (and their fingerprints stand on it); training runs in config.json."""

import hashlib
import json
import platform
import sys
from dataclasses import asdict

from . import __version__


def sha(obj) -> str:
    """A stable digest of a JSON-able object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def examples_sha(examples) -> str:
    """What the examples say, not how they are grouped: the group was added later, and results
    made on the same examples before then stay valid."""
    return sha([{k: v for k, v in asdict(e).items() if k != "group"} for e in examples])[:16]


def describe(model_id: str, lm, fmt, vocab, dataset: dict, counts: dict, seed: int,
             max_new_tokens: int) -> dict:
    """The record: `dataset` says which data (its spec and digests), `counts` how many examples
    of it under names that say which examples they are."""
    import numpy
    import torch
    import transformers

    device = lm.device
    if device == "cuda":
        device = f"cuda ({torch.cuda.get_device_name()})"
    n_params = sum(p.numel() for p in lm.model.parameters())
    # Embedding tables do lookups, not matmuls: throughput counts 2 x the rest per token.
    embeddings = {id(lm.model.get_input_embeddings().weight)}
    output = lm.model.get_output_embeddings()
    if output is not None:
        embeddings.add(id(output.weight))
    non_embedding = sum(p.numel() for p in lm.model.parameters() if id(p) not in embeddings)
    return {
        "model": {"id": model_id, "class": type(lm.model).__name__, "parameters": n_params,
                  "non_embedding_parameters": non_embedding,
                  "dtype": lm.dtype, "config_sha256": sha(lm.model.config.to_dict())[:16]},
        "dataset": dataset, **counts, "seed": seed,
        "prompt_format": fmt.describe(), "max_new_tokens": max_new_tokens,
        "vocabulary": vocab.stats(), "device": device, "torch_threads": torch.get_num_threads(),
        "versions": {"latentwire": __version__, "python": platform.python_version(),
                     "torch": torch.__version__, "transformers": transformers.__version__,
                     "numpy": numpy.__version__},
        "command": sys.argv,
    }
