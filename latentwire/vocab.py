"""The model's vocabulary as it appears in `inputs_embeds` space: statistics, exact neighbours, codes.

Everything here is computed from the output of the model's input-embedding module over all token
ids, never from the raw weight tensor: some models scale embeddings inside that module, and
statistics of the raw table would then be off by that factor.
"""

import torch
import torch.nn.functional as F

# A similarity block is at most this many float32 values (64 MiB), whatever the vocabulary size
# and the number of query positions: memory stays bounded, and the search stays exact.
BLOCK_ELEMENTS = 1 << 24


class VocabSpace:
    def __init__(self, table: torch.Tensor):
        self.table = table.float()
        self.norms = self.table.norm(dim=1)
        self.mean_rms = self.table.pow(2).mean(dim=1).sqrt().mean()
        self.mean = self.table.mean(dim=0)
        self.std = self.table.std(dim=0)
        self._codebooks: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    @torch.no_grad()
    def from_model(cls, model, n_tokens: int | None = None, chunk: int = 8192) -> "VocabSpace":
        """Embed every token id through the model's own input-embedding module, in chunks.

        n_tokens limits the table to the ids the tokenizer can produce: models often pad their
        embedding matrix with untrained rows that no text ever reaches.
        """
        embed = model.get_input_embeddings()
        weight = embed.weight
        total = weight.shape[0] if n_tokens is None else min(n_tokens, weight.shape[0])
        rows = [embed(torch.arange(i, min(i + chunk, total), device=weight.device)).float()
                for i in range(0, total, chunk)]
        return cls(torch.cat(rows))

    @property
    def size(self) -> int:
        return self.table.shape[0]

    def stats(self) -> dict:
        return {"vocab_size": self.size, "mean_rms": float(self.mean_rms),
                "mean_norm": float(self.norms.mean()), "mean_abs_mean": float(self.mean.abs().mean()),
                "mean_std": float(self.std.mean())}

    @torch.no_grad()
    def topk(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact cosine top-k among vocabulary rows: (similarities [N, k], ids [N, k]), best first.

        Repeated query rows (frequent tokens) are searched once; the search runs over blocks of
        queries x vocabulary rows so that no block exceeds BLOCK_ELEMENTS.
        """
        k = min(k, self.size)
        queries, inverse = torch.unique(x.float(), dim=0, return_inverse=True)
        unit = F.normalize(queries, dim=1)
        n = unit.shape[0]
        q_chunk = max(1, min(n, 1024))
        v_chunk = max(k, BLOCK_ELEMENTS // q_chunk)
        inv_norms = 1.0 / self.norms.clamp_min(1e-12)
        best_sims = torch.empty(n, k, device=x.device)
        best_ids = torch.empty(n, k, dtype=torch.long, device=x.device)
        for qs in range(0, n, q_chunk):
            q = unit[qs:qs + q_chunk]
            sims = ids = None
            for vs in range(0, self.size, v_chunk):
                block = (q @ self.table[vs:vs + v_chunk].T) * inv_norms[vs:vs + v_chunk]
                s, i = block.topk(min(k, block.shape[1]), dim=1)
                i = i + vs
                if sims is not None:
                    s, j = torch.cat([sims, s], dim=1).topk(k, dim=1)
                    i = torch.cat([ids, i], dim=1).gather(1, j)
                sims, ids = s, i
            best_sims[qs:qs + q_chunk], best_ids[qs:qs + q_chunk] = sims, ids
        return best_sims[inverse], best_ids[inverse]

    def _nearest_codes(self, codes: torch.Tensor, chunk: int = 16384):
        """Squared distances [V, 2] and ids [V, 2] of each vocabulary row's two nearest codes."""
        c_sq = codes.pow(2).sum(dim=1)
        dists, ids = [], []
        for s in range(0, self.size, chunk):
            rows = self.table[s:s + chunk]
            d2 = rows.pow(2).sum(dim=1, keepdim=True) - 2 * rows @ codes.T + c_sq
            d, i = d2.topk(min(2, codes.shape[0]), dim=1, largest=False)
            dists.append(d.clamp_min(0))
            ids.append(i)
        return torch.cat(dists), torch.cat(ids)

    @torch.no_grad()
    def codebook(self, size: int, seed: int = 0, iterations: int = 10):
        """`size` codes from seeded k-means over the vocabulary, and the temperature scale of soft
        assignment: the median gap between a row's squared distances to its nearest and its
        second-nearest code. Measured so, tau = 1 weighs the second code about 1/e of the first
        for a typical row: a handful of codes share the weight. (The mean quantisation error, a
        looser scale, gave near-uniform weights over hundreds of codes.) Cached per (size, seed).
        """
        # Ten Lloyd iterations: on SmolLM2 the quantisation error is 4.822 after 10 and 4.810
        # after 40, while each iteration costs a full pass over the vocabulary.
        key = (size, seed)
        if key not in self._codebooks:
            gen = torch.Generator().manual_seed(seed)
            start = torch.randperm(self.size, generator=gen)[:size].to(self.table.device)
            codes = self.table[start].clone()
            for _ in range(iterations):
                _, nearest = self._nearest_codes(codes)
                assign = nearest[:, 0]
                sums = torch.zeros_like(codes).index_add_(0, assign, self.table)
                counts = torch.bincount(assign, minlength=size).unsqueeze(1)
                # An empty cluster keeps its code rather than collapsing to zero.
                codes = torch.where(counts > 0, sums / counts.clamp_min(1), codes)
            d2, _ = self._nearest_codes(codes)
            margin = (d2[:, 1] - d2[:, 0]).median() if size > 1 else d2[:, 0].mean()
            self._codebooks[key] = (codes, margin.clamp_min(1e-12))
        return self._codebooks[key]


def shared_tokens(source_tokenizer, target_tokenizer, source_size: int,
                  target_size: int) -> tuple[list[int], list[int]]:
    """(source ids, target ids) of the token strings both vocabularies hold, special tokens
    aside: byte-level BPE vocabularies (Llama 3's, Qwen's, SmolLM2's) spell a token by its
    bytes the same way, so a shared string is the same piece of text to both."""
    special = set(source_tokenizer.all_special_tokens) | set(target_tokenizer.all_special_tokens)
    theirs = target_tokenizer.get_vocab()
    pairs = sorted((i, theirs[s]) for s, i in source_tokenizer.get_vocab().items()
                   if s in theirs and s not in special and i < source_size
                   and theirs[s] < target_size)
    return [a for a, _ in pairs], [b for _, b in pairs]


@torch.no_grad()
def translation(source: VocabSpace, target: VocabSpace, source_ids: list[int],
                target_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [d_target, d_source], b [d_target]): the affine map that takes the source model's
    embedding of each shared token nearest, in least squares, to the target model's embedding
    of the same token: how a latent made of one model's tokens starts out readable by another."""
    x = source.table[source_ids].double()
    x = torch.cat([x, x.new_ones(len(x), 1)], 1)
    solution = torch.linalg.lstsq(x, target.table[target_ids].double()).solution
    return solution[:-1].T.float().contiguous(), solution[-1].float()


@torch.no_grad()
def token_anchors(source_tokenizer, target_tokenizer, target: VocabSpace,
                  source_size: int) -> torch.Tensor:
    """[source_size, d_target]: each source token as the target model embeds it: the target's
    own embedding of the same token string where both vocabularies hold it (`shared_tokens`),
    else the mean of its embeddings of its own tokens of that token's text (the vocabulary's
    mean for a token with no text of its own, such as a special token)."""
    out = target.mean.repeat(source_size, 1)
    alike, theirs = shared_tokens(source_tokenizer, target_tokenizer, source_size, target.size)
    out[alike] = target.table[theirs]
    special, done = set(source_tokenizer.all_special_tokens), set(alike)
    for piece, i in source_tokenizer.get_vocab().items():
        if i >= source_size or piece in special or i in done:
            continue
        text = source_tokenizer.convert_tokens_to_string([piece])
        ids = [t for t in target_tokenizer(text, add_special_tokens=False).input_ids
               if t < target.size]
        if ids:
            out[i] = target.table[ids].mean(0)
    return out
