"""Imported first by every deltavault entry point, before torch loads: process-wide
defaults for the libraries beneath us. An explicit setting in the environment wins. The SDK
itself never sets them: importing ``clients`` into someone's training process leaves their
threads and memory alone.

- ``OMP_WAIT_POLICY=PASSIVE``: OpenMP threads spin while they wait for work by default. On
  a small machine shared with another job (a compressor beside its store, a benchmark
  beside a build), spinning threads starve each other: a 2-core fine-tune step went from
  0.6 s to 8 s, a DeltaDQ run from about a minute to over twelve. Idle threads now sleep;
  results are bit-identical.
- ``THP_MEM_ALLOC_ENABLE=1``: torch backs CPU tensors of 2 MiB and more with transparent
  huge pages (where the kernel allows them, e.g. ``madvise`` mode). Every tensor a stream
  assembles is fresh memory: filling a new 64 MiB buffer took ~60 ms when first touched
  4 KiB at a time, ~18 ms with huge pages (ad hoc, on the 2-core dev machine; end to end
  the compressor benchmark's run-to-run noise is larger than the difference).
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
