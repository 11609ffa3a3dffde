"""A faster lm-eval model backend for multiple-choice scoring: each shared context is encoded once.

lm-eval's ``HFLM`` scores every (context, choice) pair as its own full sequence, so a 4-choice question
runs its question text through the model four times and computes vocabulary logits at every position.
``FastMultipleChoiceLM`` (registered in lm-eval's model registry as ``"llm4all-fast"``) is an ``HFLM``
subclass that only replaces the token-level scoring (``_loglikelihood_tokens``):

1. requests are grouped by their (left-truncated) context tokens: all choices of a question share one;
   choices whose scoring input coincides (one-token choices " A" / " B") share it, as HFLM's logits cache;
2. questions whose contexts share a long token prefix (one MMLU subject's header and few-shot examples)
   form a cluster whose prefix is run once (*prefix pass*); its KV cache (a ``DynamicCache``, rows
   copied per batch) is the past of every question of the cluster;
3. each question is then scored with its context encoded once, in one of two equivalent ways:
   - *packed* (default; sdpa / eager attention): one row per question, ``[context | choice 1 | choice 2
     | ...]`` (each choice without its last token), with a block-causal 4D attention mask (each choice
     sees the whole context and itself, never another choice) and explicit position ids (each choice
     restarts right after the context): one forward per batch of questions, little padding;
   - *cached* (any attention implementation, ``packed=False``): a context pass fills the KV cache, then
     each choice runs as its own row on a copy of its context's cache rows (padded cache slots masked,
     explicit positions), rows of similar length batched together.
   Vocabulary logits are computed only at positions that predict a choice token (a forward pre-hook on
   the output head drops the others), never for the rest of the context.

Everything else is inherited from ``HFLM`` unchanged, so tokenisation is lm-eval's own by construction:
``_encode_pair`` (trailing context spaces moved onto the continuation, context+continuation encoded
together and split at the context boundary), the empty-context prefix token, ``add_bos_token``,
``max_length`` and the left truncation ``(context + continuation)[-(max_length + 1):]``, which is
applied here per request before grouping. The result per request is HFLM's ``(sum of continuation
log-probabilities, is_greedy)``, log-softmax in HFLM's ``softmax_dtype``. ``loglikelihood_rolling`` goes
through the same scoring code; ``generate_until`` is HFLM's.

    lm = FastMultipleChoiceLM(pretrained=model, tokenizer=tok, batch_size=8)   # model may be a PeftModel
    lm_eval.simple_evaluate(model=lm, tasks=[...])
    lm_eval.api.registry.get_model("llm4all-fast")  # the same class, by name
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

Request = tuple[Any, list[int], list[int]]  # ((context, continuation) | None, context ids, continuation ids)


@dataclass
class Question:
    """One distinct (truncated) context and the requests scored against it.

    ``rows`` maps each distinct continuation-pass input (``choice[:-1]``, for choices of two or more
    tokens) to its row; one-token choices (" A" / " B") need no row: the logits at the context's last
    token score them.
    """

    context: tuple[int, ...]
    rows: dict[tuple[int, ...], int] = field(default_factory=dict)
    members: list[tuple[int, list[int], int]] = field(default_factory=list)  # (request index, cont ids, row)


def group_by_context(requests: Sequence[Request], max_length: int) -> list[Question]:
    """Requests grouped by the context HFLM actually conditions on (after its left truncation).

    HFLM feeds ``(ctx + cont)[-(max_length + 1):][:-1]``; the kept context is whatever precedes the
    continuation in that window, so long contexts can differ per choice (a longer choice truncates more).
    """
    groups: dict[tuple[int, ...], Question] = {}
    for i, (_, ctx, cont) in enumerate(requests):
        if not ctx or not cont:
            raise ValueError(f"request {i}: empty context or continuation tokens (lm-eval never sends these)")
        if len(cont) > max_length:
            raise ValueError(f"request {i}: continuation of {len(cont)} tokens exceeds max_length {max_length}")
        window = (ctx + cont)[-(max_length + 1):]
        context = tuple(window[: len(window) - len(cont)])
        q = groups.setdefault(context, Question(context))
        row = q.rows.setdefault(tuple(cont[:-1]), len(q.rows)) if len(cont) > 1 else -1
        q.members.append((i, cont, row))
    return list(groups.values())


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def prefix_clusters(questions: list[Question], min_shared: int) -> list[tuple[tuple[int, ...], list[Question]]]:
    """(shared prefix, questions) clusters: questions whose contexts (minus their last token) share at
    least ``min_shared`` leading tokens, e.g. one MMLU subject's few-shot examples and header. Questions
    sharing less go into one cluster with an empty prefix.
    """
    order = sorted(questions, key=lambda q: q.context)  # lexicographic: shared prefixes become adjacent
    clusters: list[tuple[int, list[Question]]] = []  # (prefix length, members)
    loose: list[Question] = []
    for q in order:
        if clusters:
            plen, members = clusters[-1]
            shared = min(plen, _common_prefix_len(members[0].context[:-1], q.context[:-1]))
            if shared >= min_shared:
                clusters[-1] = (shared, [*members, q])
                continue
            if len(members) == 1:  # a cluster of one shares nothing
                loose.extend(clusters.pop()[1])
        clusters.append((len(q.context) - 1, [q]))
    if clusters and len(clusters[-1][1]) == 1:
        loose.extend(clusters.pop()[1])
    out = [(members[0].context[:plen], members) for plen, members in clusters]
    if loose:
        out.append(((), loose))
    return out


def padding_aware_batches(lengths: Sequence[int], max_rows: int, slack: float = 1.5) -> list[list[int]]:
    """Split rows (indices into ``lengths``, which must be sorted longest first) into batches of at most
    ``max_rows`` whose padded size stays within ``slack`` times their real token count."""
    batches: list[list[int]] = []
    cur: list[int] = []
    real = 0
    for i, n in enumerate(lengths):
        if cur and (len(cur) >= max_rows or lengths[cur[0]] * (len(cur) + 1) > slack * (real + n)):
            batches.append(cur)
            cur, real = [], 0
        cur.append(i)
        real += n
    if cur:
        batches.append(cur)
    return batches


def _select_cache_rows(cache: Any, index: torch.Tensor) -> Any:
    """A new cache whose batch rows are ``cache[index]``; ``cache`` itself stays untouched.

    Cache layers grow by concatenation (new tensors), so a shallow copy of the cache and of each layer
    with its tensors re-indexed is an independent cache for the next pass.
    """
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    new.batch_select_indices(index)
    return new


@contextlib.contextmanager
def _head_only_at(model: torch.nn.Module, keep: torch.Tensor | None) -> Iterator[None]:
    """Run the output head only on the hidden states where the (batch, seq) bool mask ``keep`` is true
    (flattened into one row, row-major), or on no position at all when ``keep`` is None.

    Logit post-processing inside the model (soft-capping, scaling) is elementwise and still applies. The
    model's own ``logits_to_keep`` selects the same positions in every row, which ragged rows cannot use.
    """
    head = model.get_output_embeddings()

    def pick(_module: torch.nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        return ((hidden[:, :0] if keep is None else hidden[keep][None]), *args[1:])

    handle = head.register_forward_pre_hook(pick) if head is not None else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def _kept(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(n kept, vocab) logits: the head hook flattened them already, unless the model never called its
    output head (none known), in which case every position is there to pick from."""
    return logits[0] if logits.shape[:2] != keep.shape else logits[keep]


