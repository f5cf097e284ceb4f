"""Batched model steps on one device.

The runner takes B sessions' packed states and input tokens, runs one forward
pass, and returns per-session results. Inputs of different lengths are packed,
so padding never advances a session.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.bundle import Bundle
from ..state.codec import stack_states, state_nbytes, state_shape


@dataclass
class StepOutput:
    input_logprobs: list[float]  # log P(token_t | tokens before t), one per input token
    next_logprobs: torch.Tensor  # (V,) float32 on the CPU: the distribution of the next token
    state: bytes  # packed new state


def resolve_device(name: str) -> torch.device:
    """Map "auto", "cpu", "cuda" or "cuda:N" to a torch device, failing if CUDA is asked for but absent."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"invalid device {name!r}; expected auto, cpu, cuda or cuda:N") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA devices exist")
        device = torch.device("cuda", index)
    elif device.type != "cpu":
        raise ValueError(f"invalid device {name!r}; expected auto, cpu, cuda or cuda:N")
    return device


class ModelRunner:
    def __init__(self, bundle: Bundle, device: torch.device) -> None:
        self.bundle = bundle
        self.device = device
        self.model = bundle.model.to(device).eval()
        config = bundle.config
        self.state_shape = state_shape(config.state_tensors, config.num_layers, config.hidden_size)
        self.state_nbytes = state_nbytes(self.state_shape)
        with torch.inference_mode():
            # Prediction for a session's first token: the head applied to the zero state.
            zero_top = torch.zeros((1, config.hidden_size), device=device)
            self.initial_logprobs = torch.log_softmax(self.model.head(zero_top).float(), dim=-1)[0].cpu()

    @torch.inference_mode()
    def peek(self, states: list[bytes]) -> torch.Tensor:
        """Return the next-token log-probs (B, V) on the CPU for B states, without advancing them."""
        state = stack_states(states, self.state_shape, self.device)
        return torch.log_softmax(self.model.head(state[0][-1]).float(), dim=-1).cpu()

    @torch.inference_mode()
    def step(self, token_lists: list[list[int]], states: list[bytes]) -> list[StepOutput]:
        """Advance B sessions by their tokens in one forward pass; results come in input order."""
        batch = len(token_lists)
        lengths = [len(tokens) for tokens in token_lists]
        longest = max(lengths)
        # One tensor from a nested list: a tensor per row cost ~5 µs each, 0.35 ms at batch 64 (2-core EPYC).
        padded = torch.tensor(
            [tokens + [0] * (longest - len(tokens)) for tokens in token_lists], dtype=torch.long
        )  # (B, T), right-padded with 0
        tokens = padded.to(self.device, non_blocking=True)
        state = stack_states(states, self.state_shape, self.device)  # S x (L, B, H)

        same_length = all(length == longest for length in lengths)
        lengths_tensor = None if same_length else torch.as_tensor(lengths, dtype=torch.long)
        hidden, new_state = self.model.run(tokens, state, lengths_tensor)  # (B, T, H)

        model = self.model
        input_logprobs = torch.log_softmax(model.head(hidden).float(), dim=-1)  # (B, T, V)
        input_logprobs = input_logprobs.gather(2, tokens.unsqueeze(2)).squeeze(2)  # (B, T)
        next_logprobs = torch.log_softmax(model.head(new_state[0][-1]).float(), dim=-1)  # (B, V)

        # One device-to-host copy per batch (on CUDA, the batch's only synchronisation):
        # each row is [next-token log-probs (V) | packed new state (S*L*H) | input log-probs (T)].
        state_rows = torch.stack(new_state).permute(2, 0, 1, 3).reshape(batch, -1)  # (B, S, L, H) -> (B, S*L*H)
        packed = torch.cat([next_logprobs, state_rows.float(), input_logprobs], dim=1).cpu()
        vocab, state_size = next_logprobs.shape[1], state_rows.shape[1]
        state_bytes = packed[:, vocab : vocab + state_size].contiguous().numpy().tobytes()
        input_rows = packed[:, vocab + state_size :].double().tolist()
        row_bytes = state_size * 4
        return [
            StepOutput(
                input_logprobs=input_rows[row][: lengths[row]],
                next_logprobs=packed[row, :vocab],
                state=state_bytes[row * row_bytes : (row + 1) * row_bytes],
            )
            for row in range(batch)
        ]
