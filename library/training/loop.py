"""The training loop: epochs of batches, gradient accumulation, saving, sampling, resuming.

Determinism: before every forward pass the global torch RNG is seeded from (seed, micro-step,
rank) and each sample's noise and timestep come from its own generator (see
:mod:`library.training.noise`); the data position is (epoch, batch). A state saved at any
optimizer step therefore continues bit-identically, however often a run is resumed.
"""

from __future__ import annotations

import itertools
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import torch

from library.errors import TrainingError
from library.training import noise as N
from library.training import saving as S
from library.training.data import iterate_epoch
from library.training.deepspeed_plugin import backward as ds_backward
from library.training.optimizers import adaptive_lr_logs, eval_mode, load_optimizer_state, set_train_mode
from library.training.progress import LossRecorder, init_trackers, make_progress_bar
from library.training.state import (Progress, TrainState, capture_rng, load_state, restore_rng, save_state,
                                    start_progress)
from library.training.validation import Validator, should_validate_epoch, should_validate_step

logger = logging.getLogger(__name__)


def run_signature(s: Any) -> dict[str, Any]:
    """What must not change between a run and its resume (else the continuation is not exact)."""
    a = s.args
    return {
        **s.target.signature(s),
        "family": s.model.family.value, "seed": s.seed, "num_processes": s.accelerator.num_processes,
        "train_batch_size": a.train_batch_size, "gradient_accumulation_steps": a.gradient_accumulation_steps,
        "batches_per_epoch": s.plan.batches_per_epoch,
    }


def make_state(s: Any, progress: Progress) -> TrainState:
    scaler = getattr(s.accelerator, "scaler", None)
    data_epoch, position = divmod(progress.epoch * s.plan.batches_per_epoch + progress.batch_in_epoch
                                  - progress.data_shift, s.plan.batches_per_epoch)
    return TrainState(progress=Progress(**vars(progress)), network=s.target.state_dict(),
                      optimizer=s.optimizer.state_dict(), scheduler=s.lr_scheduler.state_dict(), rng=capture_rng(),
                      data={"epoch": data_epoch + 1, "position": position,
                            "epoch_losses": list(s.loss_recorder.values) if s.loss_recorder else []},
                      signature=run_signature(s), scaler=scaler.state_dict() if scaler is not None else None)


def resume(s: Any) -> Progress:
    """Load ``--resume`` into the session; returns the counters to continue from."""
    st = load_state(s.args.resume, run_signature(s))
    s.target.load_state_dict(st.network, s.args.resume)
    s.target.before_resume(s, st.progress.global_step)
    load_optimizer_state(s.optimizer, st.optimizer)
    s.lr_scheduler.load_state_dict(st.scheduler)
    scaler = getattr(s.accelerator, "scaler", None)
    if scaler is not None and st.scaler is not None:
        scaler.load_state_dict(st.scaler)
    restore_rng(st.rng)
    s.loss_recorder = LossRecorder()
    for i, value in enumerate(st.data.get("epoch_losses", [])):
        s.loss_recorder.add(i, float(value))
    p = st.progress
    logger.info("resumed from %s: epoch %d, step %d, batch %d of the epoch", s.args.resume, p.epoch + 1,
                p.global_step, p.batch_in_epoch)
    return p


