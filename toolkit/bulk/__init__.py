"""Bulk embedding of datasets: ``toolkit embed`` and its Python API.

In-process (the default engine, ``local``) the input is read in record batches (``readers``), embedded
window by window (``rows``: the runtime's length-sorted planner over each window, output back in input
order) and written as Parquet parts of a fixed number of rows, each part renamed into place when complete
and then recorded in ``_progress.json``. A crash or Ctrl-C loses at most the part in flight;
``resume=True`` continues after the last recorded part, and the result is complete and duplicate-free. A
run that fails before recording a part takes back what it made (its progress file, the folders it
created), so the corrected rerun needs no ``overwrite``; files it found stay.

With Ray (``ray_engine``: ``embed_dataset`` and ``--engine ray``) Ray Data reads, distributes and writes;
each actor opens the artifact once and embeds its batches with the same :class:`RowEncoder`, so both
engines produce the same rows.

Needs pyarrow (the ``[bulk]`` extra); Ray is the ``[ray]`` extra.
"""

from toolkit.bulk.local import Summary, embed_files, recorded
from toolkit.bulk.options import SKIPPED_FILE, BulkError, BulkOptions
from toolkit.bulk.ray_engine import embed_dataset, embed_with_ray
from toolkit.bulk.readers import input_files
from toolkit.bulk.rows import RowEncoder

__all__ = ["SKIPPED_FILE", "BulkError", "BulkOptions", "RowEncoder", "Summary", "embed_dataset", "embed_files",
           "embed_with_ray", "input_files", "recorded"]
