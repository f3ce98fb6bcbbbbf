from os import PathLike
from typing import Callable, Optional, Sequence

import numpy as np
import numpy.typing as npt

class RetroError(Exception):
    """An error of the retro crates; the message names the file, field or value at fault."""

class Database:
    """A retrieval database folder (``retro index build``), opened and checked."""

    @staticmethod
    def build(
        corpus: str | PathLike[str],
        out: str | PathLike[str],
        *,
        tokenizer: str,
        embedder: Optional[str | PathLike[str]] = None,
        lexical_dim: Optional[int] = None,
        lexical_features: str = "words",
        chunk_len: int = 64,
        batch_size: int = 256,
        overwrite: bool = False,
        progress: Optional[Callable[[str, int, int], None]] = None,
    ) -> "Database":
        """Builds a database as ``retro index build`` does: ``tokenizer`` is ``"char"`` or a
        tokenizer.json path; keys from ``embedder`` (a BERT model folder) or ``lexical_dim``.
        ``progress(stage, done, total)`` with stage "tokenizing", "embedding", "inserting" or
        "writing". Raises RetroError; a failed build leaves nothing at ``out``. Ctrl-C stops it at
        its next step (KeyboardInterrupt), leaving nothing either (after its last step, the
        complete database stays)."""
    @staticmethod
    def open(path: str | PathLike[str]) -> "Database": ...
    def keys(self) -> npt.NDArray[np.float32]:
        """Every chunk's key [num_chunks, dim] (unit length; row i is chunk i's)."""
    @property
    def chunk_len(self) -> int: ...
    @property
    def dim(self) -> int: ...
    @property
    def num_chunks(self) -> int: ...
    @property
    def num_documents(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def pad_id(self) -> int: ...
    @property
    def id(self) -> str: ...
    def info(self) -> dict: ...
    def search(
        self, queries: npt.NDArray[np.float32], k: int = 2
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """The k nearest chunks of each query [n, dim]: ids [n, k] (-1 where fewer) and distances."""
    def search_texts(
        self, texts: Sequence[str], k: int = 2
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """Embeds texts with the database's own embedder and searches (``retro index query``)."""
    def neighbours(self, chunk_ids: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Chunk + continuation of each chunk id: [n, 2 * chunk_len], padded with pad_id."""
    def documents_of(self, chunk_ids: npt.NDArray[np.int64]) -> list[str]: ...
    def encode(self, text: str) -> npt.NDArray[np.int64]: ...
    def decode(self, tokens: Sequence[int]) -> str: ...

class Retriever:
    """Neighbours for every complete chunk of token sequences, with the database's embedder."""

    def __init__(
        self,
        db: Database,
        k: int = 2,
        embedder: Optional[str | PathLike[str]] = None,
        exclude_documents: Optional[Sequence[str]] = None,
    ) -> None:
        """exclude_documents: ids of documents that never serve as neighbours."""
    def retrieve(
        self, tokens: npt.NDArray[np.int64], documents: Optional[Sequence[str]] = None
    ) -> npt.NDArray[np.int64]:
        """tokens [batch, T] -> [batch, T // chunk_len, k, 2 * chunk_len]; with documents (one id
        per row), a row never retrieves from its own document."""

class Dataset:
    """Training sequences with precomputed neighbours (``retro dataset build``)."""

    @staticmethod
    def build(
        db: Database,
        out: str | PathLike[str],
        *,
        seq_len: int = 512,
        k: int = 2,
        seed: int = 0,
        hold_out_matching: Sequence[str] = (),
        valid_fraction: float = 0.1,
        overwrite: bool = False,
        progress: Optional[Callable[[int, int], None]] = None,
    ) -> "Dataset":
        """Builds a dataset as ``retro dataset build`` does: sequences of ``seq_len`` tokens, each
        chunk's ``k`` neighbours precomputed with the same-document filter."""
    @staticmethod
    def open(path: str | PathLike[str], db: Database) -> "Dataset": ...
    @property
    def id(self) -> str: ...
    def len(self, split_name: str = "train") -> int: ...
    def __len__(self) -> int: ...
    @property
    def held_out_documents(self) -> list[str]: ...
    def batch(self, indices: Sequence[int], split_name: str = "train") -> dict:
        """x and y [batch, seq_len], neighbours [batch, chunks, k, 2 * chunk_len] (int64), and
        documents, the document id of each sequence."""
