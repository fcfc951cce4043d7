"""Datasets and file readers."""

from ppl_vae.data import text, timeseries  # noqa: F401  (registers the text and anomaly datasets)
from ppl_vae.data.datasets import BINARIZE, DATASETS, Dataset, Factors, load_dataset
from ppl_vae.data.readers import read_array_file, read_idx

__all__ = ["BINARIZE", "DATASETS", "Dataset", "Factors", "load_dataset", "read_array_file", "read_idx"]
