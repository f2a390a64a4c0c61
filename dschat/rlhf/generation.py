"""Rollout generation for step 3 (and step 2.5): DeepSpeed Hybrid Engine where it works, HF `generate` elsewhere.

Why a wrapper: the Hybrid Engine (HE) only has inference kernels for a few layer classes, needs a GPU
and breaks with newer transformers cache APIs; upstream crashed in all those cases. Here the flag is a
request, not an order: the HE path is probed once (an exception or output that disagrees with the
native path turns it off for the rest of the run) and everything else runs the KV-cached HF `generate`.
Under ZeRO-3 the native path gathers the actor's parameters ONCE per call instead of once per token.
"""

from __future__ import annotations

import contextlib
import inspect
import time
import warnings
from collections.abc import Iterator, Sequence

import torch
from transformers import DynamicCache, GenerationConfig

from dschat.utils.args import GREEDY, SamplingSettings
from dschat.utils.dist import all_reduce, any_rank_true, get_world_size, on_cpu
from dschat.utils.printing import print_rank_0

PATH_HYBRID = "hybrid_engine"
PATH_HF = "hf_generate"

_warned: set[str] = set()


def warn_once(message: str) -> None:
    """Print a warning once per process (rank 0 only), however often the situation recurs."""
    if message in _warned:
        return
    _warned.add(message)
    print_rank_0(f"WARNING: {message}")


# --------------------------------------------------------------------------------------------- helpers


def _unwrap(engine_or_model) -> torch.nn.Module:
    return getattr(engine_or_model, "module", engine_or_model)


def _is_partitioned(param: torch.nn.Parameter) -> bool:
    return hasattr(param, "ds_id")


def _is_end(tokens: torch.Tensor, eos_token_id: int | Sequence[int] | None) -> torch.Tensor:
    if eos_token_id is None:
        return torch.zeros_like(tokens, dtype=torch.bool)
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.isin(tokens, torch.tensor(ids, dtype=tokens.dtype, device=tokens.device))


