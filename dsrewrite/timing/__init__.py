"""Measuring: interleaved side-by-side timing (``measure``), the runtimes models are timed in (``runtimes``),
layer timers (``layers``) and the whole-model closed loop of ``target_latency`` (``loop``)."""
