# One image for both services; docker-compose.yml picks the command. docs/deploy.md has the
# build arguments, the GPU build and the measured size.
#
#   docker build -t bagel-serve:latest .                                    # CPU, from PyPI
#   docker build -t bagel-serve:cuda \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .  # GPU
#
# Written for the classic builder as well as BuildKit (no RUN --mount), so a bare distribution
# engine builds it: that is what CI has (scripts/compose_test.sh).

# Any image with Python 3.11 and `python3 -m venv` (CI: a Debian bookworm made by debootstrap).
ARG BASE_IMAGE=python:3.11-slim

# pyproject.toml's dependency list, alone: the next stage is rebuilt only when the list, the
# torch build or the wheels change, not when the code or the rest of pyproject.toml does.
FROM ${BASE_IMAGE} AS requirements
COPY pyproject.toml /tmp/pyproject.toml
RUN python3 -c 'import sys, tomllib; print(*tomllib.load(sys.stdin.buffer)["project"]["dependencies"], sep="\n")' \
      </tmp/pyproject.toml >/tmp/requirements.txt

FROM ${BASE_IMAGE} AS deps
ARG TORCH_SPEC=torch==2.13.0
# PyPI's torch for Linux is the CUDA build with its libraries: torch comes from its own index.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_INDEX_URL=https://pypi.org/simple
# A folder of the build context. When it holds wheels, pip installs from it alone (no index):
# CI fills one on the host with `pip download`, since the build itself reaches no index.
ARG WHEELS=deploy/wheels
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_CONFIG_FILE=/tmp/pip.conf
COPY ${WHEELS} /tmp/wheels
# pip's source in this stage and the next: the wheel folder alone if it holds wheels.
RUN if ls /tmp/wheels/*.whl >/dev/null 2>&1; \
    then printf '[global]\nno-index = true\nfind-links = /tmp/wheels\n' >/tmp/pip.conf; \
    else printf '[global]\n' >/tmp/pip.conf; fi
COPY --from=requirements /tmp/requirements.txt /tmp/requirements.txt
# The versions tested (every dependency but torch), as `make` installs them.
COPY constraints.txt /tmp/constraints.txt
RUN python3 -m venv /opt/bagel \
 && /opt/bagel/bin/pip install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC" \
 && /opt/bagel/bin/pip install -c /tmp/constraints.txt -r /tmp/requirements.txt

# The product packages as one wheel (only these: no tests, examples or benchmarks).
FROM deps AS build
COPY pyproject.toml /src/
COPY bagel /src/bagel
COPY protos /src/protos
COPY serving /src/serving
COPY step_cache /src/step_cache
COPY transport /src/transport
COPY diffusion_service /src/diffusion_service
COPY prefill_service /src/prefill_service
COPY client /src/client
COPY gateway /src/gateway
RUN /opt/bagel/bin/pip wheel --no-deps --wheel-dir /dist /src

# The runtime: the virtualenv and the product wheel installed in it, no sources, no wheels of the
# dependencies, a user without privileges.
FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="bagel-serve"
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin bagel
COPY --from=deps /opt/bagel /opt/bagel
COPY --from=build /dist /tmp/dist
RUN /opt/bagel/bin/pip install --no-cache-dir --no-deps --no-index /tmp/dist/*.whl \
 && rm -rf /tmp/dist
ENV PATH=/opt/bagel/bin:$PATH PYTHONUNBUFFERED=1
USER bagel
WORKDIR /home/bagel
EXPOSE 8000 50051 50052
CMD ["python", "-m", "client", "--help"]
