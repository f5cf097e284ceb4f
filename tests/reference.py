"""Offline reference: a whole sequence through the plain torch modules of a bundle, no server."""

from __future__ import annotations

import torch

from rnnstream.models.network import RecurrentLM


@torch.inference_mode()
def reference_logprobs(model: RecurrentLM, tokens: list[int]) -> tuple[list[float], torch.Tensor]:
    """Return log P(token_t | tokens before t) for every t, and the next-token log-probs (V,) after all of them.

    Uses torch.nn.LSTM/GRU with its own zero initial state; the first token is
    predicted from the zero top-layer state, as the server does.
    """
    x = torch.tensor([tokens])
    outputs, _ = model.rnn(model.embedding(x))  # (1, T, H)
    before = torch.cat([torch.zeros_like(outputs[:, :1]), outputs[:, :-1]], dim=1)
    logprobs = torch.log_softmax(model.head(before), dim=-1)[0]  # (T, V)
    input_logprobs = logprobs.gather(1, x[0].unsqueeze(1)).squeeze(1).double().tolist()
    next_logprobs = torch.log_softmax(model.head(outputs[0, -1]), dim=-1).double()
    return input_logprobs, next_logprobs


def assert_predictions_close(actual, expected, tolerance: float = 1e-5) -> None:
    """Assert two lists of TokenPrediction name the same tokens with log-probs within tolerance."""
    assert [item.token_id for item in actual] == [item.token_id for item in expected]
    for got, want in zip(actual, expected):
        assert abs(got.logprob - want.logprob) <= tolerance, (got, want)
