"""Datasets beyond MIND as a registry (news_data/registry.py); one module per file format."""
from news_data.registry import (NEWS_DATASETS, NewsDataset, corpus_root, dataset_names, get_dataset,  # noqa: F401
                                is_mind)
