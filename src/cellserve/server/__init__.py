"""The server: the Open Inference Protocol (KServe v2) over HTTP and gRPC, the model repository, statistics and
metrics, Ray Serve scale-out. One Backend protocol (backend.py) answers both wires; the wires only convert.
Model specifics are the families' (families/); the engine runs them."""
