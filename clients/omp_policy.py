"""Imported first by every deltavault entry point, before torch loads OpenMP.

OpenMP threads spin while they wait for work by default. On a small machine shared with
another job (a compressor beside its store, a benchmark beside a build), spinning threads
starve each other: a 2-core fine-tune step went from 0.6 s to 8 s, a DeltaDQ run from about
a minute to over twelve. With ``OMP_WAIT_POLICY=PASSIVE`` idle threads sleep; results are
bit-identical. An explicit setting in the environment wins. The SDK itself never sets it:
importing ``clients`` into someone's training process leaves their threads alone.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
