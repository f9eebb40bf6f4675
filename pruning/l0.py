"""L0-HC and Dep-L0 (``--net hc`` / ``--net dep``) as a pruning method of the shared loop.

``--epoch`` epochs of cross-entropy plus the L0 penalty (:mod:`pruning.penalty`),
or, with ``--target-macs``/``--target-params``, of cross-entropy alone with the
budget controller pushing the gates after each step (:mod:`pruning.budget`);
the gate parameters train with their own Adam (no weight decay), or inside the
weights' SGD with ``--gen_optim SGD`` as the reference's ResNet50 script has it. At the end of the last penalty epoch the
gates freeze at their test values (with a budget missed by more than the
tolerance, at its projection), and ``--fine_tune_epoch`` epochs train the
weights alone, with no penalty.
"""
import torch
from torch.optim.lr_scheduler import LambdaLR, MultiStepLR

from .budget import BudgetConstraint, collapse_message, recovery_message, shrinking_collapse
from .method import PruningMethod
from .penalty import L0Penalty


class L0Method(PruningMethod):
    """Hard-concrete gates trained with the L0 penalty or a budget, then frozen."""

    loss_name = "l0"

    def __init__(self, model, args, gate_decay: float | None):
        """``args``: the run's configuration (engine.config.RunConfig: the training scripts' flags, the
        method's read as attributes too); ``gate_decay``: the gate lr's factor at the milestones (None:
        constant, the VGG recipe)."""
        super().__init__(model)
        self.name = {"hc": "l0-hc", "dep": "dep-l0"}[model.gates.net]
        self.args = args
        self.epochs = args.epochs
        self.penalty = L0Penalty(model, args.reg).to(model.gates.layer_of_channel.device)
        self.budget = None
        if args.target_macs or args.target_params:
            kind, target = ("macs", args.target_macs) if args.target_macs else ("params", args.target_params)
            self.budget = BudgetConstraint(model, kind, target, args.target_warmup, args.lr_lagrangian).to(
                model.gates.layer_of_channel.device)
        self.gates = self.gate_schedule = None
        if args.gen_optim != "SGD":
            self.gates = torch.optim.Adam(model.gates.param_groups(args.lr_gate, fan_in_scaled=self.budget is not None),
                                          lr=args.lr_gate, weight_decay=0.0, fused=True)
            if gate_decay is None:
                # Deliberately constant (the VGG recipe); the reference got this by
                # binding the gate scheduler to the weight optimiser by mistake.
                self.gate_schedule = LambdaLR(self.gates, lambda epoch: 1.0)
            else:
                self.gate_schedule = MultiStepLR(self.gates, list(args.milestones), gate_decay)
        self._log_alpha = self._expected = self._kept = self._progress = None
        self._step_epochs = 0.0
        # The collapse guard's state: the best validation top-1 of the penalty phase so far, and
        # the guard's first finding (with its epoch, and the epoch the run recovered in, if it did),
        # kept for results.json.
        self.peak_top1, self.collapse = 0.0, None

    def weight_parameters(self) -> list:
        if self.gates is None:
            # --gen_optim SGD exists only for fidelity: the reference's single SGD gives the gate
            # parameters the weights' lr, momentum, schedule and weight decay.
            return list(self.model.parameters())
        return self.model.weight_parameters()

    def optimizers(self) -> dict:
        out = {}
        if self.gates is not None:
            out["gate"] = (self.gates, self.gate_schedule)
        return out

    def steps_optimizers(self, epoch: int) -> bool:
        return epoch < self.epochs

    def phase(self, epoch: int) -> str | None:
        return "fine-tune" if epoch >= self.epochs else None

    def forward_args(self, epoch: int) -> dict:
        if epoch >= self.epochs:
            self._log_alpha = None
            return {}
        # The gate logits (for Dep-L0 a chain of small matmuls) are computed once
        # and shared by the gates and the penalty.
        self._log_alpha = self.model.gates.log_alpha()
        return dict(log_alpha=self._log_alpha)

    def loss(self, progress: float) -> torch.Tensor | None:
        if self._log_alpha is None:
            return None
        if self.budget is not None:
            # The budget acts by the controller's push after the step (after_step), not through the
            # loss: the cross-entropy alone goes through the gates' optimiser.
            self._expected, self._kept = self.budget(progress, self._log_alpha)
            # The share of an epoch this step is: the progress since the last step (0 on the first).
            self._step_epochs = 0.0 if self._progress is None else max(progress - self._progress, 0.0)
            self._progress = progress
            return None
        if self.args.lamba > 0:
            return self.penalty(self.args.lamba, self.model.gates.expected_open(self._log_alpha))
        return None

    def after_step(self, iteration: int) -> None:
        if self.budget is None or self._log_alpha is None:
            return
        gates = self.model.gates
        groups = self.gates.param_groups if self.gates is not None else [
            dict(params=list(gates.parameters()), lr=self.args.lr_gate)]  # --gen_optim SGD: the gate lr
        self.budget.push_(groups, gates.log_alpha, self._progress, self._step_epochs)
        if self.gates is not None:
            gates.bound_pre_activations_()

    def start_epoch(self, epoch: int) -> str | None:
        if epoch >= self.epochs and not self.model.gates.frozen:
            self.end_pruning()  # --epoch 0, or a checkpoint of the last penalty epoch
            if self.budget is not None:
                return f"budget: {self.report()['message']}"
        return None

    def end_epoch(self, epoch: int) -> None:
        if epoch + 1 == self.epochs:
            self.end_pruning()

    def end_pruning(self) -> None:
        """Freeze the gates after the last penalty epoch; with a budget missed by more than the
        tolerance (or a cut network), at the projection of the logits onto it (every rank
        computes the same one)."""
        self.model.gates.freeze(self.budget.final_gates() if self.budget is not None else None)

    def report(self) -> dict:
        finished = self.model.gates.frozen
        return self.budget.report(finished, self.epochs, self.args.fine_tune_epoch, self.collapse)

    def non_finite_state(self) -> str | None:
        return None if bool(torch.isfinite(self.model.gates.log_alpha()).all()) else "gate logit"

    def state_dict(self) -> dict:
        return dict(peak_top1=self.peak_top1, collapse=self.collapse,
                    gate_optimizer=self.gates.state_dict() if self.gates else None,
                    gate_scheduler=self.gate_schedule.state_dict() if self.gate_schedule else None,
                    budget=self.budget.state_dict() if self.budget else None)

    def load_state_dict(self, state: dict) -> list[str]:
        """Restore; returns warnings for the console (an older checkpoint's budget state)."""
        warnings = []
        # Checkpoints from before the collapse guard have no guard state: it starts afresh.
        self.peak_top1, self.collapse = state.get("peak_top1", 0.0), state.get("collapse")
        if self.gates is not None:
            self.gates.load_state_dict(state["gate_optimizer"])
            self.gate_schedule.load_state_dict(state["gate_scheduler"])
        if self.budget is not None:
            if "last_kept" in state["budget"]:
                self.budget.load_state_dict(state["budget"])
            else:
                warnings.append("the checkpoint's budget state is that of the earlier Lagrangian multipliers; the "
                                "budget controller restarts from lambda1 = 0")
        return warnings

    def progress_scalars(self, progress: float) -> dict:
        if self.budget is None or self._expected is None or self._log_alpha is None:
            return {}  # no budget, or fine-tuning: the controller stopped with the penalty phase
        return {"budget/target": self.budget.target_at(progress), "budget/expected": self._expected.item(),
                "budget/deterministic": self.budget.deterministic(), "budget/lambda1": self.budget.lambda1.item(),
                "budget/kept": self._kept.item()}

    def log_epoch(self, writer, step: int, kept: list[int]) -> None:
        """The reference's per-layer tags: ``z/<layer>`` (open channels), ``mode_z/<layer>`` (test
        gates) and ``qz_loga/<layer>`` (logits)."""
        gates = self.model.gates
        log_alpha = gates.log_alpha().detach().float().cpu().split(gates.widths)
        test_gates = gates.test_gates().float().cpu().split(gates.widths)
        for layer, n, la, z in zip(self.model.gated_layers, kept, log_alpha, test_gates):
            writer.add_scalar(f"z/{layer.name}", n, step)
            writer.add_histogram(f"mode_z/{layer.name}", z.numpy(), step)
            writer.add_histogram(f"qz_loga/{layer.name}", la.numpy(), step)

    def results(self) -> dict:
        args = self.args
        out = dict(method=self.name, net=args.net, back_dep=args.back_dep, lamba=args.lamba, reg=args.reg,
                   collapse=self.collapse)
        if self.budget is not None:
            out["budget"] = self.report()
        return out

    def epoch_message(self, epoch: int, results: dict) -> str | None:
        """The collapse guard's line in a training penalty epoch where it sees the signs
        (:func:`~pruning.budget.shrinking_collapse`; its first finding goes into ``results``, which
        results.json then carries), and the budget's line after the last penalty epoch."""
        lines = []
        # While the gates train: the last penalty epoch is evaluated with the frozen (possibly
        # projected) gates, whose effect the budget's own report gives.
        if epoch < self.epochs and not self.model.gates.frozen:
            signs = shrinking_collapse(self.model.gates.test_gates(), results["top1"], self.peak_top1,
                                       self.model.arch["num_classes"], epoch + 1 > self.args.target_warmup)
            self.peak_top1 = max(self.peak_top1, results["top1"])
            if signs is not None:
                lines.append(collapse_message(epoch + 1, signs))
                if self.collapse is None:
                    self.collapse = dict(epoch=epoch + 1, **signs)
                    results.update(self.results())
                elif self.collapse.get("recovered_epoch") is not None:  # it fell back: not recovered after all
                    self.collapse["recovered_epoch"] = None
                    results.update(self.results())
            elif self.collapse is not None and self.collapse.get("recovered_epoch") is None:
                # A dip the run climbed out of, its channels chosen again: the guard says so, and the
                # result counts as the method's unless it falls back before the penalty phase ends.
                self.collapse["recovered_epoch"] = epoch + 1
                lines.append(recovery_message(epoch + 1, self.collapse, results["top1"]))
                results.update(self.results())
        if self.budget is not None and epoch + 1 == self.epochs:
            lines.append(f"budget: {results['budget']['message']}")  # the report results.json has, not a second one
        return "\n".join(lines) or None

