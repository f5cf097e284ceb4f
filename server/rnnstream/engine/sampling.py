"""Next-token sampling: temperature, top-k and nucleus (top-p) filtering on the CPU."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k filter
    top_p: float = 1.0  # 1.0 means no nucleus filter


def sample_token(logprobs: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Draw one token id from log-probabilities (V,) after temperature, top-k and top-p filtering."""
    if params.temperature == 0:
        return int(torch.argmax(logprobs))
    logits = logprobs / params.temperature
    if 0 < params.top_k < logits.numel():
        threshold = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Keep the smallest prefix whose probability reaches top_p: drop a token when
        # the tokens before it already reach top_p.
        drop = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= params.top_p
        logits = logits.scatter(0, order[drop], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
