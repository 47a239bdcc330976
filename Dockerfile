# bitfit-serve on CPU: one frozen encoder (the bundled all-MiniLM-L6-v2) and a deltas folder.
#
#   docker build -t bitfit-serve .
#   docker run -p 8000:8000 -v "$PWD/deltas:/deltas" -e BITFIT_SERVE_ADMIN_TOKEN=change-me bitfit-serve
#
# Every `bitfit-serve serve` option is also an env var BITFIT_SERVE_<OPTION>. Listening on 0.0.0.0
# needs an admin token (uploads and deletes go through it); set BITFIT_SERVE_API_KEY too to close
# the inference routes. The deltas folder is a volume: files added there are served while running.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
WORKDIR /app

# torch first, so that the project's `torch>=2.3` is already met. A plain `torch` is the CUDA build
# (several GB); for a CPU-only image pass PyTorch's CPU wheel index (see its install selector):
#   docker build --build-arg TORCH_PIP_ARGS="--index-url <the CPU wheel index>" -t bitfit-serve .
ARG TORCH_PIP_ARGS=""
RUN pip install $TORCH_PIP_ARGS torch
COPY pyproject.toml README.md ./
COPY bitfit_serve ./bitfit_serve
COPY trainer ./trainer
RUN pip install . && useradd --create-home --uid 1000 serve
COPY deltas /deltas
RUN chown -R serve /deltas

USER serve
EXPOSE 8000
VOLUME ["/deltas"]
ENV BITFIT_SERVE_HOST=0.0.0.0 BITFIT_SERVE_PORT=8000 BITFIT_SERVE_DELTAS=/deltas BITFIT_SERVE_LOG_FORMAT=json
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=2).status != 200)"
ENTRYPOINT ["bitfit-serve", "serve"]
