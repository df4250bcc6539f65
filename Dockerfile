# streamer worker image (CPU). Build: docker build -t streamer .
# The same image runs every subcommand: worker, gateway, topics apply, model init-tiny, submit,
# top.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, pinned, from the CPU index: an unpinned torch from PyPI pulls a multi-GB CUDA
# build. Its own layer, so code changes do not re-download it. For a GPU image, change the index
# URL to a CUDA one (and the base image to one with the matching runtime).
ARG TORCH_VERSION=2.13.0
RUN pip install torch==${TORCH_VERSION} --index-url https://download.pytorch.org/whl/cpu

# Install from a throwaway copy of the source: the image keeps only the installed package, so
# nothing can import the source tree by accident. Then fail the build, not the first
# `topics apply`, if the installed package cannot find the topic specs. torch is already
# satisfied, so pip adds only streamer and its other dependencies.
COPY topics /etc/streamer/topics
ENV STREAMER_TOPICS_DIR=/etc/streamer/topics
COPY . /tmp/src
RUN pip install /tmp/src \
    && rm -rf /tmp/src \
    && cd / && python -c "from streamer.topics import load_specs; assert load_specs(), 'no topic specs'"

# Non-root. /models is created here, owned by the user, so a named volume mounted on it (Compose's
# model-init writes the tiny model there) inherits that ownership and stays writable.
RUN useradd --create-home --uid 10001 --user-group streamer \
    && mkdir -p /models /data \
    && chown streamer:streamer /models /data
USER streamer
WORKDIR /home/streamer
ENV HF_HOME=/home/streamer/.cache/huggingface

# Metrics, /healthz and /readyz (--metrics-port / STREAMER_METRICS_PORT); the gateway's HTTP.
EXPOSE 9400 8000

ENTRYPOINT ["streamer"]
CMD ["--help"]
