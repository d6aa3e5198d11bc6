# One image for both services; docker-compose.yml picks the command.
# GPU: build with --build-arg TORCH_SPEC="torch==2.11.0" --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
FROM python:3.11-slim
ARG TORCH_SPEC="torch==2.11.0"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cpu"
WORKDIR /app
COPY pyproject.toml README.md ./
COPY bagel bagel
COPY protos protos
COPY serving serving
COPY transport transport
COPY diffusion_service diffusion_service
COPY prefill_service prefill_service
COPY client client
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX" "$TORCH_SPEC" \
 && pip install --no-cache-dir .
ENV PYTHONUNBUFFERED=1
