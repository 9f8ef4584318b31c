"""HTTP serving: Open Inference Protocol v2, streaming sessions, metrics (and Ray Serve scale-out)."""
