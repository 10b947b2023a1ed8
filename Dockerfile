FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY contracts ./contracts
COPY middleware ./middleware
COPY handlers ./handlers
COPY src ./src
RUN pip install . && useradd --system --home-dir /app stanchion
USER stanchion

# NATS_URL must point at a server (docker-compose.yml sets it); without it the embedded server is used.
CMD ["stanchion", "run"]
