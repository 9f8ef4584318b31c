"""cellserve: low-latency inference of recurrent neural networks."""

__version__ = "0.1.0"
