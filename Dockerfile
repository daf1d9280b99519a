# One image per service, from one file: `docker build --target trainer -t tuneloop-trainer .`
# Each target installs only its service's extra. CPU torch by default; for CUDA images:
#   docker build --target trainer --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .
ARG PYTHON=3.11
FROM python:${PYTHON}-slim AS src
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared shared
COPY services services
COPY examples examples
ENV PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_PROGRESS_BARS=1 TUNELOOP_STORAGE=/runs

FROM src AS ml
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir torch==2.13.0 --index-url ${TORCH_INDEX}

FROM ml AS trainer
RUN pip install --no-cache-dir ".[trainer]"
CMD ["python", "-m", "tuneloop.trainer"]

FROM ml AS evaluator
RUN pip install --no-cache-dir ".[evaluator]"
CMD ["python", "-m", "tuneloop.evaluator"]

FROM ml AS checkpoint
RUN pip install --no-cache-dir ".[checkpoint]"
CMD ["python", "-m", "tuneloop.checkpoint"]

FROM src AS data-pipeline
RUN pip install --no-cache-dir ".[data-pipeline]"
CMD ["python", "-m", "tuneloop.data_pipeline"]

FROM src AS rl-reward
RUN pip install --no-cache-dir ".[rl-reward]"
CMD ["python", "-m", "tuneloop.rl_reward"]

# The CLI (init, ctl) needs no ML stack.
FROM src AS cli
RUN pip install --no-cache-dir .
ENTRYPOINT ["tuneloop"]
