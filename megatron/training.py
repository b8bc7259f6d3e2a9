"""pretrain(): set-up, then the train / evaluate loop under DeepSpeed.

Read it top to bottom: `pretrain` builds everything (in the order the checks need: arguments
were validated before this runs), then `train` runs iterations. Logging, checkpointing and
evaluation are small components the loop calls, not branches spread through it.
"""
from __future__ import annotations

import json
import logging
import os

import torch
import torch.distributed as dist

from megatron import checkpointing
from megatron.arguments import ArgumentError
from megatron.core import parallel_state
from megatron.exits import ExitConditions
from megatron.initialize import initialize_megatron
from megatron.model import GPTConfig, GPTModel
from megatron.optimizer import build_optimizer
from megatron.optimizer_param_scheduler import build_scheduler, scheduler_increment
from megatron.training_log import TrainLogger

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- builders
def build_tokenizer_and_vocab(args):
    """The tokenizer (for the vocabulary size and EOD id) and the padded vocabulary size."""
    from megatron.tokenizer import build_tokenizer, pad_vocab_size  # noqa: PLC0415

    ttype = args.tokenizer_type or ("NullTokenizer" if args.vocab_size else None)
    if ttype is None:
        raise ArgumentError("no tokenizer: give --tokenizer-type/--tokenizer-model (TOKENIZER_TYPE/TOKENIZER_MODEL) "
                         "or --vocab-size")
    tok = build_tokenizer(ttype, args.tokenizer_model, vocab_size=args.vocab_size,
                          vocab_file=args.vocab_file, merge_file=args.merge_file)
    args.vocab_size_orig = tok.vocab_size
    args.padded_vocab_size = pad_vocab_size(tok.vocab_size, args.make_vocab_size_divisible_by,
                                            args.tensor_model_parallel_size)
    return tok


def model_config(args) -> GPTConfig:
    return GPTConfig(
        vocab_size=args.padded_vocab_size,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads,
        ffn_hidden_size=args.ffn_hidden_size,
        kv_channels=args.kv_channels,
        max_position_embeddings=args.max_position_embeddings,
        normalization=args.normalization,
        layernorm_epsilon=args.layernorm_epsilon,
        swiglu=args.swiglu,
        use_rotary_position_embeddings=args.use_rotary_position_embeddings,
        rope_theta=args.rope_theta,
        rotary_percent=args.rotary_percent,
        untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
        add_bias_linear=args.add_bias_linear,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        word_embedding_init_std=args.word_embedding_init_std if args.adjust_word_embedding_init else None,
        init_method_xavier_uniform=args.init_method_xavier_uniform,
    )


def build_ds_config(args) -> dict:
    """DeepSpeed config: the launcher's JSON if given, with the batch, ZeRO, dtype and clipping
    fields always taken from the (validated) arguments, so a user's CLI flag wins over the file."""
    cfg: dict = {}
    if args.deepspeed_config:
        with open(args.deepspeed_config) as f:
            cfg = json.load(f)
    wanted = {
        "train_batch_size": args.global_batch_size,
        "train_micro_batch_size_per_gpu": args.micro_batch_size,
        "gradient_accumulation_steps": args.num_micro_batches,
        "gradient_clipping": args.clip_grad,
    }
    for k, v in wanted.items():
        if k in cfg and cfg[k] != v and args.rank == 0:
            log.warning("DeepSpeed config %s=%s replaced by %s from the arguments", k, cfg[k], v)
        cfg[k] = v
    zero = cfg.setdefault("zero_optimization", {})
    zero["stage"] = args.zero_stage
    cfg["bf16"] = {**cfg.get("bf16", cfg.get("bfloat16", {})), "enabled": bool(args.bf16)}
    cfg.pop("bfloat16", None)
    cfg["fp16"] = {**cfg.get("fp16", {}), "enabled": False}
    cfg.setdefault("zero_allow_untested_optimizer", True)
    cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    cfg.setdefault("wall_clock_breakdown", False)
    cfg["steps_per_print"] = max(int(cfg.get("steps_per_print", 1)), 10**9)  # we print our own line
    if args.universal_checkpoint:
        cfg.setdefault("checkpoint", {})["load_universal"] = True
    return cfg