def _block_causal_mask(ctx_lens: Sequence[int], segments: Sequence[Sequence[int]], width: int,
                       device: torch.device) -> torch.Tensor:
    """(rows, width, width) bool mask of packed rows ``[context | choice 1 | choice 2 | ...]``: context
    tokens attend causally among themselves, each choice to the whole context and causally to itself
    only, so every choice sees what it would see alone after the context. Padding queries see the row's
    first token only (no fully masked query row, hence no NaN from them)."""
    seg = torch.full((len(ctx_lens), width), -1, dtype=torch.long)
    for r, (n_ctx, segs) in enumerate(zip(ctx_lens, segments, strict=True)):
        seg[r, :n_ctx] = 0
        start = n_ctx
        for k, n in enumerate(segs, 1):
            seg[r, start: start + n] = k
            start += n
    seg = seg.to(device)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    q, k = seg[:, :, None], seg[:, None, :]
    mask = causal & (q >= 0) & ((k == 0) | (k == q))
    mask[:, :, 0] |= q[:, :, 0] < 0
    return mask


@register_model("llm4all-fast")
class FastMultipleChoiceLM(HFLM):
    """HFLM with shared-context scoring for loglikelihood requests (see the module docstring).

    Args beyond HFLM's:
        batch_size: questions (distinct contexts) per forward pass (HFLM: requests per forward pass).
        packed: pack each question's context and choices into one row with a block-causal attention
            mask (one forward per batch of questions; needs the "sdpa" or "eager" attention). Otherwise a
            context pass fills the KV cache and the choices run as their own rows on copies of it, in
            batches of at most ``cont_batch_size`` rows (default ``4 * batch_size``) of similar length.
        min_shared_prefix: contexts sharing at least this many leading tokens share one prefix pass.
    """

    def __init__(self, pretrained: Any, tokenizer: Any = None, batch_size: int | str = 8,
                 packed: bool = True, cont_batch_size: int | None = None, min_shared_prefix: int = 32,
                 **kwargs: Any) -> None:
        if not str(batch_size).isdigit():
            raise ValueError(f"llm4all-fast needs an integer batch_size, got {batch_size!r} ('auto' is HFLM's)")
        super().__init__(pretrained=pretrained, tokenizer=tokenizer, batch_size=int(batch_size), **kwargs)
        if self.backend != "causal":
            raise ValueError("llm4all-fast scores decoder-only (causal) models only; use 'hf' for seq2seq")
        self.packed = bool(packed)
        self.cont_batch_size = int(cont_batch_size or 4 * self.batch_size)
        self.min_shared_prefix = int(min_shared_prefix)

    @property
    def uses_packing(self) -> bool:
        """Whether the packed path runs: custom 4D masks are honoured by the sdpa and eager attentions,
        and replace the model's own masking, so sliding-window models take the cached path."""
        cfg = self.model.config
        sliding = bool(getattr(cfg, "sliding_window", None)) and getattr(cfg, "use_sliding_window", True) is not False
        return self.packed and cfg._attn_implementation in ("sdpa", "eager") and not sliding

    # -- forward passes -------------------------------------------------------------------------------
    def _forward(self, keep: torch.Tensor | None, **kwargs: Any) -> Any:
        with (torch.no_grad(), _head_only_at(self.model, keep),
              torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                             enabled=self.mixed_precision_dtype is not None)):
            return self.model(**kwargs)

    def _padded(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids and their bool mask of real tokens."""
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        real = torch.zeros((len(seqs), width), dtype=torch.bool)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
            real[r, : len(s)] = True
        return ids.to(self.device), real.to(self.device)

    def _prefix_pass(self, prefix: tuple[int, ...]) -> Any:
        ids = torch.tensor([prefix], dtype=torch.long, device=self.device)
        return self._forward(None, input_ids=ids, use_cache=True).past_key_values

    def _expanded(self, prefix_cache: Any, n: int) -> Any:
        if prefix_cache is None:
            return None
        return _select_cache_rows(prefix_cache, torch.zeros(n, dtype=torch.long, device=self.device))

    def _packed_pass(self, chunk: list[Question], prefix_cache: Any, prefix_len: int):
        """One forward for the chunk: row q = ``[context[prefix_len:] | choice rows of q]`` on the prefix
        cache. Returns (logits at each context's last token, {(q, row): logits after each choice token})."""
        rests = [q.context[prefix_len:] for q in chunk]
        segments = [list(q.rows) for q in chunk]  # dict order = row numbers
        ids, real = self._padded([r + tuple(t for seg in segs for t in seg) for r, segs in zip(rests, segments)])
        n, width = ids.shape
        keep = real.clone()
        for i, r in enumerate(rests):
            keep[i, : len(r) - 1] = False  # context logits are not needed, except at its last token
        mask = _block_causal_mask([len(r) for r in rests], [[len(x) for x in segs] for segs in segments],
                                  width, self.device)
        mask = torch.cat([torch.ones(n, width, prefix_len, dtype=torch.bool, device=self.device), mask], 2)
        mask = mask[:, None]
        if self.model.config._attn_implementation == "eager":  # eager adds the mask to the scores
            dtype = self.model.dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=self.device).masked_fill(~mask, torch.finfo(dtype).min)
        positions = torch.zeros((n, width), dtype=torch.long)
        for i, (r, segs) in enumerate(zip(rests, segments, strict=True)):
            positions[i, : len(r)] = torch.arange(prefix_len, prefix_len + len(r))
            start = len(r)
            for seg in segs:  # each choice continues right after the context, as if alone
                positions[i, start: start + len(seg)] = torch.arange(len(chunk[i].context),
                                                                     len(chunk[i].context) + len(seg))
                start += len(seg)
        out = self._forward(keep, input_ids=ids, attention_mask=mask, position_ids=positions.to(self.device),
                            past_key_values=self._expanded(prefix_cache, n), use_cache=prefix_cache is not None)
        kept = _kept(out.logits, keep).split([1 + sum(len(x) for x in segs) for segs in segments])
        last = torch.cat([k[:1] for k in kept])
        row_logits = {}
        for qi, (k, segs) in enumerate(zip(kept, segments, strict=True)):
            row_logits.update({(qi, r): lg for r, lg in enumerate(k[1:].split([len(x) for x in segs]))})
        return last, row_logits

    def _cached_passes(self, chunk: list[Question], prefix_cache: Any, prefix_len: int):
        """Same result as ``_packed_pass`` through a context pass that fills the KV cache, then the choice
        rows on copies of their context's cache rows (padded cache slots masked, explicit positions)."""
        ids, real = self._padded([q.context[prefix_len:] for q in chunk])
        # right padding needs no mask here: it only follows its row's real tokens, and the default
        # positions continue after the (unpadded) prefix
        last_pos = real & ~torch.cat([real[:, 1:], torch.zeros_like(real[:, :1])], dim=1)
        out = self._forward(last_pos, input_ids=ids, past_key_values=self._expanded(prefix_cache, len(chunk)),
                            use_cache=True)
        cache, last = out.past_key_values, _kept(out.logits, last_pos)
        ctx_lengths = torch.tensor([len(q.context) for q in chunk], device=self.device)
        rows = sorted(((qi, x, r) for qi, q in enumerate(chunk) for x, r in q.rows.items()), key=lambda t: -len(t[1]))
        row_logits = {}
        for batch in padding_aware_batches([len(x) for _, x, _ in rows], self.cont_batch_size):
            part = [rows[i] for i in batch]
            ids, real = self._padded([x for _, x, _ in part])
            owner = torch.tensor([qi for qi, _, _ in part], device=self.device)
            lengths = ctx_lengths[owner]
            past = torch.arange(cache.get_seq_length(), device=self.device)[None, :] < lengths[:, None]
            out = self._forward(real, input_ids=ids, past_key_values=_select_cache_rows(cache, owner),
                                use_cache=True, attention_mask=torch.cat([past, real], dim=1).long(),
                                # each row continues at its own context length, whatever padding its cache rows carry
                                position_ids=lengths[:, None] + torch.arange(ids.shape[1], device=self.device))
            logits = _kept(out.logits, real).split([len(x) for _, x, _ in part])
            row_logits.update({(qi, r): lg for (qi, _, r), lg in zip(part, logits, strict=True)})
        return last, row_logits

    # -- lm-eval entry point --------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bs = int(override_bs or self.batch_size)
        packed = self.uses_packing
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                    desc="Running loglikelihood requests (shared contexts)")
        for prefix, questions in prefix_clusters(group_by_context(requests, self.max_length),
                                                 self.min_shared_prefix):
            prefix_cache = self._prefix_pass(prefix) if prefix else None
            # longest rows first, like HFLM: little padding per batch, memory peaks come first
            questions.sort(key=lambda q: (-len(q.context) - (sum(map(len, q.rows)) if packed else 0), q.context))
            for start in range(0, len(questions), bs):
                chunk = questions[start: start + bs]
                passes = self._packed_pass if packed else self._cached_passes
                last, row_logits = passes(chunk, prefix_cache, len(prefix))
                self._score(chunk, last, row_logits, requests, results)
                pbar.update(sum(len(q.members) for q in chunk))
        pbar.close()
        return results  # type: ignore[return-value]

    def _score(self, chunk: list[Question], last: torch.Tensor, row_logits: dict, requests: list[Request],
               results: list) -> None:
        """HFLM's answer per request: (sum of the choice's token log-probs, whether greedy decoding
        reproduces it), from the logits that predict each of its tokens."""
        for qi, q in enumerate(chunk):
            for req_index, cont, row in q.members:
                # token 0 is predicted at the context's last token, the others at the choice's own tokens
                scored = last[qi: qi + 1] if row < 0 else torch.cat([last[qi: qi + 1], row_logits[qi, row]])
                logp = F.log_softmax(scored, dim=-1, dtype=self.softmax_dtype)
                target = torch.tensor(cont, dtype=torch.long, device=logp.device)
                greedy = bool((logp.argmax(dim=-1) == target).all())
                answer = (float(logp.gather(1, target[:, None]).sum()), greedy)
                results[req_index] = answer
                if requests[req_index][0] is not None:  # loglikelihood_rolling windows carry no string
                    self.cache_hook.add_partial("loglikelihood", requests[req_index][0], answer)
