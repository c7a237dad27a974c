# One image for every bonewatch role (migrate, worker, watcher, listener, web) and Flower; see
# docker-compose.yml.
# Base pinned by digest (python:3.11-slim = 3.11.15 on Debian trixie, multi-arch index); bump the
# tag and the digest together.
FROM python:3.11-slim@sha256:90744cff8f32887f075c47d747a173ff333e9e98801667af93c357fa9f5e28ff

# The serving image: no [train] extra, so no TensorFlow or Keras; bundles run on ONNX Runtime or
# OpenVINO and heatmaps come from the ONNX graphs (docs/models.md, "Serving without TensorFlow").
# Matplotlib keeps its cache under /tmp: the root file system is read-only in Compose.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MPLCONFIGDIR=/tmp/matplotlib

WORKDIR /app
# What `pip install .` reads: the project file, its readme, and every folder that
# [tool.setuptools.package-dir] maps into the bonewatch package.
COPY pyproject.toml README.md ./
COPY bonewatch bonewatch
COPY ingest ingest
COPY models models
COPY db db
COPY worker worker
COPY bench bench
COPY web web
COPY deliver deliver
# The [flower] extra: the Compose file's Flower runs from this image too (docs/distributed.md).
RUN pip install '.[flower]' \
 && groupadd --gid 10001 bonewatch \
 && useradd --create-home --uid 10001 --gid 10001 bonewatch \
 && mkdir -p /data /inbox \
 && chown bonewatch:bonewatch /data /inbox \
 && chmod 0750 /data

USER bonewatch
ENV BONEWATCH_DATA_DIR=/data
ENTRYPOINT []
CMD ["bonewatch", "--help"]
