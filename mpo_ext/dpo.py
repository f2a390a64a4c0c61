"""Step 3b of two-stage MPO (Gou & Nguyen 2024): DPO on the easy pairs, reference = the SFT model.

Pure pieces (`response_mask`, `sequence_log_prob_sums`, `dpo_loss`, `dpo_metrics`) are checked by hand in
tests; `DPOTrainer` plugs them into the shared `dschat.utils.trainer.Trainer`, so epochs, accumulation,
logging, periodic states, resume and SIGTERM behave exactly as in steps 1 and 2.

Reference log-probs come either from a resident frozen engine (upstream's way: two models in memory
for the whole run) or, with `--precompute_ref_log_probs`, from one pass over train+eval before
training, after which the reference is freed. The table is stored in the output directory with a
fingerprint of everything it depends on, so a resumed run reuses it instead of rebuilding it.
The model, engine and saving follow the recipe of steps 1 and 2 (`dschat.utils.build`).
"""

from __future__ import annotations

import gc
import hashlib
import inspect
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dschat.rlhf import health
from dschat.rlhf.generation import Generator
from dschat.rlhf.held_out import HeldOutEvaluator
from dschat.steps import train_main
from dschat.utils.build import (
    create_causal_lm,
    frozen_causal_lm,
    frozen_ds_config,
    initialize_trained_engine,
    save_trained_model,
    stage_datasets,
    start_training_stage,
)
from dschat.utils.data.collators import DataCollatorReward
from dschat.utils.device import to_device
from dschat.utils.dist import (
    all_gather,
    all_reduce,
    barrier,
    get_accelerator,
    get_rank,
    get_world_size,
    is_rank_0,
)
from dschat.utils.errors import UserError, run_main
from dschat.utils.files import atomic_write, atomic_write_json
from dschat.utils.fingerprint import model_signature
from dschat.utils.inference import RewardScorer, pad_with_mask, resolve_torch_dtype
from dschat.utils.losses import gather_log_probs
from dschat.utils.model.masks import training_attention_mask
from dschat.utils.module.lora import lora_disabled
from dschat.utils.output_dir import publish_directory
from dschat.utils.printing import print_rank_0
from dschat.utils.saving import save_stage_model
from dschat.utils.trainer import Trainer, reduce_mean_metrics, sample_lengths
from mpo_ext.dpo_args import (  # noqa: F401 - the step's settings, parser and pair-file check, importable from here
    DPOFlagSettings,
    DPOSettings,
    HeldOutRewardSettings,
    build_parser,
    check_pair_files,
    parse_args,
)

REFERENCE_FILE = "reference_logps.pt"
EVAL_MAX_NEW_TOKENS = 64  # answer budget of the held-out generation checks
METRIC_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
               "logps/chosen", "logps/rejected")

# --------------------------------------------------------------------------------------------- pure maths


def response_mask(attention_mask: torch.Tensor, prompt_lengths: torch.Tensor) -> torch.Tensor:
    """[N, L] mask of the answer tokens: attended positions at or after each row's prompt length.

    DPO compares answers to the same prompt, so prompt tokens carry no preference signal; masking
    them keeps their (identical) log-probs out of the sums. The final eos stays in, so the policy is
    also rewarded for stopping where the chosen answer stops.
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device).unsqueeze(0)
    starts = prompt_lengths.to(attention_mask.device).long().reshape(-1, 1)
    return (positions >= starts) & (attention_mask != 0)


def sequence_log_prob_sums(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Summed log p(token_t | tokens_<t) over the positions t where `loss_mask` is set ([N, L] -> [N]); the
    per-token kind is `dschat.rlhf.ppo_math.token_log_probs`.

    `loss_mask` is aligned with `input_ids` (it marks tokens being predicted); position 0 has no
    prediction and is ignored. Summed in fp32 whatever the logits' dtype.
    """
    token_logps = gather_log_probs(logits[:, :-1].float(), input_ids[:, 1:])
    mask = loss_mask[:, 1:].to(token_logps.dtype)
    return (token_logps * mask).sum(dim=-1)


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair sigmoid DPO loss (conservative DPO when `label_smoothing` > 0) and implicit rewards.

    With h = beta * ((pi_c - ref_c) - (pi_r - ref_r)), loss = -(1-eps) log s(h) - eps log s(-h): eps is
    the assumed probability that a label is flipped. Returns (losses [B], chosen_rewards [B],
    rejected_rewards [B]); the rewards beta * (pi - ref) are detached (they are reported, not trained).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    h = beta * (chosen_ratio - rejected_ratio)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def dpo_metrics(losses: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor) -> dict[str, torch.Tensor]:
    """Batch means under TRL's metric names; `loss` keeps its graph, the rest are detached.

    An accuracy counts a pair only when the chosen reward is strictly higher, so an untrained policy
    (all rewards 0) scores 0, not 0.5.
    """
    return {
        "loss": losses.mean(),
        "rewards/chosen": chosen_rewards.float().mean(),
        "rewards/rejected": rejected_rewards.float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).float().mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "logps/chosen": policy_chosen_logps.detach().float().mean(),
        "logps/rejected": policy_rejected_logps.detach().float().mean(),
    }


