# One image for every role of a split model: `split-server` (second part + loss), `split-client` (first part +
# data), `split-aggregator` (the rounds of multi-client training), and a vertical split's `split-label-party` and
# `split-feature-party`; docker-compose.yml runs one server and one client, docker-compose.multi.yml a server, an
# aggregator and three clients, docker-compose.vertical.yml a label party and two feature parties. CPU TensorFlow
# by default; for the GPU image:
#
#   docker build --build-arg TF_EXTRA=gpu -t splitlearning:gpu .
#
# TF_EXTRA names the pyproject.toml extra that brings TensorFlow: `cpu` (tensorflow-cpu, the default) or `gpu`
# (tensorflow[and-cuda]: CUDA and cuDNN come as pip wheels, the host needs only the NVIDIA driver and the
# NVIDIA Container Toolkit).
#
# Behind a proxy that presents its own certificate authority, or with a package index of your own (BuildKit,
# i.e. `docker build` of Docker 23+, or DOCKER_BUILDKIT=1):
#
#   docker build --secret id=pip-ca,src="$PIP_CERT" --build-arg PIP_INDEX_URL="$PIP_INDEX_URL" -t splitlearning .
#
# The secret `pip-ca` (a PEM bundle) is what pip trusts during the build; it is mounted for that one command and
# is in no layer and no history. PIP_INDEX_URL, where given, replaces PyPI (also only in the build stage).
# Both are optional: without them pip uses PyPI and the system's roots.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# Build stage: install the project and its dependencies into a virtual environment. All wheels are prebuilt,
# so no compiler is needed even here; whatever this stage holds besides /opt/venv stays behind.
FROM ${PYTHON_IMAGE} AS build
ARG TF_EXTRA=cpu
ARG PIP_INDEX_URL=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY splitlearning ./splitlearning
COPY client_part ./client_part
COPY server_part ./server_part
COPY aggregator ./aggregator
COPY label_party ./label_party
COPY feature_party ./feature_party
RUN --mount=type=secret,id=pip-ca,required=false \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && if [ -z "${PIP_INDEX_URL}" ]; then unset PIP_INDEX_URL; fi \
 && /opt/venv/bin/pip install ".[${TF_EXTRA}]" \
 && /opt/venv/bin/pip uninstall --yes pip

# Final stage: the interpreter, the virtual environment and a non-root user; no build tools, no sources.
FROM ${PYTHON_IMAGE}
ARG TF_EXTRA=cpu
LABEL org.opencontainers.image.title="splitlearning" \
      org.opencontainers.image.description="Split learning over gRPC: split-server, split-client, split-aggregator, split-label-party, split-feature-party" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.splitlearning.tensorflow="${TF_EXTRA}"
COPY --from=build /opt/venv /opt/venv
# /var/lib/splitlearning is where compose mounts the named volumes (checkpoints); created here and owned by
# the user, a fresh named volume takes this ownership on first mount.
# A regular (not --system) account: its uid 10001 lies above the system range, where useradd warns about it.
RUN groupadd --gid 10001 split \
 && useradd --no-log-init --uid 10001 --gid split --home-dir /home/split --create-home --shell /usr/sbin/nologin \
      split \
 && install --directory --owner split --group split /var/lib/splitlearning
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=2
USER split:split
WORKDIR /home/split
EXPOSE 50051
# Both parts on loopback in one container; compose gives each service its own command instead.
CMD ["split-demo"]
