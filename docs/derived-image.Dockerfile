# Example: a worker image that also has what your experimental runs need (your engine, its
# Python packages, system libraries). Build it on top of the sierra-prefect worker image and
# point the Docker deployment's `image` job variable at the result.
#
#   docker build --network host -t my-lab/sierra-worker:1 -f docs/derived-image.Dockerfile docs
#
# (Any directory works as the context; this example copies nothing in.)
ARG WORKER_IMAGE=sierra-prefect/worker:latest
FROM ${WORKER_IMAGE}

# The worker image runs as uid 1000 and its venv (/opt/venv, first on PATH) belongs to root:
# install as root, then drop back.
USER root

# System packages: the base is Debian, so apt works (with host networking where bridges are off).
# RUN apt-get update \
#     && apt-get install -y --no-install-recommends parallel \
#     && rm -rf /var/lib/apt/lists/*

# Python packages go into the same venv as Prefect. PIP_CONSTRAINT (set by the worker image)
# keeps every version that uv.lock pinned: a package that needs, say, another Prefect fails to
# resolve here instead of breaking the worker at run time. `pip check` makes sure.
RUN pip install --no-cache-dir tabulate \
    && pip check

# Your own code, if the runs need it (mind .dockerignore of your context):
# COPY my_engine/ /opt/my-engine/

USER 1000:1000
