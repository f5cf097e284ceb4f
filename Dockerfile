# syntax=docker/dockerfile:1
#
# The rnnstream server with the bundled models.
#
#   docker build -t rnnstream:cpu .                              # CPU build of torch (default)
#   docker build -t rnnstream:cuda --build-arg VARIANT=cuda .    # CUDA build of torch
#
# Configure the server with RNNSTREAM_* variables (rnnstream serve --help lists
# them), for example RNNSTREAM_REDIS_URL=redis://redis:6379/0.

ARG VARIANT=cpu
ARG CPU_BASE_IMAGE=python:3.12-slim-bookworm
# torch's CUDA wheels carry their own CUDA libraries (cuBLAS, cuDNN), so the
# smaller "base" flavour of the CUDA image is enough. It contributes the CUDA
# runtime and the variables that the NVIDIA container toolkit reads.
ARG CUDA_BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

FROM ${CPU_BASE_IMAGE} AS base-cpu

FROM ${CUDA_BASE_IMAGE} AS base-cuda
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

# Build stage: a virtual environment with torch, the project and its dependencies.
FROM base-${VARIANT} AS build
ARG VARIANT
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/rnnstream
ENV PATH=/opt/rnnstream/bin:$PATH
# torch first, so that the project's "torch" requirement is already met when
# pip installs it. PyPI's Linux x86-64 wheel is the CUDA build; the CPU build
# comes from PyTorch's own index.
RUN if [ "$VARIANT" = cpu ]; then \
        pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu; \
    else \
        pip install "torch==${TORCH_VERSION}"; \
    fi
COPY pyproject.toml README.md /src/
COPY server /src/server
COPY client /src/client
RUN pip install /src \
    && chmod -R a+rX /opt/rnnstream

# Runtime stage: the virtual environment on a clean base, run by an unprivileged user.
FROM base-${VARIANT}
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/rnnstream rnnstream
COPY --from=build /opt/rnnstream /opt/rnnstream
ENV PATH=/opt/rnnstream/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    RNNSTREAM_HOST=0.0.0.0 \
    RNNSTREAM_PORT=50051
USER rnnstream
WORKDIR /home/rnnstream
EXPOSE 50051 9100
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD rnnstream health --target "127.0.0.1:${RNNSTREAM_PORT}" --timeout 4
ENTRYPOINT ["rnnstream"]
CMD ["serve"]
