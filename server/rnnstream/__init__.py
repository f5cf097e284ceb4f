"""rnnstream: a gRPC server for LSTM and GRU language models with session state in Redis."""

__version__ = "0.1.0"
