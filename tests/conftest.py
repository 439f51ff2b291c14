"""Shared test helpers (fixtures only: tests import nothing from each other)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from kd.storage.batch import SequenceBatch
from kd.storage.format import CacheFingerprint, CodecConfig, TeacherFingerprint, TokenizerFingerprint


def random_batch(
    rng: np.random.Generator,
    num_sequences: int = 5,
    k: int = 8,
    vocab_size: int = 100,
    max_len: int = 30,
    peaked: bool = True,
) -> SequenceBatch:
    """A batch with valid structure and realistic-looking teacher distributions."""
    lengths = rng.integers(2, max_len + 1, size=num_sequences)
    starts = np.array([rng.integers(1, L + 1) for L in lengths], dtype=np.int32)
    p = int((lengths - starts).sum())
    logits = rng.standard_normal((p, vocab_size)) * (4.0 if peaked else 1.0)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ids = np.argsort(-logp, axis=1)[:, :k]
    topk = np.take_along_axis(logp, ids, axis=1)
    with np.errstate(divide="ignore"):
        tail = np.log(np.clip(1 - np.exp(topk).sum(-1), 0, 1))
    tokens = rng.integers(0, vocab_size, size=int(lengths.sum())).astype(np.int32)
    so = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    # the target of row j of sequence i is token c_i + j
    targets = np.concatenate([tokens[so[i] + starts[i] : so[i + 1]] for i in range(num_sequences)]) if p else np.zeros(0, np.int32)
    target_lp = logp[np.arange(p), targets] if p else np.zeros(0)
    behaviour = np.where(rng.random(p) < 0.5, -rng.random(p) * 5, np.nan)
    return SequenceBatch(
        token_ids=tokens,
        seq_offsets=so,
        completion_start=starts,
        topk_ids=ids.astype(np.int32),
        topk_logprobs=topk.astype(np.float32),
        tail_logprobs=tail.astype(np.float32),
        target_logprobs=target_lp.astype(np.float32),
        behaviour_logprobs=behaviour.astype(np.float32),
        source=rng.integers(0, 3, size=num_sequences).astype(np.uint8),
        round=np.full(num_sequences, 0, np.int32),
        prompt_index=np.arange(num_sequences, dtype=np.int64),
        sample_index=np.zeros(num_sequences, np.int32),
    )


def fingerprint(k: int = 8, vocab_size: int = 100, codec: CodecConfig | None = None, tok: str = "a" * 64) -> CacheFingerprint:
    return CacheFingerprint(
        teacher=TeacherFingerprint(name="tiny-teacher", weights_sha256="b" * 64),
        tokenizer=TokenizerFingerprint(sha256=tok, vocab_size=vocab_size, name="tiny-tok"),
        k=k,
        codec=codec or CodecConfig(),
    )


@pytest.fixture
def make_batch():
    return random_batch


@pytest.fixture
def make_fingerprint():
    return fingerprint


# ---------------------------------------------------------------- S3 on loopback (moto), @pytest.mark.remote
class S3Faults:
    """Makes the moto server answer a fraction of requests with HTTP 500 InternalError.

    ``rate``: probability per request (seeded, so runs repeat); ``methods``: HTTP methods
    eligible (None: all); ``key_contains``: only requests whose path contains it.
    ``injected`` counts the errors sent.
    """

    def __init__(self):
        import random
        import threading

        self._lock = threading.Lock()
        self._random = random.Random(0)
        self.reset()

    def reset(self, rate: float = 0.0, methods: set[str] | None = None, key_contains: str = "", seed: int = 0):
        with self._lock:
            self.rate, self.methods, self.key_contains, self.injected = rate, methods, key_contains, 0
            self._random.seed(seed)

    def should_fail(self, method: str, path: str) -> bool:
        with self._lock:
            if self.rate <= 0 or (self.methods and method not in self.methods) or self.key_contains not in path:
                return False
            fail = self._random.random() < self.rate
            self.injected += fail
            return fail


def _faulty_app(app, faults: S3Faults):
    body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
            b"<Message>injected by the test fixture</Message><RequestId>kd-test</RequestId></Error>")

    def wrapped(environ, start_response):
        if faults.should_fail(environ.get("REQUEST_METHOD", ""), environ.get("PATH_INFO", "")):
            length = int(environ.get("CONTENT_LENGTH") or 0)
            if length:
                environ["wsgi.input"].read(length)  # drain the upload so the connection stays sane
            start_response("500 Internal Server Error", [
                ("Content-Type", "application/xml"), ("Content-Length", str(len(body))), ("Connection", "close")])
            return [body]
        return app(environ, start_response)

    return wrapped


@pytest.fixture(scope="session")
def moto_server():
    """A real S3 API (moto) on a free loopback port for the whole session; requests can be made to fail."""
    pytest.importorskip("s3fs")
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    faults = S3Faults()

    class Quiet(MotoRequestHandler):
        def log_request(self, *args, **kwargs):
            pass

    class Server(ThreadedMotoServer):
        def _server_entry(self):
            app = _faulty_app(DomainDispatcherApplication(create_backend_app), faults)
            self._server = make_server(self._ip_address, self._port, app, True, request_handler=Quiet)
            self._server_ready_event.set()
            self._server.serve_forever()

    server = Server(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    server.endpoint = f"http://{host}:{port}"
    server.faults = faults
    yield server
    server.stop()


@pytest.fixture
def s3(moto_server, monkeypatch):
    """A fresh bucket; credentials and endpoint only in the standard AWS environment variables.

    Yields an object with ``url`` (``s3://<bucket>``), ``fs`` (an s3fs filesystem),
    ``endpoint`` and ``faults`` (reset after the test).
    """
    import types
    import uuid

    import s3fs

    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "kdtestkey")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "kdtestsecret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.endpoint)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")  # no user config leaks in
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    s3fs.S3FileSystem.clear_instance_cache()  # instances remember credentials
    bucket = f"kd-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem()
    fs.mkdir(bucket)
    yield types.SimpleNamespace(url=f"s3://{bucket}", bucket=bucket, fs=fs, endpoint=moto_server.endpoint,
                                faults=moto_server.faults)
    moto_server.faults.reset()
    s3fs.S3FileSystem.clear_instance_cache()


# ---------------------------------------------------------------- tiny-model test environment
@pytest.fixture
def isolated_datasets_cache(tmp_path_factory, monkeypatch):
    """`datasets` writes its cache under the test session's temp folder, never under ~."""
    import datasets.config

    cache = tmp_path_factory.getbasetemp() / "hf-datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and 2-core CI boxes are often shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny random teacher/student pair sharing a tokenizer (``models.tiny_model_pair``)."""
    from kd.stages import models

    return models.tiny_model_pair(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def benchmark_module():
    """Load a script of benchmarks/ as a module (the instruments some tests check): name -> module."""
    loaded = {}

    def load(name: str):
        if name not in loaded:
            path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
            spec = importlib.util.spec_from_file_location(f"kd_benchmark_{name}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            loaded[name] = module
        return loaded[name]

    return load