def start(s: Any) -> Progress:
    """The counters to start from: ``--resume``'s, ``--initial_step`` / ``--initial_epoch``'s, or zero.

    A run started at step N also moves the LR schedule to step N (kohya restarts the schedule
    unless a state is loaded; continuing it is what starting "at step N" means for the LR).
    """
    a = s.args
    if a.resume:
        if a.skip_until_initial_step:
            logger.info("--skip_until_initial_step: a resumed run always continues the data order exactly")
        return resume(s)
    p = start_progress(a.initial_step, a.initial_epoch, bool(a.skip_until_initial_step),
                       steps_per_epoch=s.plan.steps_per_epoch, batches_per_epoch=s.plan.batches_per_epoch,
                       grad_accum=a.gradient_accumulation_steps, max_train_steps=s.max_train_steps)
    if p.global_step == 0:
        if a.skip_until_initial_step:
            logger.warning("--skip_until_initial_step does nothing without --initial_step or --initial_epoch")
        return p
    if a.initial_step is not None and a.initial_epoch is not None:
        logger.info("--initial_step %d overrides --initial_epoch %d", a.initial_step, a.initial_epoch)
    with warnings.catch_warnings():  # PyTorch warns about a scheduler step before any optimizer step
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(p.global_step):
            s.lr_scheduler.step()
    logger.info("starting at step %d (epoch %d, batch %d of the epoch); the data %s", p.global_step, p.epoch + 1,
                p.batch_in_epoch, "order from its first batch" if p.data_shift else
                "of the skipped steps is skipped (--skip_until_initial_step)")
    return p


def _epoch_data(plan: Any, progress: Progress, num_workers: int, persistent: bool = False) -> Any:
    """``(position, slice, batch)`` for the rest of epoch ``progress.epoch``.

    Positions count in the epoch being trained; the batches are the data order's at those
    positions, or ``progress.data_shift`` batches earlier (possibly across a data epoch's end).
    Skipped batches are never loaded: the plan jumps to a position directly.
    """
    per = plan.batches_per_epoch
    pos = progress.batch_in_epoch
    if progress.data_shift == 0:
        yield from iterate_epoch(plan, progress.epoch + 1, pos, num_workers, persistent)
        return
    data_index = progress.epoch * per + pos - progress.data_shift
    while pos < per:
        data_epoch, data_pos = divmod(data_index, per)
        n = min(per - data_pos, per - pos)
        for _, sl, batch in itertools.islice(iterate_epoch(plan, data_epoch + 1, data_pos, num_workers, persistent), n):
            yield pos, sl, batch
            pos += 1
        data_index += n


def _all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum gradients over processes (each process already divided by the global batch size)."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).clone() if p.grad is None else p.grad.copy_(
            flat[offset : offset + n].view_as(g))
        offset += n


def _global_loss(acc: Any, loss: torch.Tensor) -> float:
    if acc.num_processes == 1:
        return float(loss.detach())
    return float(acc.reduce(loss.detach().clone(), reduction="sum"))


def run_loop(t: Any, s: Any) -> Path | None:
    """Train until ``max_train_steps``; returns the final output (file or folder) on the main process."""
    validator = Validator.create(t, s)
    try:
        return _run_loop(t, s, validator)
    finally:  # --persistent_data_loader_workers: stop the workers, also when training fails
        s.plan.close()
        if validator is not None:
            validator.plan.close()


