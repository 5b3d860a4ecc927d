"""Triton kernels for every numeric format of ``kernels.reference``.

They run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests
check them against the reference). :mod:`kernels.dispatch` picks between the two.

- :mod:`.codes`: quantize, pack, unpack and dequantize group-wise codes.
- :mod:`.lowrank`, :mod:`.signs`, :mod:`.sparse`: the delta products of the low-rank
  (ADAMIX, Delta-CoMe), sign (BitDelta) and sparse-quantized (DARE, DeltaDQ) formats, for
  one or several deltas per launch.
"""
