"""RETRO's retrieval side, from the Rust crates: a database searched with numpy, the neighbours
of chunks, the ``[batch, chunks, neighbours, len]`` array of a batch of sequences, and the batches
of a precomputed dataset. Errors are :class:`RetroError` with the CLI's message."""

from .progress import progress_bar
from .retro_rs import Database, Dataset, RetroError, Retriever

__all__ = ["Database", "Dataset", "RetroError", "Retriever", "progress_bar"]
