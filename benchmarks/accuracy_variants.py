"""What the accuracy report compares, in words: the same-criterion pairs of the two tools, each
variant row against the row it changes, and HFP's settings. Data only, so the report's logic stays
short and a new grid row is one line here."""

# same criterion in both tools, with the same fine-tuning (no distillation), then ours as a user gets it
PAIRS = [("l2:distill=0", "tp_magnitude"), ("bn_scale:distill=0", "tp_bn_scale"), ("l2:distill=0", "tp_group_norm"),
         ("l2", "tp_magnitude"), ("bn_scale", "tp_bn_scale"), ("l2@latency", "tp_magnitude"),
         ("dlp+l2@latency", "tp_magnitude"), ("dlp@latency", "tp_magnitude"),
         ("l1:distill=0.25:reconstruct=512", "tp_magnitude")]

CHANGES = [  # (ours changed, the default it is measured against, what changed)
    ("hfp:tie=shared", "hfp", "HFP: one shared gate per residual channel instead of the mean |gamma| of its norm layers"),
    ("hfp:lam=5", "hfp", "HFP at half the budget-loss weight: its phase ends before the target, the lowest gates are cut "
     "(a labelled fallback)"),
    ("hfp:lr=0.1", "hfp", "HFP's phase at the baseline's training lr (0.1: the paper prunes during ordinary training) "
     "instead of the fine-tuning lr (0.02)"),
    ("hfp:phase=0.8", "hfp", "HFP's phase allowed up to 80% of the step budget instead of half (it ends when the hard "
     "count meets the target; the rest fine-tunes)"),
    ("hfp:ramp=grow", "hfp", "HFP's budget-loss weight rising at its warm-up rate for as long as the hard count "
     "misses the target, instead of holding at lam after the warm-up (the gates' fall then depends less on "
     "their scale)"),
    ("hfp:ramp=grow:surrogate=soft", "hfp:ramp=grow", "HFP's soft-count surrogate (a sigmoid around the threshold, "
     "whose gradient fades for gates far above it) instead of the straight-through count (the same push on every "
     "gate), the weight rising while the target is unmet"),
    ("hfp:ramp=grow:surrogate=cut:lam=40", "hfp:ramp=grow", "HFP's straight-through push on the gates a cut "
     "meeting the target would remove now (the lowest) and on no other, instead of on every gate, at lam 40 "
     "(only the cut's own gates fall, so the target takes longer at 10), the weight rising while the target is unmet"),
    ("hfp:ramp=grow:surrogate=cut:phase=0.8", "hfp:phase=0.8", "HFP's push on the gates below the cut alone, the "
     "weight rising while the target is unmet, instead of the straight-through push on every gate with the weight "
     "held (both with the phase allowed 80% of the budget)"),
    ("hfp:ramp=grow:surrogate=cut:lam=40:tie=shared", "hfp:ramp=grow:surrogate=cut:lam=40", "HFP's push on the "
     "gates below the cut alone with one shared gate per residual channel instead of the mean |gamma| of its norm "
     "layers (tried because the task loss held one of those above the threshold and with it a residual gate)"),
    ("hfp:ramp=grow:surrogate=cut:lam=40:tie=shared-mean", "hfp:ramp=grow:surrogate=cut:lam=40:tie=shared",
     "HFP's shared gate per residual channel started at its norm layers' mean |gamma| (the layers divided by it, "
     "the same function) instead of at 1 (push on the gates below the cut alone, lam 40)"),
    ("hfp:ramp=grow:surrogate=cut:lam=40:tie=shared-mean", "hfp:ramp=grow:surrogate=cut:lam=40", "HFP's shared "
     "gate per residual channel started at its norm layers' mean |gamma| instead of that mean itself as the gate "
     "(push on the gates below the cut alone, lam 40)"),
    ("importance-weights:rank=scale", "importance-weights", "importance weights ranked by |alpha| x |gamma| instead of |alpha|"),
    ("l2", "l2:distill=0", "distillation from the unpruned model in every fine-tuning (l2)"),
    ("bn_scale", "bn_scale:distill=0", "distillation from the unpruned model in every fine-tuning (bn_scale)"),
    ("l1:distill=0.9", "l1", "distillation weight 0.9 instead of 0.5 (mostly the teacher's logits) in the fine-tuning (l1)"),
    ("l1:distill=0.25", "l1", "distillation weight 0.25 instead of 0.5 in the fine-tuning (l1)"),
    ("l2:distill=0.25", "l2", "distillation weight 0.25 instead of 0.5 in the fine-tuning (l2)"),
    ("l1:distill=0.25:temperature=2", "l1:distill=0.25", "distillation temperature 2 instead of 4 (weight 0.25, l1)"),
    ("l1:distill=0.25:reconstruct=512", "l1:distill=0.25", "least-squares reconstruction before the cut: every layer "
     "reading a removed channel re-fitted on 512 training images to compute what it did unpruned (l1, distillation 0.25)"),
    ("l1:reconstruct=512", "l1", "least-squares reconstruction before the cut (512 training images; l1, "
     "distillation 0.5)"),
    ("l1:rounds=4:reconstruct=512", "l1:rounds=4", "least-squares reconstruction before each of the 4 cuts "
     "(512 training images; l1, distillation 0.5)"),
    ("dlp+filters:criterion=l1:distill=0.25", "dlp+filters:criterion=l1",
     "distillation weight 0.25 instead of 0.5 in the cascade's fine-tunings (filters ranked by L1)"),
    ("dlp+filters:criterion=l1:distill=0.25:reconstruct=512", "dlp+filters:criterion=l1:distill=0.25",
     "least-squares reconstruction (512 training images) before each of the cascade's filter cuts (filters ranked by "
     "L1, distillation 0.25)"),
    *((f"dlp+filters:criterion=l1{d}:filter_steps=1", f"dlp+filters:criterion=l1{d}", "the cascade's filters cut in "
       f"one step after its blocks instead of 3 fine-tuned steps (filters ranked by L1{w})") for d, w in
      (("", ""), (":distill=0.25", ", distillation 0.25"))),
    ("l1", "l1:distill=0", "distillation from the unpruned model in every fine-tuning (l1)"),
    ("l2:allocation=latency", "l2", "allocation='latency' (MACs spent where this CPU's tables say they buy time): its top-1 cost"),
    ("dlp+filters:criterion=l1", "dlp+filters", "the cascade's filter steps ranked by the L1 norm instead of PLS-VIP "
     "(same blocks first, same steps)"),
    ("l1:rounds=4", "l1", "L1 cut in 4 steps, each fine-tuned for its share of half the budget (Torch-Pruning's magnitude "
     "row's schedule), instead of one cut and the whole budget after it"),
    ("l1", "l2", "the L1 norm of a channel's weights instead of the L2 norm (same global allocation, same fine-tuning)"),
]

HFP_VARIANTS = (("hfp:lam=5", "with the loss weight at 5"),
                ("hfp:lr=0.1", "with the phase at the baseline's training lr, 0.1"),
                ("hfp:phase=0.8", "with the phase allowed 80% of the budget"),
                ("hfp:ramp=grow", "with the loss weight rising for as long as the target is unmet"),
                ("hfp:ramp=grow:surrogate=soft", "with the weight rising and the soft-count surrogate"),
                ("hfp:ramp=grow:surrogate=cut:lam=40", "with the push on the gates below the cut alone and the "
                 "weight rising while the target is unmet, at 40 after the warm-up"),
                ("hfp:ramp=grow:surrogate=cut:phase=0.8", "with the push on the gates below the cut alone, the "
                 "weight rising while the target is unmet and the phase allowed 80% of the budget"),
                ("hfp:ramp=grow:surrogate=cut:lam=40:tie=shared", "with the push on the gates below the cut alone "
                 "at lam 40 and one shared gate per residual channel"),
                ("hfp:ramp=grow:surrogate=cut:lam=40:tie=shared-mean", "with the push on the gates below the cut "
                 "alone at lam 40 and one shared gate per residual channel started at its norm layers' mean |gamma|"))
