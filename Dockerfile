# syntax=docker/dockerfile:1
# CareCanvas image, CPU or CUDA from one file (see docker-bake.hcl and docs/operations.md "Images"):
#   docker build -t registry.example.org/carecanvas/carecanvas:0.1.0 .                              # CPU (API)
#   docker build --build-arg TORCH_VARIANT=cu128 -t registry.example.org/carecanvas/carecanvas:0.1.0-cuda .
# The chart runs the API from <tag> and the GPU workers from <tag>-cuda (image.workerTagSuffix).
# Runs as uid/gid 10001 with a read-only root filesystem: everything it writes goes to /tmp, the data dir
# and the audit checkpoint mount, which the chart mounts as volumes.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# cpu, or the PyTorch wheel index of a CUDA build of the pinned torch (e.g. cu128).
ARG TORCH_VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
RUN python -m venv /opt/venv
# torch first, from the index of the chosen variant, at the version pyproject.toml pins; the rest from PyPI.
COPY pyproject.toml README.md ./
RUN TORCH_PIN="$(sed -n 's/^ *"\(torch==[^"]*\)",*$/\1/p' pyproject.toml)" \
    && test -n "${TORCH_PIN}" \
    && /opt/venv/bin/pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" "${TORCH_PIN}"
COPY service ./service
COPY fhir_adapters ./fhir_adapters
COPY sandbox ./sandbox
COPY templates ./templates
# Editable: the service finds templates/ next to its packages (service.services.PROJECT_ROOT is /app).
RUN /opt/venv/bin/pip install --editable . \
    && /opt/venv/bin/python -m compileall -q /app /opt/venv/lib

FROM ${PYTHON_IMAGE} AS runtime
ARG TORCH_VARIANT=cpu
LABEL org.opencontainers.image.title="CareCanvas" \
      org.opencontainers.image.description="SMART-on-FHIR patient-education illustrations (torch ${TORCH_VARIANT})" \
      org.opencontainers.image.source="https://github.com/carecanvas/carecanvas"
# Fonts for the handout PDF in every supported language (Latin, Arabic, CJK).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends fonts-dejavu-core fonts-noto-core fonts-noto-cjk \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid 10001 carecanvas \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin carecanvas \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/carecanvas/data /var/lib/carecanvas/audit-checkpoints
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
# Nothing writes below / at run time: caches and HOME point at /tmp (an emptyDir in the chart), bytecode was
# compiled at build time, and Hugging Face never reaches the network.
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/huggingface \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    TRITON_CACHE_DIR=/tmp/triton \
    MPLCONFIGDIR=/tmp/matplotlib \
    CARECANVAS_DATA_DIR=/var/lib/carecanvas/data
WORKDIR /app
USER 10001:10001
EXPOSE 8000 9100
ENTRYPOINT ["carecanvas"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
