"""The catalog of finding codes: severity, cause and fix of each. docs/findings.md is generated from it:

    python -m scratchlab.doctor.catalog > docs/findings.md
"""

from __future__ import annotations

from scratchlab.doctor.findings import CATALOG, register

# ---------------------------------------------------------------- preflight (before step 0)
register("causal_leak", "error", "Output at position t depends on inputs after t",
         "A missing or wrong causal mask, attention/softmax over the wrong axis, or a norm/pooling across time.",
         "Use a causal mask over the time axis (F.scaled_dot_product_attention(is_causal=True)); normalise over "
         "features only. Evidence gives the earliest (output, input) position pair that leaks.")
register("batch_leak", "error", "A sample's output depends on other samples in the batch",
         "BatchNorm, or an operation that mixes along the batch dimension.",
         "Use LayerNorm/RMSNorm over features; never reduce over the batch dim in the forward pass.")
register("labels_not_shifted", "error", "Labels equal the inputs",
         "The targets were not shifted: the model is trained to copy the current token.",
         "Make labels the next token: labels[:, t] = tokens[t + 1] (scratchlab's windows do this in one place).")
register("labels_misaligned", "error", "Labels are the inputs shifted by an offset other than one",
         "Input and target slicing disagree (e.g. shifted twice, or in the wrong direction).",
         "Slice one window of T+1 tokens: inputs = w[:-1], labels = w[1:].")
register("init_loss_high", "warning", "Initial loss far above ln(V)",
         "Logits are too large at initialisation (init std too big, no final norm, no logit scaling).",
         "Lower the init std, use depth-scaled init, add a final norm, or set model.logits_scale < 1.")
register("nonfinite", "error", "NaN or Inf in the loss, logits, weights or gradients",
         "Overflow, a division by zero, a log of zero, or a learning rate that blew the weights up.",
         "Look at the named tensor first; lower the LR, clip gradients, compute the loss in fp32.")
register("special_tokens_in_loss", "error", "Special tokens are unmasked targets",
         "BOS/PAD (or other special ids) are counted in the loss, so the model learns to predict padding.",
         "Set their labels to -100 in the data layer (once, shared by train and eval).")
register("dead_params", "warning", "Trainable parameters get no gradient",
         "A module is not on the loss path (unused branch, detached tensor, a gate stuck at zero).",
         "Wire the module into the forward pass, remove it, or freeze it explicitly (requires_grad=False).")
register("grad_outlier", "warning", "Parameters with gradients far out of line with the rest",
         "Learnable scalars (gates, log-scales, mixing weights) get gradients orders of magnitude larger than "
         "matrices; clipping the global norm then mostly clips them.",
         "Fix the scale instead of learning it, give such parameters their own group with a lower LR, or reparametrise.")
register("cannot_overfit", "error", "The model cannot overfit a single batch",
         "The model ignores its input or gradients do not reach the weights (wrong labels, detached graph, zero LR).",
         "Check the label shift, the loss mask and that the optimizer holds the model's parameters.")
register("deterministic_windows", "warning", "Training windows are not random crops",
         "The same dataset index always yields the same window although clips are longer than the window, or "
         "windows always start at offset 0 (an inverted crop flag). Judged on what a training set returns, not "
         "on what it declares (random_crop=False included); evidence: unseen_fraction of each clip.",
         "Draw the window start at random for training (scratchlab: window mode 'random'); keep 'fixed' for eval.")
register("vocab_coverage_low", "info", "Training targets cover a small part of the vocabulary",
         "Most embeddings and output rows will stay untrained: sampling at temperature 1 draws from noise.",
         "Use a smaller vocabulary, more data, or demo at low temperatures; track coverage.")
register("data_too_small", "warning", "Too few training tokens for the number of parameters",
         "The run cannot reach even a fraction of a token per parameter; it will memorise or stay noisy.",
         "Use a smaller model or more data (compute-optimal is about 20 tokens per parameter).")
register("check_failed", "info", "A check could not run on this model",
         "The model's forward or outputs did not fit what the check needs.",
         "Nothing to fix in the model necessarily; the evidence says why the check was skipped.")

# ---------------------------------------------------------------- in-loop monitors
register("clip_saturated", "warning", "Gradient clipping fires on most steps",
         "The learning rate is too high or the clip threshold too low: the run trains at the clip, not at the LR.",
         "Lower the hidden matrices' LR (optim.lr; optim.muon_lr under Muon), or raise train.clip.max_norm "
         "towards the p90 of unclipped norms given in the evidence.")
