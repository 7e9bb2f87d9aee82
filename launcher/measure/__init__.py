"""Measure: llama.cpp itself sizes a configuration, before anything is downloaded or allocated.

- `dryrun`: llama.cpp (llama-cpp-python) in a worker subprocess loads a GGUF with `no_alloc` and reports
  every buffer it would allocate (weights, KV cache, recurrent state, compute, output) per device.
- `confirm`: runs dry runs of a plan's options, on the real file or on a sparse copy of its header, and
  returns the measured bytes per device for each (keyed by launcher.plan.MeasureKey).

Nothing here starts a server: launching is launcher.backends' job.
"""
