"""A tqdm progress bar for the builds, as the ``progress=`` callback they take."""

from typing import Any, Optional


class progress_bar:
    """A ``progress=`` callback for :meth:`Database.build` (``(stage, done, total)``: one bar per
    stage) and :meth:`Dataset.build` (``(done, total)``: one bar) that draws tqdm bars. Keyword
    arguments go to each ``tqdm`` (``file=``, ``leave=``, ``disable=``...). Needs ``tqdm``
    (``pip install tqdm``); close it, or use it in a ``with`` block, to close the last bar::

        with retro_rs.progress_bar() as bar:
            db = retro_rs.Database.build("corpus.jsonl", "db", tokenizer="char", progress=bar)
    """

    def __init__(self, desc: Optional[str] = None, **tqdm_kwargs: Any) -> None:
        try:
            from tqdm.auto import tqdm
        except ImportError as e:
            raise ImportError("retro_rs.progress_bar needs tqdm: pip install tqdm") from e
        self._tqdm = tqdm
        self._desc = desc
        self._kwargs = tqdm_kwargs
        self._bar = None
        self._stage: Optional[str] = None

    def __call__(self, *args: Any) -> None:
        if len(args) == 3:
            stage, done, total = args
        else:
            (done, total), stage = args, self._desc
        if self._bar is None or stage != self._stage:
            self.close()
            self._stage = stage
            self._bar = self._tqdm(total=total, desc=stage, **self._kwargs)
        if total != self._bar.total:
            self._bar.total = total
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        """Closes the current bar (the builds do not say when they end)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "progress_bar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