def held_out_prompts(dataset: Dataset | None, count: int, pad_token_id: int
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Left-padded (ids, mask) of the prompts of the first `count` pairs (phase-2 items), or None. A prompt
    is the first `prompt_length` real positions of the chosen row (by its mask, never by token ids)."""
    if dataset is None or not count or not len(dataset):
        return None
    prompts = []
    for i in range(min(count, len(dataset))):
        item = dataset[i]
        ids = item[0].reshape(-1)[item[1].reshape(-1) != 0]  # the chosen row's real positions
        prompts.append(ids[: int(item[4])].tolist())
    return pad_with_mask(prompts, max(len(p) for p in prompts), pad_token_id, left=True)


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[2B] rows of a DataCollatorReward batch -> (chosen [B], rejected [B])."""
    half = values.shape[0] // 2
    return values[:half], values[half:]


# --------------------------------------------------------------------------------------------- data plumbing


class IndexedDataset(Dataset):
    """Yield (index, item) so a batch knows which pairs it holds (for the precomputed reference table)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.filter_counts = getattr(dataset, "filter_counts", None)  # what the data build dropped (logged)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]

    def lengths(self) -> list[int] | None:
        return sample_lengths(self.dataset)


class IndexedCollator:
    """Wrap a pair collator: same batch plus `index` [2B] (chosen rows then rejected rows, like the ids)."""

    def __init__(self, collate_fn):
        self.collate_fn = collate_fn

    def __call__(self, items: list[tuple[int, Any]]) -> dict[str, torch.Tensor]:
        batch = self.collate_fn([item for _, item in items])
        index = torch.tensor([i for i, _ in items], dtype=torch.long)
        batch["index"] = torch.cat([index, index])
        return batch


def answer_logits_start(prompt_lengths: torch.Tensor) -> int:
    """First position whose logits some answer token needs: the one before the earliest answer start (the
    logits at position t predict token t+1). Everything before it is prompt in every row."""
    return max(int(prompt_lengths.min()) - 1, 0) if prompt_lengths.numel() else 0


def policy_log_probs(model, batch: dict[str, torch.Tensor], pad_mask: str = "always",
                     answer_logits_only: bool = False) -> torch.Tensor:
    """Summed answer log-probs [2B] of every row of a pair batch, one forward for chosen and rejected.

    `answer_logits_only` (--use_logits_to_keep) asks the model for the logits of the last positions only,
    from `answer_logits_start` on (transformers' `logits_to_keep`): the vocabulary-sized head and its
    log-softmax then skip the shared prompt prefix, whose log-probs the response mask drops anyway. Same
    sums; only the floating-point summation order of the head's weight gradient changes.
    """
    start = answer_logits_start(batch["prompt_lengths"]) if answer_logits_only else 0
    keep = {"logits_to_keep": batch["input_ids"].shape[1] - start} if start else {}
    out = model(input_ids=batch["input_ids"], attention_mask=training_attention_mask(batch["attention_mask"], pad_mask),
                use_cache=False, **keep)
    logits = out.logits if hasattr(out, "logits") else out[0]
    mask = response_mask(batch["attention_mask"], batch["prompt_lengths"])
    return sequence_log_prob_sums(logits, batch["input_ids"][:, start:], mask[:, start:])


def check_logits_to_keep(model, flag: str = "--use_logits_to_keep") -> None:
    """The model's forward must take `logits_to_keep` (transformers' causal LMs do; some custom code does not)."""
    module = getattr(model, "module", model)
    if "logits_to_keep" not in inspect.signature(module.forward).parameters:
        raise UserError(f"{flag}: {type(module).__name__}.forward takes no logits_to_keep argument; leave the flag off "
                        "for this model")


class ResidentReference:
    """Reference log-probs computed on the fly by a frozen model kept in memory (upstream's way)."""

    def __init__(self, model, pad_mask: str = "always", answer_logits_only: bool = False):
        self.model = model
        self.pad_mask = pad_mask
        self.answer_logits_only = answer_logits_only

    @torch.no_grad()
    def log_probs(self, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor:  # noqa: ARG002
        return policy_log_probs(self.model, batch, self.pad_mask, self.answer_logits_only)


class BaseWeightsReference:
    """Reference log-probs from the policy itself with its LoRA updates switched off.

    With only the LoRA parameters trained (`--only_optimize_lora`) and the reference being the policy's
    own starting checkpoint, the frozen base weights are the reference model, so no second copy is kept
    (what TRL does for PEFT models): the memory of a precomputed reference without the precompute pass.
    """

    def __init__(self, engine, pad_mask: str = "always", answer_logits_only: bool = False):
        self.module = getattr(engine, "module", engine)
        self.pad_mask = pad_mask
        self.answer_logits_only = answer_logits_only

    @torch.no_grad()
    def log_probs(self, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor:  # noqa: ARG002
        was_training = self.module.training
        self.module.eval()  # the reference never sees dropout
        try:
            with lora_disabled(self.module):
                return policy_log_probs(self.module, batch, self.pad_mask, self.answer_logits_only)
        finally:
            self.module.train(was_training)


class PrecomputedReference:
    """Reference log-probs looked up per pair index from tables computed before training ([N, 2])."""

    def __init__(self, tables: dict[str, torch.Tensor]):
        self.tables = tables

    def log_probs(self, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor:
        table = self.tables[split]
        index = batch["index"].to(table.device)
        half = index.shape[0] // 2
        values = torch.cat([table[index[:half], 0], table[index[half:], 1]])
        return values.to(batch["input_ids"].device)


@torch.no_grad()
def compute_reference_table(model, dataset: Dataset, collate_fn, batch_size: int, device=None,
                            rank: int | None = None, world_size: int | None = None,
                            pad_mask: str = "always", answer_logits_only: bool = False) -> torch.Tensor:
    """[N, 2] (chosen, rejected) reference log-probs of every pair of `dataset`, on every rank.

    Work is split r::world; every rank runs the same number of batches (short shards repeat their last
    index), because under ZeRO-3 each forward is a collective. Results are all-gathered.
    """
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    device = device if device is not None else getattr(model, "device", torch.device("cpu"))
    n = len(dataset)
    per_rank = math.ceil(n / world_size) if n else 0
    mine = list(range(rank, n, world_size))
    mine += [mine[-1] if mine else 0] * (per_rank - len(mine))
    collate = IndexedCollator(collate_fn)
    values = torch.zeros(per_rank, 2, dtype=torch.float32, device=device)
    for start in range(0, per_rank, batch_size):
        chunk = mine[start:start + batch_size]
        batch = to_device(collate([(i, dataset[i]) for i in chunk]), device)
        chosen, rejected = split_pairs(policy_log_probs(model, batch, pad_mask, answer_logits_only))
        values[start:start + len(chunk)] = torch.stack([chosen, rejected], dim=1).float()
    indices = torch.tensor(mine, dtype=torch.long, device=device)
    if world_size > 1:
        values, indices = all_gather(values), all_gather(indices)
    table = torch.zeros(n, 2, dtype=torch.float32)
    table[indices.cpu()] = values.cpu()
    return table


def dataset_fingerprint(dataset: Dataset | None) -> str:
    """Hash of every token id of a pair dataset, so a stored reference table is never applied to other data."""
    digest = hashlib.sha256()
    if dataset is None:
        return digest.hexdigest()
    for i in range(len(dataset)):
        item = dataset[i]
        for part in item.values() if isinstance(item, dict) else item:
            if torch.is_tensor(part):
                digest.update(part.detach().cpu().to(torch.int64).numpy().tobytes())
                digest.update(b"|")
        digest.update(b"\n")
    return digest.hexdigest()


def load_reference_tables(path: Path, fingerprint: dict) -> dict[str, torch.Tensor] | None:
    """The stored tables if `path` exists and was computed for exactly `fingerprint`, else None."""
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged file is simply recomputed
        return None
    if json.loads(stored.get("fingerprint", "null")) != fingerprint:
        return None
    return {k: v for k, v in stored.items() if k != "fingerprint"}


def save_reference_tables(path: Path, fingerprint: dict, tables: dict[str, torch.Tensor]) -> None:
    content = {"fingerprint": json.dumps(fingerprint, sort_keys=True), **tables}
    atomic_write(path, lambda fh: torch.save(content, fh))


# --------------------------------------------------------------------------------------------- trainer


def evaluation_scorers(settings, device: torch.device) -> tuple[RewardScorer | None, RewardScorer | None]:
    """The reward models DPO's held-out evaluations score with: (--reward_model_name_or_path,
    --heldout_reward_model_name_or_path), None where not given. Each is a replica on this rank in the stage's
    precision, so its scores read like PPO's reward engine's and a bf16 run does not hold two fp32 copies."""
    dtype = resolve_torch_dtype(settings.resolved_dtype, device)
    return tuple(RewardScorer.from_path(path, device, dtype, max_seq_len=settings.max_seq_len) if path else None
                 for path in (settings.reward_model_name_or_path, settings.heldout_reward_model_name_or_path))


class DPOTrainer(Trainer):
    """DPO on the shared loop: one forward for chosen+rejected, loss on answer tokens only."""

    name = "step3b_dpo"
    rows_per_sample = 2

    def __init__(self, settings, engine, train_dataset: Dataset, eval_dataset: Dataset | None, collate_fn,
                 tokenizer, reference):
        super().__init__(settings, engine, IndexedDataset(train_dataset),
                         IndexedDataset(eval_dataset) if eval_dataset is not None else None,
                         IndexedCollator(collate_fn), tokenizer)
        self.reference = reference
        self.monitor = health.HealthMonitor("step3b_dpo", settings.health_thresholds)
        self.best = health.KeepBest(f"eval/{settings.best_metric}")
        self.evaluator: HeldOutEvaluator | None = None
        held_out = held_out_prompts(eval_dataset if eval_dataset is not None and len(eval_dataset)
                                    else train_dataset, settings.eval_prompts, tokenizer.pad_token_id)
        if held_out is not None:
            scorer, heldout = evaluation_scorers(settings, self.device)
            gold = health.load_gold_reward(settings.gold_reward) if settings.gold_reward else None
            self.evaluator = HeldOutEvaluator(*held_out, tokenizer, scorer=scorer, heldout_scorer=heldout, gold=gold,
                                              batch_size=settings.per_device_eval_batch_size)

    def _metrics(self, batch: dict[str, torch.Tensor], split: str) -> dict[str, torch.Tensor]:
        policy = policy_log_probs(self.engine, batch, self.settings.pad_mask, self.settings.use_logits_to_keep)
        ref = self.reference.log_probs(batch, split)
        policy_chosen, policy_rejected = split_pairs(policy)
        ref_chosen, ref_rejected = split_pairs(ref.to(policy.dtype))
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, self.settings.beta, self.settings.label_smoothing)
        metrics = dpo_metrics(losses, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected)
        if split == "eval":  # per token, so the trend reads the same whatever the answer lengths
            tokens = response_mask(batch["attention_mask"], batch["prompt_lengths"])[:, 1:].sum(dim=1).float()
            chosen_tokens, rejected_tokens = split_pairs(tokens.clamp(min=1.0))
            metrics["health/logps_chosen_per_token"] = (policy_chosen.detach().float() / chosen_tokens).mean()
            metrics["health/logps_rejected_per_token"] = (policy_rejected.detach().float() / rejected_tokens).mean()
        return metrics

    def compute_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        return self._metrics(batch, "train")

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean metrics over the held-out pairs (every batch up to --eval_iters), averaged over ranks."""
        if self.eval_loader is None:
            return {}
        self.engine.eval()
        sums: dict[str, torch.Tensor] = {}
        count = 0
        for i, batch in enumerate(self.eval_loader):
            if self.settings.eval_iters and i >= self.settings.eval_iters:
                break
            metrics = self._metrics(to_device(batch, self.device), "eval")
            for key, value in metrics.items():
                sums[key] = sums.get(key, torch.zeros((), device=self.device)) + value.detach().float()
            count += 1
        self.engine.train()
        metrics = reduce_mean_metrics(sums, count)
        metrics.update(self._evaluate_generations())
        return metrics

    def _evaluate_generations(self) -> dict[str, float]:
        """Greedy answers to fixed held-out prompts: generation health, reward-model and gold scores
        (`HeldOutEvaluator`, the evaluation PPO runs too)."""
        if self.evaluator is None:
            return {}
        room = self.settings.max_seq_len - self.evaluator.prompt_ids.shape[1]
        generator = Generator(self.engine, self.tokenizer, max_new_tokens=max(1, min(EVAL_MAX_NEW_TOKENS, room)),
                              zero_stage=self.settings.zero_stage)
        metrics = self.evaluator.evaluate(self.engine, generator)
        self.engine.train()
        return metrics

    def after_eval(self, metrics: dict[str, float]) -> None:
        """Health warnings (and --stop_on_collapse), then keep-best bookkeeping."""
        health.check_health(self.monitor, self.global_step, metrics, self.settings.output_dir, self.settings.stop_on_collapse,
                            self.save_state)
        improved = self.best.consider(self.global_step, metrics, healthy=not self.monitor.active)
        if improved and self.settings.keep_best and self.settings.output_dir:
            print_rank_0(f"--keep_best: new best held-out {self.best.metric} {self.best.best_score:.4f} at step "
                         f"{self.global_step}; saving it to {self._best_dir()}")
            save_stage_model(self.settings, self.engine, self.tokenizer, self._best_dir(),
                             "step3b DPO (best evaluated step)", self.settings.model_name_or_path)

    def _best_dir(self) -> Path:
        return Path(self.settings.output_dir) / "best_model"

    def extra_state(self) -> dict:
        return {"health": self.monitor.state_dict(), "keep_best": self.best.state_dict(),
                "held_out": self.evaluator.state_dict() if self.evaluator is not None else {}}

    def load_extra_state(self, state: dict) -> None:
        self.monitor.load_state_dict(state.get("health") or {"baseline": state.get("health_baseline", {})})
        self.best.load_state_dict(state.get("keep_best", {}))
        if self.evaluator is not None:
            self.evaluator.load_state_dict(state.get("held_out", {}))

    def save_model(self) -> None:
        if not self.settings.output_dir:
            return
        health.write_health(self.settings.output_dir, self.monitor)
        if self.settings.keep_best and self.best.best_step is not None and self._best_dir().is_dir():
            self._keep_best_model()
            return
        save_trained_model(self.settings, self.engine, self.tokenizer, "the DPO model", "step3b DPO")

    def _keep_best_model(self) -> None:
        """The output directory's model files become the best evaluated step's; best.json says which and why."""
        out, best = Path(self.settings.output_dir), self._best_dir()
        record = self.best.record(self.global_step, "best")
        if is_rank_0():
            publish_directory(best, out)  # keeps the run's logs, metrics and states
            atomic_write_json(out / health.BEST_FILE, record)
        barrier()
        print_rank_0(f"--keep_best: {out} holds step {self.best.best_step}: {record['reason']}")


# --------------------------------------------------------------------------------------------- entry point


def _release(engine) -> None:
    """Tear a frozen engine down; the caller then drops its last reference and collects (an engine sits in
    reference cycles, so a `gc.collect()` while the caller still holds it frees nothing)."""
    destroy = getattr(engine, "destroy", None)
    if callable(destroy):
        destroy()
    engine.module = None


def _collect() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reference_fingerprint(settings: DPOSettings, reference_path: str, train_data: Dataset, eval_data: Dataset | None) -> dict:
    return {
        "reference": model_signature(reference_path),
        "dtype": settings.resolved_dtype,
        "max_seq_len": settings.max_seq_len,
        "train": [len(train_data), dataset_fingerprint(train_data)],
        "eval": [len(eval_data) if eval_data is not None else 0, dataset_fingerprint(eval_data)],
    }


def precomputed_reference(settings: DPOSettings, reference_path: str, tokenizer, eval_config: dict, train_data, eval_data,
                          collator) -> PrecomputedReference:
    """Load the stored table when it matches this run, else compute it (then store it) and free the model."""
    fingerprint = reference_fingerprint(settings, reference_path, train_data, eval_data)
    path = Path(settings.output_dir) / REFERENCE_FILE if settings.output_dir else None
    tables = load_reference_tables(path, fingerprint) if path is not None else None
    found = torch.tensor([1.0 if tables is not None else 0.0], device=get_accelerator().current_device_name())
    all_reduce(found, "min")  # every rank must agree
    if found.item() > 0:
        print_rank_0(f"Loaded precomputed reference log-probs from {path}")
        return PrecomputedReference(tables)
    print_rank_0(f"Precomputing reference log-probs with {reference_path} "
                 f"({len(train_data)} train + {len(eval_data) if eval_data is not None else 0} eval pairs) ...")
    engine = frozen_causal_lm(reference_path, tokenizer, eval_config)
    batch_size = settings.per_device_eval_batch_size
    if settings.use_logits_to_keep:
        check_logits_to_keep(engine)
    keep = settings.use_logits_to_keep
    tables = {"train": compute_reference_table(engine, train_data, collator, batch_size, engine.device,
                                               pad_mask=settings.pad_mask, answer_logits_only=keep)}
    tables["eval"] = (compute_reference_table(engine, eval_data, collator, batch_size, engine.device,
                                              pad_mask=settings.pad_mask, answer_logits_only=keep)
                      if eval_data is not None and len(eval_data) else torch.zeros(0, 2))
    _release(engine)
    del engine
    _collect()
    if path is not None and is_rank_0():
        save_reference_tables(path, fingerprint, tables)
    barrier()
    return PrecomputedReference(tables)


def build(settings: DPOSettings) -> DPOTrainer:
    tokenizer, ds_config = start_training_stage(settings, tb_name="step3b_dpo")
    eval_config = frozen_ds_config(settings.resolved_dtype, offload=settings.offload_reference_model,
                                   zero_stage=settings.zero_stage, micro_batch_size=settings.per_device_eval_batch_size)
    train_data, eval_data = stage_datasets(settings, tokenizer, 2)
    collator = DataCollatorReward(pad_token_id=tokenizer.pad_token_id, max_seq_len=settings.max_seq_len,
                                  padding=settings.padding)
    reference_path = settings.reference_path
    base_is_reference = (settings.lora_dim > 0 and settings.only_optimize_lora
                         and os.path.realpath(reference_path) == os.path.realpath(settings.model_name_or_path))
    reference = None
    if settings.precompute_ref_log_probs:
        reference = precomputed_reference(settings, reference_path, tokenizer, eval_config, train_data, eval_data,
                                          collator)
    elif not base_is_reference:
        reference = ResidentReference(frozen_causal_lm(reference_path, tokenizer, eval_config), settings.pad_mask,
                                      settings.use_logits_to_keep)
        if settings.use_logits_to_keep:
            check_logits_to_keep(reference.model)

    model = create_causal_lm(settings, tokenizer, ds_config)
    if settings.use_logits_to_keep:
        check_logits_to_keep(model)
    engine = initialize_trained_engine(settings, model, ds_config, len(train_data))
    if reference is None:
        print_rank_0("Reference log-probs: the policy's own base weights with LoRA switched off (no second model)")
        reference = BaseWeightsReference(engine, settings.pad_mask, settings.use_logits_to_keep)
    return DPOTrainer(settings, engine, train_data, eval_data, collator, tokenizer, reference)


def main() -> None:
    """Step 3b entry point: `deepspeed --module mpo_ext.dpo ...` (its step folder's main.py calls it too)."""
    train_main(parse_args, build)


if __name__ == "__main__":
    run_main(main)
