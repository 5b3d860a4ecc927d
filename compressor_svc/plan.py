"""Plan: a dry run. Per lossy tensor, the exact size and error each method would give at
each target ratio, so a user can choose before spending the compute of a real run.

Nothing is stored. A method that cannot reach a ratio for a tensor says why in
``unavailable`` instead of failing the whole plan.
"""

from __future__ import annotations

from clients._generated.deltavault.compressor.v1 import compressor_pb2
from compressor_svc.methods import compress
from compressor_svc.pipeline import TensorInput, check_inputs, delta_of, error_stats
from compressor_svc.requests import PlanSpec
from kernels.reference import decode


def plan_tensor(item: TensorInput, spec: PlanSpec) -> compressor_pb2.PlanResponse | None:
    """Estimates for one tensor, or None when it would not be compressed lossy."""
    zero, _ = check_inputs(item)
    if zero or not spec.selector.is_lossy(item.name, item.shape):
        return None
    delta = delta_of(item)
    response = compressor_pb2.PlanResponse(name=item.name, shape=list(delta.shape))
    for method, options in spec.methods.items():
        for ratio in spec.ratios:
            estimate = response.estimates.add(method=method, target_ratio=ratio)
            try:
                encoded = compress(delta, method, ratio=ratio, gram=item.gram, **options)
            except ValueError as exc:
                estimate.unavailable = str(exc)
                continue
            estimate.ratio, estimate.nbits = encoded.ratio, encoded.nbits
            estimate.error.CopyFrom(error_stats(delta, decode(encoded), item.gram))
    return response
