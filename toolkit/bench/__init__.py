"""``toolkit bench``: in-process throughput side by side with sentence-transformers (``text``), the image tower
against transformers (``images``), or a server under load (``server``); ``report`` prints and plots."""

from toolkit.bench.images import bench_images, synthetic_photos
from toolkit.bench.machine import machine_info
from toolkit.bench.report import plot_result, print_result
from toolkit.bench.server import bench_server
from toolkit.bench.text import bench_inprocess

__all__ = ["bench_images", "bench_inprocess", "bench_server", "machine_info", "plot_result", "print_result",
           "synthetic_photos"]
