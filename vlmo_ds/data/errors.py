"""The error a training loader raises for a data source it cannot train on: every sample it reads is bad (a folder of
corrupt images, the wrong data set's layout). Its message is one line naming the source, what was wrong and the fix;
the training command prints it and exits with status 2, on every rank that meets it (vlmo_ds.data.source_check says
why every data-parallel rank meets it at the same batch)."""
from __future__ import annotations


class DataSourceError(ValueError):
    """A data source without usable samples (one line: the source, the skip kinds with an example, what to do)."""
