# qwenkit serve on CPU, built from this repository's own files (see docs/deploy.md).
#
#   docker build -t qwenkit .
#   docker run --rm -p 8000:8000 -v qwenkit-cache:/data -e QWENKIT_API_KEY=secret qwenkit
#   docker run ... qwenkit --model /data/models/my-ckpt --kv-cache-memory 2GiB   # flags go after the image
#
# The model is not in the image: the first start pulls the default one into the /data volume
# (or mount your own checkpoint). `docker stop` waits 10 s by default: give it the drain time,
# `docker stop -t 35` with the default --shutdown-timeout of 30 s.

FROM python:3.11-slim

# A C compiler: the CPU backend compiles its kernels (qwenkit/backends/cpu_kernels.c) on first use.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libgomp1 \
    && rm -rf /var/lib/apt/lists/*

# torch first, from the CPU index: the default index's Linux wheel brings CUDA libraries (GBs).
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /src
COPY pyproject.toml README.md ./
COPY qwenkit ./qwenkit
RUN pip install --no-cache-dir ".[server]" && rm -rf /src

# Not root; the model cache and the compiled kernels live in /data (a volume).
RUN useradd --create-home --uid 1000 qwenkit && mkdir /data && chown qwenkit /data
USER qwenkit
ENV QWENKIT_HOME=/data PYTHONUNBUFFERED=1
VOLUME /data
EXPOSE 8000

# /ready is 200 once the model is loaded and until a drain starts.
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s \
    CMD python -c "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/ready').status != 200)"

# Exec form: the server is PID 1 and receives `docker stop`'s SIGTERM itself (and drains).
ENTRYPOINT ["qwenkit", "serve", "--host", "0.0.0.0", "--port", "8000"]