register("loss_spike", "warning", "Training loss spiked",
         "A bad batch, an LR too high for this stage, or an unstable parameter.",
         "Check the step's data; lower the LR or add warmup; watch grad_norm around the step.")
register("loss_flat", "warning", "Loss is not moving",
         "LR too low or zero, gradients not flowing, or data that carries no signal.",
         "Check lr in metrics.jsonl, the overfit-one-batch check, and the data of step 0.")
register("overfitting", "warning", "Validation loss rises while training loss falls",
         "The model memorises the training set (too little data for its size, or too many epochs).",
         "Use more data, a smaller model, more weight decay, or stop at the best checkpoint.")
register("update_ratio", "warning", "Parameter update / weight ratio out of range",
         "Updates far above ~1e-3 of the weight norm blow weights up; far below, that group does not learn.",
         "Adjust the LR (or the group's LR) towards an update/weight ratio around 1e-3.")
register("entropy_collapse", "warning", "Output entropy collapsed",
         "The model puts almost all mass on a few tokens: degenerate (repetitive) generation ahead.",
         "Lower the LR, check for label leaks, add z-loss or logit soft-capping.")
register("logit_growth", "warning", "Logits keep growing",
         "Output (or attention) logits grow without bound, a precursor of loss spikes and NaN.",
         "Add QK-norm or logit soft-capping, z-loss, or lower the LR.")
register("run_crashed", "error", "The run crashed",
         "An exception stopped training (status.json holds it); metrics and checkpoints up to then are intact.",
         "Read the error and train.log; fix the cause, then `scratchlab train --resume RUN` from the last checkpoint.")
register("run_killed", "error", "The run was killed",
         "status.json says running but no process holds the run's lock (RUN/.lock): the training process died "
         "without a word (SIGKILL, out of memory, a lost node). Metrics and checkpoints up to then are intact.",
         "Look at train.log and the system log (dmesg for the OOM killer); then `scratchlab train --resume RUN` "
         "continues from the latest checkpoint (named in the evidence).")
register("moe_imbalance", "warning", "Mixture-of-experts load is imbalanced",
         "The router sends most tokens to a few experts; the others do not learn.",
         "Raise the load-balance loss coefficient or use bias-based (aux-loss-free) balancing.")
register("grad_explosion", "warning", "Gradient norm far above its healthy range",
         "Usually a few parameters: learnable scalars (log-scales through exp(), mixing weights) whose gradients "
         "sum over every output value; at a high LR they run away and the run goes NaN a few steps later.",
         "Look at the parameters in the evidence (top 5 by gradient norm); fix that scale instead of learning it "
         "(cascade: model.cascade.rms_scaling=fixed), or give it a lower LR and its own clip "
         "(model.cascade.scale_lr_mult, scale_max_norm), or lower optim.lr.")
register("output_rms_off", "warning", "Output RMS out of line with the target's",
         "The output scale drifted: a learnable gain or mixing weight ran away, or the scaling uses the wrong "
         "reference.",
         "Use fixed RMS scaling (model.cascade.rms_scaling=fixed); check the gain in the train rows (rms_gain).")
register("output_constant", "warning", "The output is (nearly) constant over time",
         "The model collapsed to a mean frame: the input does not reach the output, or the loss is minimised by "
         "predicting the average (too high an LR early, a dead stage).",
         "Check the input path with the preflight and overfit-one-batch checks; lower optim.lr; look at the demos.")
register("output_copies_input", "warning", "The output copies the input instead of predicting what changes",
         "The model found the copy-last-frame solution: output correlates with the input while the change from "
         "the last input frame is not predicted (val_novelty near 1); a strong residual path makes this easy.",
         "Compare val_loss with val_copy_baseline; raise model.cascade.novelty_weight, lower the last stage's "
         "residual weight, train longer, or check that targets are shifted (next frame, not the same frame).")


def catalog_markdown() -> str:
    lines = [
        "# Finding codes",
        "",
        "Generated from `src/scratchlab/doctor/catalog.py` (`python -m scratchlab.doctor.catalog > docs/findings.md`).",
        "Codes are API: they are never renamed silently. Severity: `error` stops training (unless",
        "`doctor.allow_errors=true`), `warning` and `info` are reported.",
        "",
    ]
    for code, info in CATALOG.items():
        lines += [f"## `{code}` ({info.severity})", "", f"**{info.title}.**", "", f"- Cause: {info.cause}",
                  f"- Fix: {info.fix}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(catalog_markdown(), end="")
