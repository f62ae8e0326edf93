# syntax=docker/dockerfile:1
# The predictor image: the `predictor` package and its dependencies, installed by the project's own
# `pip install .`. No weights: KServe's storage initializer puts them in /mnt/models (see inferenceservices/).
#   docker build -t <registry>/falcon-predictor:<tag> .
# torch comes from PyPI, whose Linux wheels are built with CUDA; for another CUDA build, pass its index:
#   --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu128
FROM python:3.11-slim

ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed numeric user: Kubernetes can only verify runAsNonRoot against a numeric USER, and the manifests run the
# container as uid 1000.
RUN groupadd --gid 1000 predictor \
 && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/predictor --shell /usr/sbin/nologin predictor

# What `pip install .` reads (pyproject.toml names README.md as the readme), nothing else: .dockerignore keeps the
# rest of the repository out of the build context. The sources are removed after the install, so `python -m
# predictor` can only run the installed package.
WORKDIR /build
COPY pyproject.toml README.md ./
COPY predictor/ predictor/
RUN pip install '.[gpu]' && rm -rf /build

USER 1000:1000
WORKDIR /home/predictor
EXPOSE 8080
# Arguments come from the InferenceService (inferenceservices/base/servingruntime.yaml); with none, the server
# serves a tiny demo Falcon built at start-up.
ENTRYPOINT ["python", "-m", "predictor"]