def build_datasets(args):
    """Train/valid/test datasets from the data list, with the upstream sample budgets."""
    from megatron.data.blendable_dataset import build_train_valid_test_datasets  # noqa: PLC0415
    from megatron.data.data_list import DataSource, parse_data_file_list, validate_sources  # noqa: PLC0415

    if args.data_file_list:
        sources = parse_data_file_list(args.data_file_list)
    else:  # --data-path: "prefix" or "w1 prefix1 w2 prefix2 ..."
        dp = args.data_path
        pairs = [(1.0, dp[0])] if len(dp) == 1 else [(float(dp[i]), dp[i + 1]) for i in range(0, len(dp), 2)]
        sources = [DataSource(w, p, os.path.basename(p)) for w, p in pairs]
    validate_sources(sources)
    gbs = args.global_batch_size
    budgets = (args.train_iters * gbs,
               (args.train_iters // args.eval_interval + 1) * args.eval_iters * gbs,
               args.eval_iters * gbs)
    return build_train_valid_test_datasets(
        sources, args.split, budgets, args.seq_length, args.seed, args.data_cache_path,
        shuffle_sample_in_corpus=args.shuffle_sample_in_corpus)


def build_loader(dataset, args, consumed_samples: int):
    from megatron.data.samplers import MegatronPretrainingSampler  # noqa: PLC0415

    if dataset is None:
        return None
    sampler = MegatronPretrainingSampler(
        total_samples=len(dataset), consumed_samples=consumed_samples,
        micro_batch_size=args.micro_batch_size,
        data_parallel_rank=parallel_state.get_data_parallel_rank(),
        data_parallel_size=parallel_state.get_data_parallel_world_size())
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.num_workers,
                                       pin_memory=False, persistent_workers=False)


# ----------------------------------------------------------------------------- one step
def get_batch(batch: dict, args, eod: int | None, device):
    text = torch.as_tensor(batch["text"]).long().to(device, non_blocking=True)
    tokens, labels = text[:, :-1].contiguous(), text[:, 1:].contiguous()
    loss_mask = torch.ones_like(tokens, dtype=torch.float32)
    if args.eod_mask_loss and eod is not None:
        loss_mask[tokens == eod] = 0.0
    return tokens, labels, loss_mask


def forward_loss(engine, batch: dict, args, eod, device) -> torch.Tensor:
    tokens, labels, mask = get_batch(batch, args, eod, device)
    losses = engine(tokens, labels=labels)
    return (losses.float() * mask).sum() / mask.sum().clamp(min=1.0)