def _run_loop(t: Any, s: Any, validator: Validator | None) -> Path | None:
    a, acc, target = s.args, s.accelerator, s.target
    out_dir = t.check_output_dir()
    policy = S.SavePolicy.from_args(a, s.num_epochs)
    progress = start(s)
    set_train_mode(s.optimizer, True)  # schedule-free: a state may have been saved in eval mode
    val_loss: float | None = None
    accum = max(1, a.gradient_accumulation_steps)
    per_epoch = s.plan.batches_per_epoch
    init_trackers(acc, a, t.tracker_name)
    logger.info("training: %d steps, %d epochs, %d batches per epoch, %d process(es)", s.max_train_steps,
                s.num_epochs, per_epoch, acc.num_processes)
    if not a.resume:  # --sample_at_first; kohya samples before a run from --initial_step too (named step 0)
        t.sample_images(s, 0, None)
    bar = make_progress_bar(s.max_train_steps, progress.global_step, acc.is_main_process)
    recorder = s.loss_recorder = s.loss_recorder or LossRecorder()
    while progress.global_step < s.max_train_steps and progress.epoch < s.num_epochs:
        epoch_no = progress.epoch + 1
        target.on_epoch_start(s)
        finished_epoch = True
        for pos, sl, batch in _epoch_data(s.plan, progress, a.max_data_loader_n_workers,
                                          bool(a.persistent_data_loader_workers)):
            window_start = (pos // accum) * accum
            window = min(accum, per_epoch - window_start)
            sync = pos + 1 == min(window_start + accum, per_epoch)
            torch.manual_seed(N.derive_seed(s.seed, progress.micro_step, acc.process_index, 1))
            gens = N.sample_generators(s.seed, progress.micro_step, sl.first_index, len(sl.indices))
            target.on_step_start(s)
            loss = t.compute_loss(s, batch, gens, sl.n_real, sl.global_size)
            loss_value = _global_loss(acc, loss)
            if math.isnan(loss_value) or math.isinf(loss_value):
                _stop_on_nan(t, s, progress, out_dir, epoch_no)
            if s.deepspeed_engine is not None:  # DeepSpeed reduces, clips and steps at the window's end
                ds_backward(acc, loss, window, accum, sync)
            else:
                acc.backward(loss / window)
            progress.micro_step += 1
            progress.batch_in_epoch = pos + 1
            recorder.add(pos, loss_value)
            if not sync:
                continue
            # --fused_backward_pass / --fused_optimizer_groups: done in the backward pass; --deepspeed: by DeepSpeed
            if target.steps_in_backward:
                target.finish_backward(s)
            elif s.deepspeed_engine is None:
                if acc.num_processes > 1:
                    _all_reduce_grads(s.trainable_params)
                if a.max_grad_norm:
                    acc.clip_grad_norm_(s.trainable_params, a.max_grad_norm)
                s.optimizer.step()
            s.lr_scheduler.step()
            s.optimizer.zero_grad(set_to_none=True)
            logs = {"loss/current": loss_value, "loss/average": recorder.average}
            progress.global_step += 1
            target_logs, norm_postfix = target.after_optimizer_step(s, progress.global_step)
            logs.update(target_logs)
            if progress.batch_in_epoch == per_epoch:  # the epoch is complete: a state now resumes at the next
                progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
            lrs = s.lr_scheduler.get_last_lr()
            logs.update({f"lr/group{i}": lr for i, lr in enumerate(lrs)})
            logs.update(adaptive_lr_logs(s.optimizer))
            if validator is not None and should_validate_step(progress.global_step, a.validate_every_n_steps):
                val_loss = validator.evaluate(t, s)
                logs.update({"loss/validation/step_average": val_loss,
                             "loss/validation/step_divergence": val_loss - recorder.average})
            bar.update(1)
            bar.set_postfix(avr_loss=f"{recorder.average:.4f}", loss=f"{loss_value:.4f}", lr=f"{lrs[-1]:.2e}",
                            **({"val_loss": f"{val_loss:.4f}"} if val_loss is not None else {}), **norm_postfix)
            if acc.trackers:
                acc.log(logs, step=progress.global_step)
            t.sample_images(s, progress.global_step, None)
            if policy.save_at_step(progress.global_step):
                _save_at_step(t, s, progress, out_dir, policy)
            if progress.global_step >= s.max_train_steps:
                finished_epoch = progress.batch_in_epoch == 0
                break
        if finished_epoch and progress.batch_in_epoch == 0:
            done_epoch = progress.epoch  # 1-based number of the epoch just completed
            epoch_logs = {"loss/epoch": recorder.average}
            if validator is not None and should_validate_epoch(done_epoch, a.validate_every_n_epochs):
                val_loss = validator.evaluate(t, s)
                epoch_logs.update({"loss/validation/epoch_average": val_loss,
                                   "loss/validation/epoch_divergence": val_loss - recorder.average})
                logger.info("epoch %d: validation loss %.4f", done_epoch, val_loss)
            if acc.trackers:
                acc.log(epoch_logs, step=progress.global_step)
            if policy.save_at_epoch(done_epoch, s.num_epochs):
                _save_at_epoch(t, s, progress, out_dir, policy, done_epoch)
            t.sample_images(s, progress.global_step, done_epoch)
    bar.close()
    final = out_dir / (S.last_name(a.output_name) + target.output_suffix())
    t.save_output(s, final, progress.global_step, progress.epoch if progress.batch_in_epoch == 0 else
                   progress.epoch + 1)
    if policy.save_state or policy.save_state_on_train_end:
        _write_state(s, progress, out_dir / f"{S.last_name(a.output_name)}-state")
    acc.wait_for_everyone()
    acc.end_training()
    return final if acc.is_main_process else None


def _write_state(s: Any, progress: Progress, folder: Path) -> None:
    if s.accelerator.is_main_process:
        with eval_mode(s.optimizer):  # schedule-free: the evaluation weights, as kohya saves them
            save_state(folder, make_state(s, progress))
    s.accelerator.wait_for_everyone()


def _save_at_step(t: Any, s: Any, progress: Progress, out_dir: Path, policy: S.SavePolicy) -> None:
    step = progress.global_step
    _save_checkpoint(t, s, progress, out_dir, policy.save_state, lambda n: S.step_name(s.args.output_name, n),
                     policy.removable_step, step, step, progress.epoch + 1)


def _save_at_epoch(t: Any, s: Any, progress: Progress, out_dir: Path, policy: S.SavePolicy, epoch_no: int) -> None:
    _save_checkpoint(t, s, progress, out_dir, policy.save_state, lambda n: S.epoch_name(s.args.output_name, n),
                     policy.removable_epoch, epoch_no, progress.global_step, epoch_no)


def _save_checkpoint(t: Any, s: Any, progress: Progress, out_dir: Path, save_state: bool, name_of: Any,
                     removable: Any, counter: int, step: int, epoch: int) -> None:
    """Save the network (and state) under ``name_of(counter)``; drop what ``--save_last_n_*`` no longer keeps."""
    ext = s.target.output_suffix()
    t.save_output(s, out_dir / (name_of(counter) + ext), step, epoch)
    old = removable(counter)
    if old is not None and s.accelerator.is_main_process:
        S.remove_output(out_dir / (name_of(old) + ext))
    if save_state:
        _write_state(s, progress, out_dir / f"{name_of(counter)}-state")
        old = removable(counter, state=True)
        if old is not None and s.accelerator.is_main_process:
            S.remove_output(out_dir / f"{name_of(old)}-state")


def _stop_on_nan(t: Any, s: Any, progress: Progress, out_dir: Path, epoch_no: int) -> None:
    """Save the last good state and stop with an explanation."""
    s.optimizer.zero_grad(set_to_none=True)
    if s.deepspeed_engine is not None:  # no exact state under DeepSpeed (see library/training/deepspeed_plugin.py)
        raise TrainingError(f"the loss became NaN/inf at step {progress.global_step + 1} (epoch {epoch_no}); "
                            "training stopped. Likely causes: a learning rate too high, or fp16 overflow (try "
                            "--mixed_precision bf16)")
    folder = out_dir / f"{S.step_name(s.args.output_name, progress.global_step)}-state"
    # the state is that of the last completed optimizer step: drop a partial accumulation window
    good = Progress(progress.epoch, progress.global_step,
                    progress.batch_in_epoch - progress.batch_in_epoch % max(1, s.args.gradient_accumulation_steps),
                    progress.micro_step - progress.batch_in_epoch % max(1, s.args.gradient_accumulation_steps),
                    progress.data_shift)
    _write_state(s, good, folder)
    raise TrainingError(
        f"the loss became NaN/inf at step {progress.global_step + 1} (epoch {epoch_no}); training stopped and the "
        f"state of the last good step was saved to {folder}. Likely causes: a learning rate too high for this "
        "optimizer, fp16 overflow (try --mixed_precision bf16, --no_half_vae, or drop --full_fp16), or a broken "
        "image/latent cache. Fix the cause and continue with --resume " + str(folder))
