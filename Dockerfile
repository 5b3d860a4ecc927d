# deltavault: one image for both services (and the CLI).
#   docker build -t deltavault:0.1.0 .                                    # CPU
#   docker build --build-arg VARIANT=cuda -t deltavault:0.1.0-cuda .      # CUDA
# The helm chart runs `python -m store_svc` or `python -m compressor_svc` in it.
ARG VARIANT=cpu

FROM python:3.11-slim-bookworm AS base-cpu
# torch==2.13.0 on PyPI is the CUDA build; the CPU image takes torch's CPU wheel instead.
ENV PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu

FROM python:3.11-slim-bookworm AS base-cuda
# torch's CUDA wheels bring the CUDA libraries (the node's driver is mounted by the NVIDIA
# container runtime); Triton compiles its launcher with the system C compiler at run time.
# Versions come with the pinned Debian release of the base image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# hadolint ignore=DL3006
FROM base-${VARIANT} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY clients ./clients
COPY compressor_svc ./compressor_svc
COPY store_svc ./store_svc
COPY kernels ./kernels
RUN python -m venv /opt/deltavault \
    && /opt/deltavault/bin/pip install --no-cache-dir torch==2.13.0 \
    && /opt/deltavault/bin/pip install --no-cache-dir .

# hadolint ignore=DL3006
FROM base-${VARIANT}
COPY --from=build /opt/deltavault /opt/deltavault
ENV PATH=/opt/deltavault/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TRITON_CACHE_DIR=/tmp/triton
# A numeric user, so that Kubernetes' runAsNonRoot can check it without a passwd entry.
USER 10001:10001
EXPOSE 50061 50062 9461 9462
ENTRYPOINT ["python", "-m"]
CMD ["store_svc", "--help"]
