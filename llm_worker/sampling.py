"""Sampling on the device: penalties, temperature, top-k / top-p / min-p, seeds, logprobs.

The batch's parameters go to the device once per step, as one table in a persistent buffer, so
every rule is one vectorised op over the whole batch instead of a Python loop over requests, and
an all-greedy step (the common case) does nothing but the argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from protocol.messages import Sampling, TokenLogprobs

_GREEDY_EPS = 1e-5


@dataclass
class SamplingRow:
    """What the sampler needs of one request this step."""

    params: Sampling
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator | None  # set when the request has a seed
    # Ids that may not be sampled this step (EOS and stop ids before min_tokens is reached).
    blocked_ids: tuple[int, ...] = ()


# Rows of the per-step parameter table (one column per sampled request).
_TEMP, _TOP_K, _TOP_P, _MIN_P, _REP, _FREQ, _PRES, _GREEDY = range(8)


def _is_plain_greedy(p: Sampling) -> bool:
    """Greedy with no penalty: the step needs no parameter table."""
    return (p.temperature < _GREEDY_EPS and p.repetition_penalty == 1.0
            and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0)


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device, max_num_seqs: int = 256):
        self.vocab_size = vocab_size
        self.device = device
        # The batch's parameters go up as one [8, N] table: a pinned staging buffer and a fixed
        # device mirror, one async copy per step that needs them (all-greedy steps need none).
        # Two staging buffers, used in turn: under asynchronous scheduling the next step's table
        # is written while this step's copy may still wait in the stream.
        pin = device.type == "cuda"
        self._hosts = [torch.zeros(8, max_num_seqs, dtype=torch.float32, pin_memory=pin)
                       for _ in range(2)]
        self._table = torch.zeros(8, max_num_seqs, dtype=torch.float32, device=device)
        self._n = 0

    def _upload(self, rows: list[SamplingRow]) -> None:
        """Fill and upload the parameter table for these rows."""
        n = self._n = len(rows)
        self._hosts.reverse()
        host = self._hosts[0]
        if n > host.shape[1]:  # more rows than sequences: grow once (never on a hot path)
            self._hosts = [torch.zeros(8, n, dtype=torch.float32, pin_memory=host.is_pinned())
                           for _ in range(2)]
            host = self._hosts[0]
            self._table = torch.zeros(8, n, dtype=torch.float32, device=self.device)
        t, v = host.numpy(), self.vocab_size
        for i, r in enumerate(rows):
            p = r.params
            greedy = p.temperature < _GREEDY_EPS
            t[:, i] = (1.0 if greedy else p.temperature, p.top_k if 0 < p.top_k < v else v,
                       p.top_p, p.min_p, p.repetition_penalty, p.frequency_penalty,
                       p.presence_penalty, greedy)
        self._table[:, :n].copy_(host[:, :n], non_blocking=host.is_pinned())

    def _col(self, field: int) -> torch.Tensor:
        """[N, 1] column of this step's parameter table on the device."""
        return self._table[field, : self._n].unsqueeze(1)

    def __call__(
        self, logits: torch.Tensor, rows: list[SamplingRow]
    ) -> tuple[list[int], list[TokenLogprobs | None]]:
        """The sampled ids on the host (waits for the device) and each row's logprobs."""
        tokens, lps = self.sample(logits, rows)
        return tokens.tolist(), lps

    def sample(
        self, logits: torch.Tensor, rows: list[SamplingRow]
    ) -> tuple[torch.Tensor, list[TokenLogprobs | None]]:
        """The sampled ids as a device tensor [N] (nothing waits for them unless a row asks for
        logprobs, which are read on the host) and each row's logprobs."""
        # logits: [N, vocab] float32, one row per request that samples this step
        logits = logits[:, : self.vocab_size].float()
        if not all(_is_plain_greedy(r.params) for r in rows):
            self._upload(rows)
        raw_logprobs = None
        if any(r.params.logprobs is not None for r in rows):
            # OpenAI semantics: logprobs of the model's distribution, before sampling transforms.
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        logits = self._apply_penalties(logits, rows)
        logits = self._block(logits, rows)
        tokens = self._sample(logits, rows)
        lps: list[TokenLogprobs | None] = [None] * len(rows)
        if raw_logprobs is not None:
            lps = self._logprobs(raw_logprobs, tokens, rows)
        return tokens, lps

    def _apply_penalties(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        p = [r.params for r in rows]
        if all(
            x.repetition_penalty == 1.0 and x.presence_penalty == 0.0 and x.frequency_penalty == 0.0
            for x in p
        ):
            return logits
        n, v = logits.shape
        counts = torch.zeros(n, v, device=logits.device)  # [N, vocab] output-token counts
        seen = torch.zeros(n, v, dtype=torch.bool, device=logits.device)  # prompt or output
        for i, r in enumerate(rows):
            if r.output_ids:
                ids = torch.tensor(r.output_ids, device=logits.device)
                counts[i].index_add_(0, ids, torch.ones(len(ids), device=logits.device))
            if r.params.repetition_penalty != 1.0 and r.prompt_ids:
                ids = torch.tensor(r.prompt_ids, device=logits.device)
                seen[i, ids[ids < v]] = True  # a media placeholder id may lie past the vocab
        seen |= counts > 0
        rep = self._col(_REP)
        # HF/vLLM rule: divide positive logits, multiply negative ones, for tokens already seen.
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalised, logits)
        logits = logits - self._col(_FREQ) * counts
        logits = logits - self._col(_PRES) * (counts > 0).float()
        return logits

    def _block(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """-inf for each row's blocked ids, in one indexed write (no per-row kernels)."""
        pairs = [(i, t) for i, r in enumerate(rows) for t in r.blocked_ids
                 if 0 <= t < self.vocab_size]
        if not pairs:
            return logits
        idx = torch.tensor(pairs, device=logits.device).T  # [2, num_blocked]
        logits[idx[0], idx[1]] = float("-inf")
        return logits

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        greedy_tokens = logits.argmax(dim=-1)
        if all(r.params.temperature < _GREEDY_EPS for r in rows):
            return greedy_tokens
        logits = logits / self._col(_TEMP)  # greedy rows divide by 1 and are replaced below
        v = logits.shape[1]
        if any(0 < r.params.top_k < v for r in rows):
            k = self._table[_TOP_K, : self._n].long()  # off = vocab: keeps every token
            kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1).unsqueeze(1))
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(dim=-1)
        if any(r.params.min_p > 0 for r in rows):
            floor = self._col(_MIN_P) * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < floor, 0.0)
        if any(r.params.top_p < 1.0 for r in rows):
            sorted_p, idx = probs.sort(dim=-1, descending=True)
            # Drop a token when the mass strictly before it already reaches top_p.
            drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= self._col(_TOP_P)
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(1, idx, sorted_p)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p without a CDF search.
        noise = torch.empty_like(probs).exponential_()
        for i, r in enumerate(rows):
            if r.generator is not None:
                noise[i].exponential_(generator=r.generator)
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(self._table[_GREEDY, : self._n] > 0, greedy_tokens, sampled)

    def _logprobs(
        self, logprobs: torch.Tensor, tokens: torch.Tensor, rows: list[SamplingRow]
    ) -> list[TokenLogprobs | None]:
        k_max = max(r.params.logprobs or 0 for r in rows)
        chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)  # [N]
        ranks = (logprobs > chosen.unsqueeze(1)).sum(dim=1) + 1  # [N]
        top_v, top_i = logprobs.topk(k_max, dim=-1) if k_max else (None, None)
        chosen_l, ranks_l, tok_l = chosen.tolist(), ranks.tolist(), tokens.tolist()
        top_vl = top_v.tolist() if top_v is not None else None
        top_il = top_i.tolist() if top_i is not None else None
        out: list[TokenLogprobs | None] = []
        for i, r in enumerate(rows):
            k = r.params.logprobs
            if k is None:
                out.append(None)
                continue
            ids = [tok_l[i]] + (top_il[i][:k] if k else [])
            vals = [chosen_l[i]] + (top_vl[i][:k] if k else [])
            out.append(TokenLogprobs(token_ids=ids, logprobs=vals, ranks=[ranks_l[i]]))
        return out