def answer_extent(sequences: torch.Tensor, prompt_width: int,
                  eos_token_id: int | Sequence[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(content lengths [B] long, ended [B] bool) of the answers in generated rows [B, P + T].

    An answer starts at the prompt width and ends at its first eos AFTER the prompt: `lengths` counts
    the tokens before that eos (all T when there is none: cut by the length limit) and `ended` says
    whether there was one. Nothing inside the prompt is looked at, so an eos (or pad) that closes a turn
    inside a chat prompt is content, never the end.
    """
    is_end = _is_end(sequences[:, prompt_width:], eos_token_id)
    ended = is_end.any(dim=1)
    first = is_end.long().argmax(dim=1)
    lengths = torch.where(ended, first, torch.full_like(first, is_end.shape[1]))
    return lengths, ended


def answer_mask(sequences: torch.Tensor, prompt_width: int, eos_token_id: int | Sequence[int] | None,
                include_end: bool = True) -> torch.Tensor:
    """[B, L] -> [B, L - prompt_width] bool: the answer's tokens, its ending eos included (`include_end`)."""
    lengths, ended = answer_extent(sequences, prompt_width, eos_token_id)
    real = lengths + (ended.long() if include_end else 0)
    positions = torch.arange(sequences.shape[1] - prompt_width, device=sequences.device).unsqueeze(0)
    return positions < real.unsqueeze(1)


def answer_lengths(sequences: torch.Tensor, prompt_width: int,
                   eos_token_id: int | Sequence[int] | None) -> torch.Tensor:
    """Number of answer tokens before the answer's eos, per row ([B] long)."""
    return answer_extent(sequences, prompt_width, eos_token_id)[0]


def rollout_attention_mask(sequences: torch.Tensor, prompt_mask: torch.Tensor,
                           eos_token_id: int | Sequence[int] | None) -> torch.Tensor:
    """[B, P + T] long mask of generated rows: the prompt collator's mask (never recomputed from ids), then
    each answer up to and including its eos. What the actor, reference, critic and reward model attend to."""
    width = prompt_mask.shape[1]
    answer = answer_mask(sequences, width, eos_token_id).to(prompt_mask.dtype)
    return torch.cat([prompt_mask.to(sequences.device), answer], dim=1)


def pad_token_mask(sequences: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """DeepSpeed-Chat's rollout mask, `ids != pad` ([B, T] long), used only under `--rollout_mask pad_token`
    (part of --dschat_compat). Where the pad is a token of its own (upstream's Llama `[PAD]`) it equals
    `rollout_attention_mask`; where pad = eos it also hides each answer's eos, every eos inside the prompt
    and OPT's beginning token, which is why the project's rule reads positions instead."""
    return (sequences != pad_token_id).long()


def answer_token_lists(sequences: torch.Tensor, prompt_width: int,
                       eos_token_id: int | Sequence[int] | None) -> list[list[int]]:
    """Answer token ids per row: everything after the prompt up to (not including) its eos."""
    lengths = answer_lengths(sequences, prompt_width, eos_token_id).tolist()
    return [row[:n] for row, n in zip(sequences[:, prompt_width:].tolist(), lengths)]


def pad_after_eos(sequences: torch.Tensor, prompt_width: int, eos_token_id: int | None,
                  pad_token_id: int) -> torch.Tensor:
    """Replace every answer token after the answer's first eos by pad (the eos itself is kept); the prompt
    is left as it is.

    HF already does this for finished rows; doing it again makes the rule hold for any backend
    (the HE kernels, custom generators) and for eos ids given as a list in the generation config.
    """
    if eos_token_id is None:
        return sequences
    out = sequences.clone()
    answers = out[:, prompt_width:]
    seen_eos = (answers == eos_token_id).long().cumsum(dim=1)
    after = (seen_eos - (answers == eos_token_id).long()) > 0
    answers[after] = pad_token_id
    return out


def decode_answers(tokenizer, sequences: torch.Tensor, prompt_width: int) -> list[str]:
    """Answer text per row (special tokens and padding removed)."""
    return tokenizer.batch_decode(sequences[:, prompt_width:], skip_special_tokens=True)


def decode_continuations(tokenizer, prompt_ids: Sequence[list[int]],
                         answer_ids: Sequence[Sequence[list[int]]]) -> list[str]:
    """Each answer's text as it continues its prompt (keeps the leading space many tokenizers drop when an
    answer is decoded on its own), for every answer of every prompt (answer_ids[i]: the answers of prompt
    i), flat in that order; batched, and each prompt is decoded once however many answers it has."""
    heads = tokenizer.batch_decode([list(p) for p in prompt_ids], skip_special_tokens=True)
    flat = [(i, list(a)) for i, answers in enumerate(answer_ids) for a in answers]
    fulls = tokenizer.batch_decode([list(prompt_ids[i]) + a for i, a in flat], skip_special_tokens=True)
    alone = tokenizer.batch_decode([a for _, a in flat], skip_special_tokens=True)
    return [full[len(heads[i]):] if full.startswith(heads[i]) else own
            for (i, _), full, own in zip(flat, fulls, alone)]


def decode_prompts(tokenizer, prompt_ids: torch.Tensor) -> list[str]:
    return tokenizer.batch_decode(prompt_ids, skip_special_tokens=True)


# --------------------------------------------------------------------------------------------- HE preflight


def hybrid_engine_unavailable_reason(model: torch.nn.Module) -> str | None:
    """Why the Hybrid Engine cannot serve `model` here (None: worth trying).

    Called before `deepspeed.initialize`, so a CPU run or an architecture without HE kernels never gets
    the `hybrid_engine` config section (DeepSpeed would try to build CUDA kernels for it).
    """
    if on_cpu():
        return "the CPU accelerator has no DeepSpeed inference kernels"
    try:
        from deepspeed.module_inject.replace_policy import replace_policies
    except Exception as err:  # noqa: BLE001 - any import problem means "no HE"
        return f"DeepSpeed inference policies cannot be imported ({type(err).__name__}: {err})"
    supported = set()
    for policy in replace_policies:
        try:
            policy(None)
        except Exception:  # noqa: BLE001,S112 - a policy whose model family is not installed
            continue
        layer_class = getattr(policy, "_orig_layer_class", None)
        for cls in layer_class if isinstance(layer_class, list) else [layer_class]:
            if cls is not None:
                supported.add(cls)
    module = _unwrap(model)
    if not any(type(m) in supported for m in module.modules()):
        return f"DeepSpeed has no Hybrid Engine kernels for {type(module).__name__}"
    return None


def _is_hybrid_engine(engine) -> bool:
    try:
        from deepspeed.runtime.hybrid_engine import DeepSpeedHybridEngine
    except Exception:  # noqa: BLE001
        return False
    return isinstance(engine, DeepSpeedHybridEngine) and bool(getattr(engine, "_inference_containers", None))


# --------------------------------------------------------------------------------------------- ZeRO-3


def _free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return 0


def full_parameter_bytes(module: torch.nn.Module) -> int:
    """Size of the module's parameters when fully gathered (ZeRO-3 aware)."""
    total = 0
    for p in module.parameters():
        numel = p.ds_numel if _is_partitioned(p) else p.numel()
        total += numel * p.element_size()
    return total


def should_gather(module: torch.nn.Module, device: torch.device, fraction: float = 0.5) -> bool:
    """Size heuristic: gather the whole model only if it fits in `fraction` of the free memory.

    The decision must be identical on every rank (collectives follow from it), so the minimum free
    memory over ranks is used.
    """
    need = full_parameter_bytes(module)
    free = all_reduce(torch.tensor([float(_free_memory_bytes(device))], device=device), "min")
    return need <= fraction * float(free.item())


@contextlib.contextmanager
def gathered_for_generation(module: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Gather every ZeRO-3 parameter once and keep it resident for the whole `generate` call.

    `GatheredParameters` alone is not enough: ZeRO-3's per-module forward hooks would re-partition each
    layer right after its forward, so decoding would re-gather every layer for every token. Marking the
    parameters as "external" for the duration stops the hooks from releasing them; the flags are
    restored before the context re-partitions.
    """
    params = [p for p in module.parameters() if _is_partitioned(p)]
    if not enabled or not params:
        yield
        return
    import deepspeed  # ZeRO-3 runs only: a plain generate never loads it

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        saved = [p.is_external_param for p in params]
        for p in params:
            p.is_external_param = True
        try:
            yield
        finally:
            for p, flag in zip(params, saved):
                p.is_external_param = flag


# --------------------------------------------------------------------------------------------- generator


class Generator:
    """Generate answers for left-padded prompts; see docs/DESIGN.md, "Generation".

    `generate(prompt_ids, prompt_mask) -> [B, P + T]` where T <= max_new_tokens is the longest answer
    of this rank's batch (generation stops once every row hit eos) and everything after an answer's
    first eos is pad. `attention_mask(sequences, prompt_mask)` is the rows' mask (`rollout_attention_mask`).
    """

    def __init__(self, engine_or_model, tokenizer, *, max_new_tokens: int, sampling: SamplingSettings = GREEDY,
                 zero_stage: int = 0, enable_hybrid_engine: bool = False, gather_params: bool | None = None,
                 check_hybrid_parity: bool = True):
        self.engine = engine_or_model
        self.module = _unwrap(engine_or_model)
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling  # greedy, or sampling with temperature / top-p / top-k
        self.zero_stage = zero_stage
        self.gather_params = gather_params
        self.check_hybrid_parity = check_hybrid_parity
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_token_id = tokenizer.eos_token_id
        self.last_stats: dict[str, float | str] = {}
        self._is_he_engine = _is_hybrid_engine(engine_or_model)
        # The HE replaces `module.generate` with its wrapper and keeps the original as `_generate`; the
        # native path must call the original (the wrapper fuses LoRA into the weights, which the
        # training-mode LoRA layers would then add a second time).
        self._native_generate = (vars(engine_or_model).get("_generate") if self._is_he_engine else None) \
            or self.module.generate
        self._use_hybrid = False
        self._hybrid_probed = False
        if enable_hybrid_engine:
            if self._is_he_engine:
                self._use_hybrid = True
            else:
                reason = hybrid_engine_unavailable_reason(self.module) or \
                    "the actor engine was built without the DeepSpeed Hybrid Engine"
                warn_once(f"--enable_hybrid_engine: {reason}; generating with Hugging Face generate "
                          "(KV cache on) instead")

    @property
    def path(self) -> str:
        return PATH_HYBRID if self._use_hybrid else PATH_HF

    @property
    def synced_gpus(self) -> bool:
        """Keep ranks stepping together when ZeRO-3 forward hooks may issue collectives."""
        return self.zero_stage == 3 and get_world_size() > 1

    def generation_config(self, do_sample: bool | None = None):
        sample = self.sampling.do_sample if do_sample is None else do_sample
        kwargs = dict(max_new_tokens=self.max_new_tokens, min_new_tokens=0, do_sample=sample, num_beams=1,
                      pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id, use_cache=True)
        if sample:
            kwargs.update(temperature=self.sampling.temperature, top_p=self.sampling.top_p, top_k=self.sampling.top_k)
        else:
            # Explicit values (transformers' own defaults, which its validator treats as "unset") so a
            # checkpoint's generation_config cannot leak sampling settings into greedy decoding.
            kwargs.update(temperature=1.0, top_p=1.0, top_k=50)
        return GenerationConfig(**kwargs)

    # ---- backends
    def _native_mode(self) -> None:
        """HF forwards, dropout off. On an HE engine, train() is what swaps the HF layer forwards back."""
        if self._is_he_engine:
            self.engine.train()
        self.module.eval()

    def _hf_generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                     do_sample: bool | None = None, num_samples: int = 1) -> torch.Tensor:
        gather = False
        if self.zero_stage == 3:
            gather = self.gather_params if self.gather_params is not None else \
                should_gather(self.module, prompt_ids.device)
        with torch.no_grad(), gathered_for_generation(self.module, enabled=gather), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*generation flags are not valid.*")
            return shared_prefill_generate(self._native_generate, self.module, prompt_ids, prompt_mask,
                                           num_samples, generation_config=self.generation_config(do_sample),
                                           synced_gpus=self.synced_gpus)

    def _hybrid_generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                         do_sample: bool | None = None) -> torch.Tensor:
        # `module.generate` is the HE wrapper here; the engine's eval() has swapped the kernels in.
        with torch.no_grad():
            return self.module.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                                        generation_config=self.generation_config(do_sample),
                                        synced_gpus=self.synced_gpus)

    def _probe_hybrid(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> None:
        """First call only: run the HE greedily; on an exception (any rank) or output that disagrees with
        the native path on the first answer tokens, fall back for good (upstream issues: crashes with
        newer transformers, repeated-token garbage). Leaves the engine in HE inference mode if kept."""
        self._hybrid_probed = True
        reason = None
        try:
            he_out = self._hybrid_generate(prompt_ids, prompt_mask, do_sample=False)
        except Exception as err:  # noqa: BLE001 - any HE failure means "use the native path"
            first = (str(err).splitlines() or [""])[0][:200]
            he_out, reason = None, f"the Hybrid Engine failed ({type(err).__name__}: {first})"
        if any_rank_true(reason is not None):
            self._disable_hybrid(reason or "the Hybrid Engine failed on another rank")
            return
        if not self.check_hybrid_parity:
            return
        self._native_mode()
        native = self._hf_generate(prompt_ids, prompt_mask, do_sample=False)
        agree = first_tokens_agreement(he_out, native, prompt_ids.shape[1], self.pad_token_id)
        if any_rank_true(agree < 0.5):
            self._disable_hybrid(f"Hybrid Engine greedy output disagrees with the native model "
                                 f"({agree:.0%} of rows agree on the first answer tokens)")
            return
        print_rank_0(f"Hybrid Engine parity check passed ({agree:.0%} of rows agree on the first tokens)")
        self.engine.eval()

    def _disable_hybrid(self, reason: str) -> None:
        self._use_hybrid = False
        warn_once(f"--enable_hybrid_engine: {reason}; generating with Hugging Face generate from now on")

    # ---- public API
    def attention_mask(self, sequences: torch.Tensor, prompt_mask: torch.Tensor, num_samples: int = 1) -> torch.Tensor:
        """Mask of `generate`'s rows: the prompt mask (repeated per sample), then each answer through its eos."""
        return rollout_attention_mask(sequences, prompt_mask.repeat_interleave(num_samples, dim=0), self.eos_token_id)

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, num_samples: int = 1) -> torch.Tensor:
        """[B * num_samples, P + T]: rows i * num_samples + k are sample k of prompt i. The native path
        computes each prompt's prefill once for its samples (`shared_prefill_generate`); the Hybrid
        Engine path repeats the prompts."""
        if self._use_hybrid and num_samples > 1:
            prompt_ids = prompt_ids.repeat_interleave(num_samples, dim=0)
            prompt_mask = prompt_mask.repeat_interleave(num_samples, dim=0)
            num_samples = 1
        was_training = self.module.training
        start = time.time()
        sequences = None
        try:
            if self._use_hybrid:
                if was_training:  # the caller may have switched to eval already (kernels swapped in then)
                    self.engine.eval()
                if not self._hybrid_probed:
                    self._probe_hybrid(prompt_ids, prompt_mask)
            if self._use_hybrid:
                try:
                    sequences = self._hybrid_generate(prompt_ids, prompt_mask)
                except Exception as err:  # noqa: BLE001 - never crash on the HE flag
                    self._disable_hybrid(f"the Hybrid Engine failed ({type(err).__name__}: {err})")
            if sequences is None:
                self._native_mode()
                sequences = self._hf_generate(prompt_ids, prompt_mask, num_samples=num_samples)
        finally:
            if was_training:
                self.engine.train()
        elapsed = max(time.time() - start, 1e-9)
        width = prompt_ids.shape[1]
        sequences = pad_after_eos(sequences, width, self.eos_token_id, self.pad_token_id)
        n_tokens = int(answer_lengths(sequences, width, self.eos_token_id).sum())
        self.last_stats = {"generate_time": elapsed, "tokens_per_second": n_tokens / elapsed,
                           "answer_tokens": n_tokens, "path": self.path}
        return sequences


def shared_prefill_generate(generate_fn, model: torch.nn.Module, prompt_ids: torch.Tensor,
                            prompt_mask: torch.Tensor, num_samples: int, **generate_kwargs) -> torch.Tensor:
    """`num_samples` continuations per prompt, rows [p0 s0, p0 s1, ..., p1 s0, ...], with each prompt's
    prefill run once: the prompt minus its last token goes through `model` once at batch size B, the
    KV cache is expanded `num_samples` times (`repeat_interleave` on the batch axis) and `generate_fn`
    (HF `generate` of `model`) decodes from the last prompt token at batch size B * num_samples.

    With greedy decoding the result equals `generate` on the repeated prompts wherever the float sums
    agree (the last prompt position is computed against the cache instead of in one prompt pass, which
    can move logits by rounding); sampling draws the same random numbers in the same order.
    Falls back to plain repetition for num_samples == 1, one-token prompts or a model without a cache.
    """
    repeated_ids = prompt_ids.repeat_interleave(num_samples, dim=0)
    repeated_mask = prompt_mask.repeat_interleave(num_samples, dim=0)
    if num_samples == 1 or prompt_ids.shape[1] < 2:
        return generate_fn(input_ids=repeated_ids, attention_mask=repeated_mask, **generate_kwargs)
    head_mask = prompt_mask[:, :-1]
    position_ids = (head_mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding: positions start at 0
    cache = DynamicCache(config=getattr(model, "config", None))
    parameters = inspect.signature(model.forward).parameters
    # transformers >= 5.2x names the argument `cache` (older releases: `past_key_values`)
    key = "cache" if "cache" in parameters else "past_key_values"
    # only the cache is wanted: skip the vocabulary projection of every prompt position (B x P x V)
    logits = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
    with torch.no_grad():
        model(input_ids=prompt_ids[:, :-1], attention_mask=head_mask, position_ids=position_ids,
              use_cache=True, **{key: cache}, **logits)
    cache.batch_repeat_interleave(num_samples)
    return generate_fn(input_ids=repeated_ids, attention_mask=repeated_mask, **{key: cache}, **generate_kwargs)


def first_tokens_agreement(a: torch.Tensor, b: torch.Tensor, prompt_width: int, pad_token_id: int,
                           n_tokens: int = 4) -> float:
    """Fraction of rows whose first `n_tokens` answer tokens are identical in `a` and `b`."""
    width = min(a.shape[1], b.shape[1], prompt_width + n_tokens)
    if width <= prompt_width:
        return 1.0
    same = (a[:, prompt_width:width] == b[:, prompt_width:width]).all(dim=1)
    return float(same.float().mean())
