"""Data: the article store, window index arithmetic, splits and loaders."""

from lvm.data.store import ArticleStore, WindowSpec, Windows

__all__ = ["ArticleStore", "WindowSpec", "Windows"]
