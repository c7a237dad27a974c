# One image for every bonewatch role: migrate, worker, watcher (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TF_CPP_MIN_LOG_LEVEL=2

WORKDIR /app
COPY pyproject.toml README.md ./
COPY ingest ingest
COPY models models
COPY db db
COPY worker worker
RUN pip install . \
 && useradd --create-home --uid 10001 bonewatch \
 && mkdir -p /data /inbox \
 && chown bonewatch /data /inbox

USER bonewatch
ENV BONEWATCH_DATA_DIR=/data
ENTRYPOINT []
CMD ["bonewatch", "--help"]
