# One image for every program of the order story: the three example listeners,
# LetterThief, and the orders producer (see docker-compose.yml).
#
#   docker build -t pigeon-demo .
#   docker run --rm -e PIGEON_URL=amqp://user:pass@rabbit:5672/ pigeon-demo \
#       pigeon listen listeners.notification:app
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIGEON_LOG_FORMAT=json

WORKDIR /app

# The library first: this layer is rebuilt only when pigeon or letterthief change.
COPY pyproject.toml README.md ./
COPY pigeon ./pigeon
COPY letterthief ./letterthief
RUN pip install '.[letterthief,redis,postgres]'

# The example services run from /app (`pigeon listen` imports from the working directory).
COPY listeners ./listeners

# Not root. The directories the compose volumes mount are created here, owned
# by this user, so that new volumes start out writable for it.
RUN useradd --create-home --uid 10001 pigeon \
    && mkdir -p var/mail var/seller var/partners var/letterthief \
    && chown -R pigeon:pigeon var
USER pigeon

CMD ["pigeon", "--help"]
