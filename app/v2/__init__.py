"""The Open Inference Protocol (KServe V2) REST API, so Triton and KServe clients work unchanged.

codec: the wire format (JSON tensors, binary tensor data, compressed bodies).
model: the served model as the protocol describes it (metadata, config, input checks, outputs).
infer: one inference request through the shared micro-batcher.
stats: the statistics extension's counters.
routes: the HTTP routes.
"""
