"""The training data path: the article store, window index arithmetic, splits, loaders, the epoch sampler and the synthetic corpus."""

from lvm.data.store import ArticleStore, Windows, WindowSpec

__all__ = ["ArticleStore", "WindowSpec", "Windows"]
