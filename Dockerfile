FROM debian:12-slim
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends python3 python3-venv make ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/weir
COPY . .
RUN ./weir setup
