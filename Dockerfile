# One image for every service role (api, worker, migrate); the command picks the role:
#   docker run IMAGE api --host 0.0.0.0      docker run IMAGE worker --queues gpu
# torch's default Linux wheels bundle the CUDA runtime; the host needs only the NVIDIA
# driver and the container toolkit (compose reserves the GPU for the worker).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LDREG_HOME=/var/lib/ldreg

RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# Dependencies first (the slow layer, cached while only the code changes): install the
# project once from its metadata alone, then replace it by the real source below.
COPY pyproject.toml README.md ./
RUN mkdir -p ldreg api worker service cli migrations client \
    && pip install . \
    && pip uninstall -y ldreg-service
COPY . .
RUN pip install --no-deps . \
    && useradd --create-home --uid 10001 ldreg \
    && mkdir -p /var/lib/ldreg /data /artifacts \
    && chown -R ldreg /var/lib/ldreg /artifacts

USER ldreg
EXPOSE 8000
ENTRYPOINT ["ldreg"]
CMD ["api", "--host", "0.0.0.0", "--port", "8000"]
