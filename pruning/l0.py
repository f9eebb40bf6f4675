"""L0-HC and Dep-L0 (``--net hc`` / ``--net dep``) as a pruning method of the shared loop.

``--epoch`` epochs of cross-entropy plus the L0 penalty (:mod:`pruning.penalty`),
or plus the Lagrangian budget term with ``--target-macs``/``--target-params``
(:mod:`pruning.budget`); the gate parameters train with their own Adam (no
weight decay), or inside the weights' SGD with ``--gen_optim SGD`` as the
reference's ResNet50 script has it. At the end of the last penalty epoch the
gates freeze at their test values (with a budget missed by more than the
tolerance, at its projection), and ``--fine_tune_epoch`` epochs train the
weights alone, with no penalty.
"""
import torch
from torch.optim.lr_scheduler import LambdaLR, MultiStepLR

from .budget import BudgetConstraint, load_multiplier_state, multiplier_optimizer
from .method import PruningMethod
from .penalty import L0Penalty


class L0Method(PruningMethod):
    """Hard-concrete gates trained with the L0 penalty or a budget, then frozen."""

    loss_name = "l0"

    def __init__(self, model, args, gate_decay: float | None):
        """``args``: the training scripts' arguments; ``gate_decay``: the gate lr's factor at the
        milestones (None: constant, the VGG recipe)."""
        super().__init__(model)
        self.name = {"hc": "l0-hc", "dep": "dep-l0"}[model.gates.net]
        self.args = args
        self.epochs = args.epochs
        self.penalty = L0Penalty(model, args.reg).to(model.gates.layer_of_channel.device)
        self.budget = self.lagrangian = None
        if args.target_macs or args.target_params:
            kind, target = ("macs", args.target_macs) if args.target_macs else ("params", args.target_params)
            self.budget = BudgetConstraint(model, kind, target, args.target_warmup).to(
                model.gates.layer_of_channel.device)
            self.lagrangian = multiplier_optimizer(self.budget, args.lr_lagrangian)
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
        self._log_alpha = self._expected = None

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
        if self.lagrangian is not None:
            out["lagrangian"] = (self.lagrangian, None)
        return out

    def steps_optimizers(self, epoch: int) -> bool:
        return epoch < self.epochs

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
        expected_open = self.model.gates.expected_open(self._log_alpha)
        if self.budget is not None:
            reg, self._expected = self.budget(progress, expected_open)
            return reg
        if self.args.lamba > 0:
            return self.penalty(self.args.lamba, expected_open)
        return None

    def after_step(self, iteration: int) -> None:
        if self.budget is not None and self.gates is not None and self._log_alpha is not None:
            self.model.gates.bound_pre_activations_()

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
        return self.budget.report(finished, self.epochs, self.args.fine_tune_epoch)

    def state_dict(self) -> dict:
        return dict(gate_optimizer=self.gates.state_dict() if self.gates else None,
                    gate_scheduler=self.gate_schedule.state_dict() if self.gate_schedule else None,
                    budget=self.budget.state_dict() if self.budget else None,
                    lagrangian=self.lagrangian.state_dict() if self.lagrangian else None)

    def load_state_dict(self, state: dict) -> list[str]:
        """Restore; returns warnings for the console (an older checkpoint's multiplier state)."""
        warnings = []
        if self.gates is not None:
            self.gates.load_state_dict(state["gate_optimizer"])
            self.gate_schedule.load_state_dict(state["gate_scheduler"])
        if self.budget is not None:
            self.budget.load_state_dict(state["budget"])
            if not load_multiplier_state(self.lagrangian, state["lagrangian"]):
                warnings.append("the checkpoint's multipliers ascended with SGD (an earlier version); they continue "
                                "from their saved values with a fresh Adam")
        return warnings

    def progress_scalars(self, progress: float) -> dict:
        if self.budget is None or self._expected is None or self._log_alpha is None:
            return {}  # no budget, or fine-tuning: the multipliers stopped with the penalty phase
        return {"budget/target": self.budget.target_at(progress), "budget/expected": self._expected.item(),
                "budget/deterministic": self.budget.deterministic(), "budget/lambda1": self.budget.lambda1.item(),
                "budget/lambda2": self.budget.lambda2.item()}

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
        out = dict(method=self.name, net=args.net, back_dep=args.back_dep, lamba=args.lamba, reg=args.reg)
        if self.budget is not None:
            out["budget"] = self.report()
        return out

    def epoch_message(self, epoch: int, results: dict) -> str | None:
        if self.budget is not None and epoch + 1 == self.epochs:
            return f"budget: {results['budget']['message']}"  # the report results.json has, not a second one
        return None