def dp_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over the data-parallel group (values already averaged locally)."""
    if dist.is_initialized() and parallel_state.get_data_parallel_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, group=parallel_state.get_data_parallel_group())
        values /= parallel_state.get_data_parallel_world_size()
    return values


def train_step(engine, data_iter, args, eod, device) -> torch.Tensor:
    """One iteration = num_micro_batches forward/backward passes + one optimizer step."""
    losses = []
    for _ in range(args.num_micro_batches):
        loss = forward_loss(engine, next(data_iter), args, eod, device)
        engine.backward(loss)
        engine.step(lr_kwargs={"increment": scheduler_increment(args)})
        losses.append(loss.detach())
    return dp_mean(torch.stack(losses).mean())


@torch.no_grad()
def evaluate(engine, valid_dataset, args, eod, device) -> float:
    """Mean LM loss over the first eval_iters global batches of the validation set (the same
    samples every time, so successive evaluations are comparable)."""
    loader = build_loader(valid_dataset, args, consumed_samples=0)
    engine.eval()
    total, n = torch.zeros((), device=device), 0
    it = iter(loader)
    for _ in range(args.eval_iters * args.num_micro_batches):
        try:
            batch = next(it)
        except StopIteration:
            break
        total += forward_loss(engine, batch, args, eod, device)
        n += 1
    engine.train()
    return float(dp_mean(total / max(n, 1)))


# ----------------------------------------------------------------------------- main entry
def pretrain(args) -> dict:
    """Train as configured by the validated `args`; returns a summary dict."""
    initialize_megatron(args)
    import deepspeed  # noqa: PLC0415  (after initialize: it picks DeepSpeed's accelerator)

    tokenizer = build_tokenizer_and_vocab(args)
    train_ds, valid_ds, _test_ds = build_datasets(args)

    model = GPTModel(model_config(args))
    optimizer = build_optimizer(model, args)
    scheduler = build_scheduler(optimizer, args)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=build_ds_config(args))
    device = engine.device
    if args.rank == 0:
        n = sum(p.numel() for p in model.parameters())
        print(f"> model: {n / 1e6:.2f}M parameters, {args.num_layers} layers, hidden {args.hidden_size}, "
              f"vocab {args.padded_vocab_size} (padded from {args.vocab_size_orig}); world size {args.world_size}, "
              f"DP {args.data_parallel_size}, GBS {args.global_batch_size} = MB {args.micro_batch_size} x "
              f"GAS {args.num_micro_batches} x DP; ZeRO {args.zero_stage}; {args.params_dtype}", flush=True)

    state = checkpointing.load_checkpoint(engine, args)
    summary = train(args, engine, train_ds, valid_ds, tokenizer.eod, device, state)
    if dist.is_initialized():
        dist.barrier()
    return summary


def train(args, engine, train_ds, valid_ds, eod, device, state: checkpointing.LoadedState) -> dict:
    iteration, samples, tokens = state.iteration, state.consumed_train_samples, state.consumed_train_tokens
    logger = TrainLogger.create(args)
    exits = ExitConditions(args)
    summary = {"start_iteration": iteration, "initial_val_loss": None, "final_val_loss": None, "checkpoint": None}

    def validate() -> float | None:
        if valid_ds is None or args.eval_iters == 0:
            return None
        loss = evaluate(engine, valid_ds, args, eod, device)
        logger.validation(iteration, loss, tokens)
        return loss

    def save() -> None:
        if args.save:
            summary["checkpoint"] = checkpointing.save_checkpoint(engine, args, iteration, samples, tokens)

    if args.eval_on_start and iteration == 0:
        summary["initial_val_loss"] = validate()

    data_iter = iter(build_loader(train_ds, args, samples))
    engine.train()
    last_saved = iteration
    while iteration < args.train_iters and not (args.train_tokens and tokens >= args.train_tokens):
        loss = train_step(engine, data_iter, args, eod, device)
        iteration += 1
        samples += args.global_batch_size
        tokens += args.global_batch_size * args.seq_length
        logger.train(iteration, loss, engine, samples, tokens)
        if args.eval_interval and iteration % args.eval_interval == 0 and iteration != args.train_iters:
            validate()
        if args.save and args.save_interval and iteration % args.save_interval == 0:
            save()
            last_saved = iteration
        reason = exits.reason(iteration)
        if reason:
            if args.rank == 0:
                print(f"> exiting at iteration {iteration} ({reason})", flush=True)
            break

    summary["final_val_loss"] = validate()
    if iteration != last_saved:
        save()
    logger.close()
    summary.update(iteration=iteration, consumed_samples=samples, consumed_tokens=tokens)
    if args.rank == 0:
        print(f"> done: iteration {iteration}, {tokens} tokens; checkpoint: {summary['checkpoint']}; "
              f"tensorboard: {args.tensorboard_dir}; metrics: {args.metrics_file}", flush=True)
    return summary
