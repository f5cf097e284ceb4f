"""LSTM and GRU language models: embedding, multi-layer recurrent core, linear head.

Recurrent state shapes, for a batch of B sessions:
  LSTM: (h, c), each (num_layers, B, hidden_size)
  GRU:  h, (num_layers, B, hidden_size)

The prediction for the token at position t comes from the top layer's hidden
state after t tokens. At position 0 that state is all zeros, so the first token
of a session is predicted by head(0); training scores it the same way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

ARCHITECTURES = ("lstm", "gru")

State = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    embedding_size: int
    hidden_size: int
    num_layers: int
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"invalid architecture {self.architecture!r}; expected one of {ARCHITECTURES}"
            )
        for name in ("vocab_size", "embedding_size", "hidden_size", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"invalid {name} {getattr(self, name)}; must be at least 1")

    @property
    def state_tensors(self) -> int:
        """Number of (num_layers, hidden_size) tensors per session: 2 for LSTM (h, c), 1 for GRU."""
        return 2 if self.architecture == "lstm" else 1

    def to_dict(self) -> dict:
        return asdict(self)


class RecurrentLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        rnn_class = nn.LSTM if config.architecture == "lstm" else nn.GRU
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_size)
        self.rnn = rnn_class(
            config.embedding_size,
            config.hidden_size,
            num_layers=config.num_layers,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
            batch_first=True,
        )
        self.head = nn.Linear(config.hidden_size, config.vocab_size)

    def initial_state(self, batch_size: int, device=None, dtype=torch.float32) -> State:
        shape = (self.config.num_layers, batch_size, self.config.hidden_size)
        return tuple(
            torch.zeros(shape, device=device, dtype=dtype) for _ in range(self.config.state_tensors)
        )

    def _rnn_state(self, state: State):
        return state if self.config.architecture == "lstm" else state[0]

    def _as_state(self, rnn_state) -> State:
        return tuple(rnn_state) if self.config.architecture == "lstm" else (rnn_state,)

    def forward(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Run tokens (B, T) from state; return logits (B, T, V) and the new state.

        logits[:, t] is the distribution of tokens[:, t] given the tokens before
        it, so logits[:, 0] comes from the incoming state.
        """
        hidden, new_state = self.run(tokens, state)
        return self.head(hidden), new_state

    def run(
        self, tokens: torch.Tensor, state: State, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, State]:
        """Return the top-layer hidden state before each input position (B, T, H) and the new state.

        With lengths (B,, int64 on the CPU), tokens are right-padded: rows past a
        sequence's length are padding, and the new state is taken at each
        sequence's own length, so padding never advances a session.
        """
        embedded = self.embedding(tokens)  # (B, T, E)
        if lengths is None:
            outputs, new_state = self.rnn(embedded, self._rnn_state(state))  # (B, T, H)
        else:
            packed = pack_padded_sequence(embedded, lengths, batch_first=True, enforce_sorted=False)
            outputs, new_state = self.rnn(packed, self._rnn_state(state))
            outputs, _ = pad_packed_sequence(outputs, batch_first=True, total_length=tokens.shape[1])
        top = state[0][-1].unsqueeze(1)  # (B, 1, H): top-layer h before the first token
        hidden = torch.cat([top, outputs[:, :-1]], dim=1)  # (B, T, H)
        return hidden, self._as_state(new_state)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
